"""Plans the pod presets and the docs' workloads on real TPU topologies at full size (``easyppo plan``).

    python -m benchmarks.pod_plans                 # every row; results kept, rows done are skipped
    python -m benchmarks.pod_plans --only=ppo --force --jobs=1

Each row runs ``easyppo plan`` in its own process (the TPU compiler on this CPU, libtpu from the
``plan`` extra) with suggestions on, so a row that does not fit reports the cheapest variant that
does. Results accumulate in benchmarks/results/pod_plans.json; the Markdown table (with the date
and the jax, jaxlib and libtpu versions) goes to benchmarks/results/pod_plans.md and, with
``--docs``, between the markers in docs/tpu.md. A 70B plan takes a few minutes on 2 cores.

Rows: every slice of ``easyppo.configs.pod_slices`` (the presets' documented slices, with their
overrides), then the workloads of docs/tpu.md's table on v4, v5e, v5p and v6e slices, built from
the presets with other checkpoints (their architectures are known offline, see
``easyppo.plan.architectures``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from easyppo.configs.pod_slices import POD_SLICES

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "pod_plans.json"
TABLE = REPO / "benchmarks" / "results" / "pod_plans.md"
DOCS = REPO / "docs" / "tpu.md"
MARKERS = ("<!-- pod-plans:start -->", "<!-- pod-plans:end -->")
TIMEOUT_S = 3600

LLAMA3_8B_PPO = (
    "--config.model.init_from=allenai/Llama-3.1-Tulu-3-8B-SFT",
    "--config.ppo.reward_model.init_from=allenai/Llama-3.1-Tulu-3-8B-RM",
)
LLAMA3_70B_PPO = (
    "--config.model.init_from=allenai/Llama-3.1-Tulu-3-70B-SFT",
    "--config.ppo.reward_model.init_from=allenai/Llama-3.1-Tulu-3-8B-RM",
)
LLAMA3_70B_DPO = ("--config.model.init_from=allenai/Llama-3.1-Tulu-3-70B-SFT",)


@dataclasses.dataclass(frozen=True)
class Row:
    workload: str  # what the docs table calls it
    config: str
    topology: str
    flags: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return " ".join((self.config, self.topology, *self.flags))


def rows() -> list[Row]:
    planned = [
        Row(f"preset {config}", config, pod.topology, tuple(pod.flags()))
        for config, slices in POD_SLICES.items()
        for pod in slices
    ]
    workloads = {
        "Tulu 2.5 PPO: 13B policy, 70B reward and value": ("ppo:tulu25_13b_uf_mean", ()),
        "13B DPO (Tulu 2.5)": ("dpo:tulu25_13b_uf_mean", ()),
        "Llama 3 8B DPO (Tulu 3)": ("dpo:tulu3_8b_dpo_norm", ()),
        "Llama 3 70B DPO": ("dpo:tulu3_8b_dpo_norm", LLAMA3_70B_DPO),
        "Llama 3 8B PPO, 8B reward": ("ppo:tulu25_13b_uf_mean", LLAMA3_8B_PPO),
        "Llama 3 70B PPO, 8B reward": ("ppo:tulu25_13b_uf_mean", LLAMA3_70B_PPO),
    }
    # Each row compiles every program of an iteration (and, when it does not fit, up to 12 variants):
    # minutes on 2 cores, so the 70B workloads are planned on the slices they are likeliest to use.
    slices = {
        "Tulu 2.5 PPO: 13B policy, 70B reward and value": ("v4:4x4x8", "v5e:16x16", "v5p:4x4x4", "v6e:16x16"),
        "13B DPO (Tulu 2.5)": ("v4:4x4x2", "v5e:8x8", "v5p:2x4x4", "v6e:8x8"),
        "Llama 3 8B DPO (Tulu 3)": ("v4:4x4x2", "v5e:8x8", "v5p:2x4x4", "v6e:8x8"),
        "Llama 3 70B DPO": ("v5p:4x4x4", "v6e:16x16"),
        "Llama 3 8B PPO, 8B reward": ("v5p:2x4x4", "v6e:8x8"),
        "Llama 3 70B PPO, 8B reward": ("v5p:4x4x8",),
    }
    for workload, (config, flags) in workloads.items():
        planned += [Row(workload, config, topology, flags) for topology in slices[workload]]
    # The published anchor: the Tulu 2.5 trainer's 13B PPO, 512 prompts of 1024 + 1024 tokens, about
    # 7 minutes per iteration on a v3-256 (128 chips, 256 TensorCores).
    anchor = ("--config.data.global_batch_size=512", "--config.mesh.tensor=8", "--config.train.grad_accum_steps=8")
    planned.append(Row(ANCHOR, "ppo:tulu25_13b_uf_mean_13b_uf_rm", "v3:8x16", anchor))
    return planned


ANCHOR = "Anchor: Tulu 2.5 PPO 13B (13B reward), 512 prompts"


def plan_row(row: Row) -> dict:
    """``easyppo plan`` for one row, in its own process: the plan's JSON, or the error it printed."""
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch) / "plan.json"
        command = [sys.executable, "-m", "easyppo", "plan", f"--config={row.config}", f"--topology={row.topology}"]
        command += [*row.flags, f"--json={out}"]
        env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
        started = datetime.datetime.now()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
        seconds = (datetime.datetime.now() - started).total_seconds()
        result = {"row": dataclasses.asdict(row), "seconds": round(seconds, 1)}
        if done.returncode or not out.exists():
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            return result | {"error": errors[-1] if errors else done.stderr[-500:]}
        return result | json.loads(out.read_text())


def versions() -> dict[str, str]:
    found = {}
    for package in ("jax", "jaxlib", "libtpu", "flax"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return found | {"easyppo": commit.stdout.strip()}


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.1f} s"


def _chosen(result: dict) -> tuple[dict | None, dict]:
    """The plan the table shows, and the overrides it adds to the row's: the row's own plan when it
    fits, else ``easyppo plan``'s suggestion (if it found one)."""
    plan = result.get("plan")
    if (plan is None or plan["fits"] is False) and result.get("suggestions"):
        # easyppo plan's order: the shortest iteration, then the most memory to spare
        suggestion = min(result["suggestions"], key=lambda s: (s["plan"]["iteration_s"], s["plan"]["peak_bytes"]))
        return suggestion["plan"], suggestion["overrides"]
    return plan, {}


def markdown(results: dict[str, dict], meta: dict) -> str:
    lines = [
        f"Planned {meta['date']} with `python -m benchmarks.pod_plans` ("
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + "). Chips: v4 and v5p count chips (a v4-64 is `v4:4x4x2`, 32 chips), v3 TensorCores. "
        "Changes: the row's overrides of the preset, then (+) what `easyppo plan` suggested. Times are "
        "roofline lower bounds (easyppo/plan/report.py).",
        "",
        "| workload | slice | chips | changes | mesh | fits | peak GiB/chip (program) | iteration | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows():
        result = results.get(row.key)
        if result is None:
            continue
        plan, added = _chosen(result)
        # The checkpoints are in the workload's name, and the mesh column shows the mesh a change chose.
        flags = [f.removeprefix("--config.") for f in row.flags if "init_from=" not in f]
        added_flags = [f"+{k}={v}" for k, v in added.items() if k not in ("mesh.data", "mesh.fsdp")]
        changes = " ".join(flags + added_flags) or "-"
        if plan is None:
            lines.append(f"| {row.workload} | {row.topology} | | {changes} | | error | {result.get('error', '')} | | |")
            continue
        largest = max(plan["programs"], key=lambda p: p["peak_bytes"])
        fits = {True: "yes", False: "**no**", None: "-"}[plan["fits"]]
        tokens = f"{plan['tokens_per_s']:,.0f}" if plan["tokens_per_s"] else "-"
        mesh = plan["settings"]["mesh"].replace("data=1 ", "")
        lines.append(
            f"| {row.workload} | {row.topology} | {plan['devices']} | {changes} | {mesh} | {fits} "
            f"| {_gib(largest['peak_bytes'])} ({largest['name']}) | {_seconds(plan['iteration_s'])} | {tokens} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="plan only rows whose config, slice or workload contains this")
    parser.add_argument("--force", action="store_true", help="plan rows again that have results")
    parser.add_argument("--jobs", type=int, default=2, help="rows planned at once (each uses about a core)")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/tpu.md")
    args = parser.parse_args(argv)
    keys = {row.key for row in rows()}
    stored = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else {}
    results = {key: result for key, result in stored.items() if key in keys}  # rows no longer planned go
    # A workload row on a preset's own slice is that preset's row: planned once.
    wanted = (row for row in rows() if args.only in f"{row.workload} {row.key}")
    todo = list({row.key: row for row in wanted if args.force or row.key not in results}.values())
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row, result in zip(todo, pool.map(plan_row, todo)):
            results[row.key] = result
            fits = result.get("error") or result["plan"]["fits"]
            print(f"{row.key}: fits {fits} ({result['seconds']} s)", flush=True)
            meta = {"date": datetime.date.today().isoformat(), "versions": versions()}
            RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    meta = json.loads(RESULTS.read_text())["meta"] if RESULTS.exists() else {"date": "-", "versions": {}}
    table = markdown(results, meta)
    TABLE.write_text(table)
    print(table)
    if args.docs:
        text = DOCS.read_text()
        start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
        DOCS.write_text(text[:start] + "\n" + table + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA against full fine-tuning: what is trained, the memory it holds, and the step time.

    python -m benchmarks.lora_savings                 # DPO and PPO on a small model, measured here
    python -m benchmarks.lora_savings --predict       # the planner's per-chip memory at 8B/13B/70B on TPU
    python -m benchmarks.lora_savings --rank 8 --steps 3 --json_out lora.json

**Measured** (this machine, one process): for DPO (reference on the fly) and PPO (policy, critic,
reward model), the full run and the LoRA run (rank ``--rank`` on every projection, the critic too)
are built by the train loop's own ``trainer_for`` on the demo's data, then

* parameters trained, and all parameters held (trained + frozen: the base, the reference, the
  reward model);
* optimizer-state bytes, from the state itself;
* device memory: the bytes of live device arrays once the trainer and its state exist (weights,
  frozen models, optimizer state: what stays resident), and the compiler's per-device peak of the
  largest program of an iteration (``easyppo plan`` on this machine: arguments, outputs and
  temporaries);
* step time: both modes timed side by side in interleaved rounds (``common.time_interleaved``), so
  a slow minute of a shared machine slows both.

**Predicted** (``--predict``): ``easyppo plan`` at full size on TPU slices for 8B, 13B and 70B DPO and
8B PPO, full (float32 weights, as the pod presets) and LoRA (a bfloat16 base: its weights are never
updated, so they need no float32 master copy; adapters stay float32). The compiler's per-chip peak
and whether it fits the chip. A row takes minutes on 2 cores.

Prints one JSON object on stdout (and to ``--json_out``) and the tables on stderr. Both halves are
kept in benchmarks/results/lora_savings.json; a run of one half keeps the other's last results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import ml_collections

from benchmarks import common, pod_plans
from easyppo.configs import dpo as dpo_presets
from easyppo.configs import ppo as ppo_presets
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.models import lora
from easyppo.plan import planner, topology
from easyppo.run import loop

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "lora_savings.json"
# Large enough that weights and optimizer state, not the activations of a short batch, set the peak.
MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)

# (workload, preset, TPU slice, flags shared by both modes). Full remat, microbatches and a small
# precompute batch keep the activations small, so the rows compare what LoRA changes: weights,
# gradients and optimizer state.
DPO_FLAGS = ("--config.model.remat=full",)


def _batches(*, accum: int, precompute: int) -> tuple[str, ...]:
    return (f"--config.train.grad_accum_steps={accum}", f"--config.dpo.reference_batch_size={precompute}")


PPO_FLAGS = ("--config.model.remat=full", "--config.ppo.value_model.remat=full", "--config.train.grad_accum_steps=16")
PREDICTED = (
    ("Llama 3 8B DPO", "dpo:tulu3_8b_dpo_norm", "v5e:2x4", (*DPO_FLAGS, *_batches(accum=8, precompute=16))),
    ("13B DPO (Tulu 2.5)", "dpo:tulu25_13b_uf_mean", "v5e:4x8", (*DPO_FLAGS, *_batches(accum=1, precompute=32))),
    (
        "Llama 3 70B DPO",
        "dpo:tulu3_8b_dpo_norm",
        "v5p:2x2x2",
        (*pod_plans.LLAMA3_70B_DPO, *DPO_FLAGS, *_batches(accum=8, precompute=16)),
    ),
    ("Llama 3 8B PPO, 8B reward", "ppo:tulu25_13b_uf_mean", "v5p:2x2x1", (*pod_plans.LLAMA3_8B_PPO, *PPO_FLAGS)),
)


def _small(model: ml_collections.ConfigDict) -> None:
    model.init_from = ""
    model.preset = "tiny"
    model.update(MODEL)


def workload_config(algorithm: str, rank: int, out: pathlib.Path) -> ml_collections.ConfigDict:
    """The demo preset of ``algorithm`` on the benchmark's model, trained whole (rank 0) or with LoRA."""
    presets = {"dpo": dpo_presets, "ppo": ppo_presets}[algorithm]
    c = presets.get_config("demo")
    c.output_dir = str(out / f"{algorithm}_{rank}")
    c.data.cache_dir = str(out / "cache")
    c.data.global_batch_size = 16
    c.logging.progress_bar = False
    _small(c.model)
    if algorithm == "dpo":
        c.dpo.reference = "on_the_fly"  # a full run holds a second model; a LoRA run reuses its base
    else:
        _small(c.ppo.reward_model)
        c.ppo.sampling.max_new_tokens = 16
        c.ppo.value_model.lora.rank = rank
    c.model.lora.rank = rank
    return c


def _live_bytes() -> int:
    gc.collect()
    return sum(array.nbytes for array in jax.live_arrays())


def _tree_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _trained_and_frozen(trainer, state) -> tuple[Any, Any]:
    """The state's trained parameters and every frozen parameter the trainer holds."""
    trained = [state.params, getattr(state, "value_params", None)]
    frozen = [trainer.frozen]
    if hasattr(trainer, "bases"):
        frozen.append(trainer.bases)
    else:
        frozen.append(trainer.base_params)
    unique = {id(leaf): leaf for leaf in jax.tree.leaves(frozen)}  # the LoRA reference is the base itself
    return trained, list(unique.values())


class Workload:
    """One mode of one algorithm, built and ready to step."""

    def __init__(self, algorithm: str, rank: int, out: pathlib.Path, steps: int):
        self.algorithm, self.rank = algorithm, rank
        self.config = workload_config(algorithm, rank, out)
        before = _live_bytes()
        self.mesh = sharding.make_mesh(self.config.mesh)
        prepared = pipeline.prepare_data(self.config.data)
        self.trainer = loop.trainer_for(self.config, self.mesh, steps, train_data=prepared)
        self.state = jax.block_until_ready(self.trainer.init_state())
        self.resident_bytes = _live_bytes() - before
        host = next(pipeline.make_iterator(prepared, self.config.data))
        self.batch = sharding.host_local_to_global(host, self.mesh)
        self.calls = 0

    def step(self) -> None:
        result = self.trainer.train_step(self.state, self.batch, jax.random.key(self.calls), step=self.calls + 1)
        self.state = jax.block_until_ready(result.state)
        self.calls += 1

    def figures(self) -> dict[str, Any]:
        trained, frozen = _trained_and_frozen(self.trainer, self.state)
        opt = [self.state.opt_state, getattr(self.state, "value_opt_state", None)]
        plan = planner.plan_run(self.config, topology.resolve_target("local"))
        largest = max(plan.programs, key=lambda p: p.peak_bytes)
        return {
            "algorithm": self.algorithm,
            "mode": f"LoRA r={self.rank}" if self.rank else "full",
            "trained_params": lora.count(trained),
            "held_params": lora.count(trained) + lora.count(frozen),
            "optimizer_state_bytes": _tree_bytes(opt),
            "resident_bytes": self.resident_bytes,
            "peak_bytes": largest.peak_bytes,
            "peak_program": largest.name,
        }


def measure(args: argparse.Namespace, out: pathlib.Path, algorithms: Sequence[str] = ("dpo", "ppo")) -> list[dict]:
    rows = []
    for algorithm in algorithms:
        pair = [Workload(algorithm, rank, out, steps=1000) for rank in (0, args.rank)]
        for workload in pair:  # compile, and leave the first steps' warm-up behind
            for _ in range(2):
                workload.step()
        timing = common.time_interleaved(
            [workload.step for workload in pair],
            rounds=args.rounds,
            repeats=args.steps,
            measure_peak=lambda: common.matmul_peaks(size=1024, repeats=2),
        )
        for index, workload in enumerate(pair):
            rows.append({**workload.figures(), "step_time": timing.timing(index).as_dict()})
        del pair
    return rows


def predict(jobs: int) -> list[dict[str, Any]]:
    """``easyppo plan`` of each predicted workload, full and LoRA, each in its own process."""
    lora_flags = ("--config.model.lora.rank=16", "--config.model.param_dtype=bfloat16")
    rows = []
    todo = []
    for workload, preset, tpu, flags in PREDICTED:
        for mode, extra in (("full", ()), ("LoRA r=16", lora_flags)):
            more = ("--config.ppo.value_model.lora.rank=16", "--config.ppo.value_model.param_dtype=bfloat16")
            extra = extra + (more if preset.startswith("ppo") and extra else ())
            todo.append((workload, mode, pod_plans.Row(workload, preset, tpu, (*flags, *extra, "--no_suggest"))))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for (workload, mode, row), result in zip(todo, pool.map(pod_plans.plan_row, [t[2] for t in todo])):
            plan = result.get("plan")
            entry = {"workload": workload, "mode": mode, "slice": row.topology, "seconds": result["seconds"]}
            if plan is None:
                entry["error"] = result.get("error", "")
            else:
                largest = max(plan["programs"], key=lambda p: p["peak_bytes"])
                entry.update(
                    chips=plan["devices"],
                    fits=plan["fits"],
                    peak_bytes=largest["peak_bytes"],
                    peak_program=largest["name"],
                    # a program the compiler refused reports only the temporaries it asked for
                    refused=bool(largest["error"]),
                    hbm_bytes=largest.get("hbm_bytes"),
                )
            print(f"{workload} {mode} on {row.topology}: {entry.get('fits', entry.get('error'))}", file=sys.stderr)
            rows.append(entry)
    return rows


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


MEASURED_COLUMNS = (
    common.Column("algorithm", lambda r: r["algorithm"]),
    common.Column("mode", lambda r: r["mode"]),
    common.Column("trained params", lambda r: f"{r['trained_params']:,}"),
    common.Column("held params", lambda r: f"{r['held_params']:,}"),
    common.Column("optimizer MiB", lambda r: _mib(r["optimizer_state_bytes"])),
    common.Column("resident MiB", lambda r: _mib(r["resident_bytes"])),
    common.Column("peak MiB (program)", lambda r: f"{_mib(r['peak_bytes'])} ({r['peak_program']})"),
    common.Column("step ms", lambda r: f"{1e3 * r['step_time']['median_s']:.0f}"),
)
PREDICTED_COLUMNS = (
    common.Column("workload", lambda r: r["workload"]),
    common.Column("slice", lambda r: r["slice"]),
    common.Column("mode", lambda r: r["mode"]),
    common.Column(
        "peak GiB/chip",
        lambda r: (">= " if r.get("refused") else "") + _gib(r.get("peak_bytes")) if r.get("chips") else "-",
    ),
    common.Column("program", lambda r: r.get("peak_program", r.get("error", ""))),
    common.Column("fits", lambda r: {True: "yes", False: "no", None: "-"}[r.get("fits")]),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the measured runs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--predict", action="store_true", help="plan 8B/13B/70B on TPU slices instead (slow)")
    parser.add_argument("--jobs", type=int, default=2, help="plans compiled at once with --predict")
    parser.add_argument("--json_out", default="", help="also write the JSON report here")
    args = parser.parse_args(argv)
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.predict:  # the slow half alone; the measured half is kept from the last run
        measured, predicted = stored.get("measured", []), predict(args.jobs)
    else:
        with tempfile.TemporaryDirectory(prefix="easyppo-lora-bench-") as scratch:
            measured, predicted = measure(args, pathlib.Path(scratch)), stored.get("predicted", [])
    report = {
        "benchmark": "lora_savings",
        "command": " ".join(["python -m benchmarks.lora_savings", *(argv or sys.argv[1:])]),
        "machine": common.machine_info(),
        "model": MODEL,
        "measured": measured,
        "predicted": predicted,
        "versions": pod_plans.versions(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    table = common.format_table(measured, MEASURED_COLUMNS) if measured else ""
    if predicted:
        table += "\n\n" + common.format_table(predicted, PREDICTED_COLUMNS)
    common.emit(report, table, json_out=args.json_out or None)
    return report


if __name__ == "__main__":
    main()

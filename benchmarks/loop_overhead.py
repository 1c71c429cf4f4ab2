"""What the train loop costs on top of the bare jitted step: steps per second of both, in one process.

    python benchmarks/loop_overhead.py [--steps 200] [--repeats 3] [--json_out PATH]

* **bare**: the library's trainer (``loop.trainer_for``) stepping through batches already placed on
  the devices, blocked on once at the end: the device-bound rate of this model and batch.
* **loop**: ``loop.train`` on the same config and data, timed from its metrics log (the ``wall_time``
  of the first and last logged steps), so data preparation, compilation, the final checkpoint and the
  export are excluded and everything the loop does per step is included: reading and placing the
  batch, dispatching, reading results, logging, checkpoint decisions, preemption checks.

The model is the demo's tiny SFT model (a few milliseconds per step on a CPU), where any host time
the loop spends per step shows. overhead = bare steps/s / loop steps/s - 1. Prints one JSON line and
a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax

from benchmarks import common
from easyppo.configs import sft as sft_presets
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.run import config as run_config
from easyppo.run import loop


def build_config(out: pathlib.Path, *, steps: int, log_every: int) -> object:
    """The demo SFT preset, run for ``steps`` steps into ``out``, logging every ``log_every`` steps."""
    c = sft_presets.get_config("demo")
    c.output_dir = str(out)
    c.train.export_hf_dir = ""
    c.train.num_steps = steps
    c.data.num_epochs = None  # repeat the data: the run is as long as --steps
    c.train.log_every_steps = log_every
    c.eval.path = ""
    c.checkpoint.save_every_steps = 10 * steps  # only the final save, which the timing excludes
    c.data.cache_dir = str(out / "cache")
    c.logging.progress_bar = False
    return c


def bare_steps_per_second(config, steps: int) -> float:
    """The trainer's own step over device-resident batches, timed as one block of ``steps`` steps."""
    config = run_config.resolve_paths(config)
    mesh = sharding.make_mesh(config.mesh)
    trainer = loop.trainer_for(config, mesh, steps)
    data = pipeline.prepare_data(config.data)
    iterator = pipeline.make_iterator(data, config.data)
    batches = [sharding.host_local_to_global(next(iterator), mesh) for _ in range(min(steps, 16))]
    state = trainer.init_state()
    rng = jax.random.key(0)
    state = jax.block_until_ready(trainer.train_step(state, batches[0], rng, step=0).state)  # compile
    start = time.perf_counter()
    for step in range(steps):
        state = trainer.train_step(state, batches[step % len(batches)], rng, step=step).state
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - start)


def loop_steps_per_second(config) -> float:
    """``loop.train``'s rate between its first and last logged steps (its metrics log's wall times)."""
    loop.train(config)
    log = pathlib.Path(config.output_dir) / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) / (last["wall_time"] - first["wall_time"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="steps per measurement")
    p.add_argument("--log_every", type=int, default=10, help="the loop's train.log_every_steps")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each, alternating")
    p.add_argument("--json_out", default="", help="also write the JSON line here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    bare, looped = [], []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            out = pathlib.Path(root) / f"run{repeat}"
            bare.append(bare_steps_per_second(build_config(out / "bare", steps=args.steps, log_every=10), args.steps))
            looped.append(loop_steps_per_second(build_config(out / "loop", steps=args.steps, log_every=args.log_every)))
    bare_median, loop_median = statistics.median(bare), statistics.median(looped)
    report = {
        "benchmark": "loop_overhead",
        "steps": args.steps,
        "log_every_steps": args.log_every,
        "bare_steps_per_second": bare,
        "loop_steps_per_second": looped,
        "bare_median": bare_median,
        "loop_median": loop_median,
        "overhead": bare_median / loop_median - 1.0,
        "machine": common.machine_info(),
    }
    rows = [
        ("bare jitted step", f"{bare_median:.1f}", ", ".join(f"{x:.1f}" for x in bare)),
        ("loop.train", f"{loop_median:.1f}", ", ".join(f"{x:.1f}" for x in looped)),
    ]
    print("| what | steps/s (median) | all |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"loop overhead: {report['overhead']:+.1%} (bare / loop - 1)")
    line = json.dumps(report)
    print(line)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(line + "\n")
    return report


if __name__ == "__main__":
    main()

"""A compiled program's footprint and cost per device, and a run's plan made of its programs.

Memory comes from XLA: ``memory_analysis()`` gives the bytes of arguments, outputs, temporaries and
donated (aliased) buffers the compiled program needs on each device, and the peak while it runs is
arguments + outputs + temporaries - aliased (a donated argument's buffer is reused for an output).
This is exact: tests/test_plan.py checks it against the programs a real run compiles.

Time comes from the analytic work (``easyppo.plan.work``) on the chip's roofline, because XLA's
``cost_analysis()`` counts a loop body once (scanned layers, the decode loop); its figures are kept
in the report (``xla_flops``, ``xla_bytes_accessed``) for programs without loops.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from easyppo.plan.chips import ChipSpec
from easyppo.plan.work import Work


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One program. ``per_iteration``: it runs every iteration (False: once per pass over the data)."""

    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    xla_flops: float
    xla_bytes_accessed: float
    work: Work = Work()
    per_iteration: bool = True
    error: str = ""  # why the program has no memory plan (the compiler refused it); "" when it has one

    @property
    def peak_bytes(self) -> int:
        """Bytes live at once on a device; for a refused program, what the compiler said it needs."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def roofline_seconds(self, chip: ChipSpec, num_devices: int) -> float | None:
        """The larger of the per-device compute time at peak and the streaming time at full bandwidth."""
        return chip.roofline_seconds(self.work.flops / num_devices, self.work.bytes_per_device)

    def fits(self, chip: ChipSpec) -> bool:
        return not self.error and self.peak_bytes <= chip.hbm_bytes

    def as_dict(self, chip: ChipSpec | None = None, num_devices: int = 1) -> dict[str, Any]:
        row = {
            "name": self.name,
            "per_iteration": self.per_iteration,
            "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes,
            "temp_bytes": self.temp_bytes,
            "alias_bytes": self.alias_bytes,
            "peak_bytes": self.peak_bytes,
            "model_flops": self.work.flops,
            "streamed_bytes_per_device": self.work.bytes_per_device,
            "xla_flops": self.xla_flops,
            "xla_bytes_accessed": self.xla_bytes_accessed,
            "error": self.error,
        }
        if chip is not None:
            row |= {
                "hbm_bytes": chip.hbm_bytes,
                "margin_bytes": chip.hbm_bytes - self.peak_bytes,
                "fits": self.fits(chip),
                "roofline_s": self.roofline_seconds(chip, num_devices),
            }
        return row


# The TPU compiler's refusal: "... the total memory required for HLO temporaries (119.91G) exceeds
# available HBM (95.74G)." The first figure is what the program needs beyond its arguments.
_REQUIRED = re.compile(r"required for [^(]*\(([0-9.]+)([KMGT])\)")


def refused_report(
    name: str, error: Exception | str, work: Work | None = None, *, per_iteration: bool = True
) -> ProgramReport:
    """The report of a program the compiler refused (out of memory) or that was never compiled."""
    message = " ".join(str(error).split())
    match = _REQUIRED.search(message)
    needed = int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024) if match else 0
    return ProgramReport(name, 0, 0, needed, 0, 0.0, 0.0, work or Work(), per_iteration, error=message[:300])


def report_of(name: str, compiled: Any, work: Work | None = None, *, per_iteration: bool = True) -> ProgramReport:
    """The report of a ``jax.stages.Compiled`` program, with its analytic ``work``."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return ProgramReport(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        xla_flops=float(cost.get("flops", 0.0)),
        xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        work=work or Work(),
        per_iteration=per_iteration,
    )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's programs on a target, with what one iteration costs and whether it fits.

    ``tokens_per_iteration``: the tokens one iteration processes (prompt and response tokens of every
    row; a preference pair counts both responses). ``settings``: the config values the plan used
    that a user would change (mesh, accumulation, remat), for the table.
    """

    target: str
    num_devices: int
    num_hosts: int
    chip: ChipSpec | None
    programs: tuple[ProgramReport, ...]
    tokens_per_iteration: int
    settings: dict[str, Any]

    @property
    def peak_bytes(self) -> int:
        """The largest peak of any program: they run one after another."""
        return max(program.peak_bytes for program in self.programs)

    @property
    def fits(self) -> bool | None:
        return None if self.chip is None else all(program.fits(self.chip) for program in self.programs)

    @property
    def iteration_seconds(self) -> float | None:
        """The roofline time of one iteration: the sum over the programs every iteration runs."""
        if self.chip is None or not self.chip.has_speed:
            return None
        return sum(p.roofline_seconds(self.chip, self.num_devices) for p in self.programs if p.per_iteration)

    @property
    def tokens_per_second(self) -> float | None:
        seconds = self.iteration_seconds
        return None if not seconds else self.tokens_per_iteration / seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "chip": self.chip.name if self.chip else None,
            "devices": self.num_devices,
            "hosts": self.num_hosts,
            "settings": self.settings,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "iteration_s": self.iteration_seconds,
            "tokens_per_iteration": self.tokens_per_iteration,
            "tokens_per_s": self.tokens_per_second,
            "programs": [program.as_dict(self.chip, self.num_devices) for program in self.programs],
        }

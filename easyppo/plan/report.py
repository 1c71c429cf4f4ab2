"""One compiled program's footprint and cost, per device, from XLA's own analyses.

``memory_analysis()`` gives the bytes of arguments, outputs, temporaries and donated (aliased)
buffers the compiled program needs on each device; ``cost_analysis()`` its FLOPs and bytes accessed
(per device, as XLA partitioned it). Peak device memory while the program runs is taken as
arguments + outputs + temporaries - aliased: a donated argument's buffer is reused for an output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from easyppo.plan.chips import ChipSpec


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def roofline_seconds(self, chip: ChipSpec) -> float:
        return chip.roofline_seconds(self.flops, self.bytes_accessed)

    def fits(self, chip: ChipSpec) -> bool:
        return self.peak_bytes <= chip.hbm_bytes

    def as_dict(self, chip: ChipSpec | None = None) -> dict[str, Any]:
        row = dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes}
        if chip is not None:
            row |= {
                "hbm_bytes": chip.hbm_bytes,
                "margin_bytes": chip.hbm_bytes - self.peak_bytes,
                "fits": self.fits(chip),
                "roofline_s": self.roofline_seconds(chip),
            }
        return row


def report_of(name: str, compiled: Any) -> ProgramReport:
    """The report of a ``jax.stages.Compiled`` program."""
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
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
    )

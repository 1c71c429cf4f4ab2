"""The devices a plan compiles for: a real TPU topology (``v5p:4x4x8``) or this machine's own devices.

A TPU topology is described by ``libtpu`` (the ``plan`` extra) without any TPU attached:
``jax.experimental.topologies`` returns its devices, grouped into hosts, and programs compiled for a
mesh over them go through the real TPU compiler, SPMD partitioner included.
"""

from __future__ import annotations

import dataclasses

import jax

from easyppo.plan.chips import ChipSpec, chip_named

INSTALL_HINT = "pip install 'easyppo[plan]' (libtpu, matching the installed jax)"


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: the devices, how many hosts drive them, and the chip (None: this machine's)."""

    name: str
    devices: tuple[jax.Device, ...]
    num_hosts: int
    chip: ChipSpec | None


def resolve_target(name: str) -> Target:
    """``"local"``: this machine's devices; ``"<generation>:<shape>"``: that TPU topology."""
    if name == "local":
        devices = tuple(jax.devices())
        return Target(name, devices, jax.process_count(), None)
    chip = chip_named(name)
    try:
        from jax.experimental import topologies

        megacore = {"chip_config_name": "megacore"} if chip.megacore else {}
        description = topologies.get_topology_desc(platform="tpu", topology_name=name, **megacore)
    except (ImportError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise RuntimeError(f"--topology={name}: TPU topologies need libtpu: {INSTALL_HINT} ({detail})") from e
    devices = tuple(description.devices)
    hosts = len({device.process_index for device in devices})
    return Target(name, devices, hosts, chip)


def with_chip(target: Target, chip: ChipSpec) -> Target:
    """``target`` planned against ``chip`` (another memory budget, ``chips.with_memory``)."""
    return dataclasses.replace(target, chip=chip)

"""Process start-up for multi-host runs: whether to call ``jax.distributed.initialize``, and what it gave.

A TPU pod slice or a multi-node GPU job runs the same command on every host. Each host is one JAX
process driving its local devices; ``jax.distributed.initialize()`` connects the processes so that
``jax.devices()`` lists every device of the job and each host can feed its shard of the global batch.
It has to run before anything touches a JAX backend, exactly once, and only in a multi-process job:
a single process (a laptop, CI, one GPU or TPU VM) has no coordinator to connect to.

This is command-line code. The entry point calls :func:`initialize` first thing, with the mode from
the command line or from ``EASYPPO_DISTRIBUTED``; library code never reads the environment.

Modes:

* ``never``: a single process; ``jax.distributed`` is not started.
* ``always``: start it. Arguments come from the manual variables below when set, otherwise from
  JAX's own cluster detection (Cloud TPU metadata server, SLURM, Open MPI, GKE). ``launch/tpu_run.sh``
  uses this mode on TPU VM pod slices.
* ``auto`` (the default): start it only when the environment says this process is one of several.
  The signals, in the order they are checked (all but the ``EASYPPO_`` ones are what JAX's own
  detection reads, so a signal found here is one JAX can act on):

  - ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), for a hand-made cluster, with
    ``EASYPPO_NUM_PROCESSES`` and ``EASYPPO_PROCESS_ID`` (when unset, JAX's detection finds them);
  - Open MPI (``mpirun``): ``OMPI_MCA_orte_hnp_uri`` with ``OMPI_COMM_WORLD_SIZE`` > 1;
  - SLURM (``srun``): ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_PROCID``, ``SLURM_LOCALID``
    with ``SLURM_NTASKS`` > 1;
  - GKE TPU node pools: ``TPU_PROCESS_ADDRESSES`` (else ``TPU_WORKER_HOSTNAMES``) listing more than
    one host, or ``MEGASCALE_NUM_SLICES`` > 1.

  A TPU VM slice made with ``gcloud compute tpus tpu-vm create`` publishes its topology only through
  the GCE metadata server, which ``auto`` does not query (it stays free of network calls, so a CPU
  test or a laptop never waits on one); run pods with ``launch/tpu_run.sh`` or set
  ``EASYPPO_DISTRIBUTED=always``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import socket
from collections.abc import Mapping

import jax

logger = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
MODE_ENV_VAR = "EASYPPO_DISTRIBUTED"
NUM_PROCESSES_ENV_VAR = "EASYPPO_NUM_PROCESSES"
PROCESS_ID_ENV_VAR = "EASYPPO_PROCESS_ID"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedConfigError(ValueError):
    """A bad ``EASYPPO_DISTRIBUTED`` mode or cluster environment variable; the message names it."""


@dataclasses.dataclass(frozen=True)
class ClusterSignal:
    """What the environment says about the job: one process or several, and why.

    ``coordinator_address``, ``num_processes`` and ``process_id`` are set only for a hand-made
    cluster (``JAX_COORDINATOR_ADDRESS``); otherwise ``jax.distributed.initialize`` detects them.
    """

    multi_process: bool
    reason: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job, as JAX sees it after start-up."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str
    hostname: str
    distributed: bool  # jax.distributed is running
    reason: str  # why it was (or was not) started


def detect_cluster(environ: Mapping[str, str]) -> ClusterSignal:
    """Reads the multi-process signals listed in the module docstring; no network calls."""
    manual = _manual_cluster(environ)
    if manual is not None:
        return manual
    if "OMPI_MCA_orte_hnp_uri" in environ:
        size = _int_var(environ, "OMPI_COMM_WORLD_SIZE", default=1)
        if size > 1:
            return ClusterSignal(True, f"Open MPI (OMPI_COMM_WORLD_SIZE={size})")
    if all(name in environ for name in _SLURM_VARS):
        tasks = _int_var(environ, "SLURM_NTASKS", default=1)
        if tasks > 1:
            return ClusterSignal(True, f"SLURM (SLURM_NTASKS={tasks})")
    # JAX reads TPU_PROCESS_ADDRESSES when set, else TPU_WORKER_HOSTNAMES.
    hosts_var = next((name for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if name in environ), None)
    if hosts_var is not None:
        hosts = [host for host in environ[hosts_var].split(",") if host.strip()]
        if len(hosts) > 1:
            return ClusterSignal(True, f"TPU worker list ({hosts_var} has {len(hosts)} hosts)")
    slices = _int_var(environ, "MEGASCALE_NUM_SLICES", default=1)
    if slices > 1:
        return ClusterSignal(True, f"TPU multislice (MEGASCALE_NUM_SLICES={slices})")
    return ClusterSignal(False, "no multi-process signal in the environment")


def initialize(mode: str | None = None, *, environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Starts ``jax.distributed`` if ``mode`` asks for it (see the module docstring); safe to call twice.

    ``mode`` None reads ``EASYPPO_DISTRIBUTED`` (default ``auto``) from ``environ`` (default
    ``os.environ``). Must run before the first JAX computation or device query of the process.
    """
    environ = os.environ if environ is None else environ
    source = "mode"
    if mode is None:
        mode, source = environ.get(MODE_ENV_VAR, "auto"), MODE_ENV_VAR
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DistributedConfigError(
            f"{source}={mode!r} is not a distributed mode: use one of {', '.join(MODES)}{hint}"
        )

    if jax.distributed.is_initialized():
        reason = "already initialized"
    elif mode == "never":
        reason = f"not started ({source}=never)"
    else:
        signal = detect_cluster(environ)
        if mode == "auto" and not signal.multi_process:
            reason = f"not started: {signal.reason}"
        else:
            reason = signal.reason if signal.multi_process else "mode=always, JAX's cluster detection"
            jax.distributed.initialize(
                coordinator_address=signal.coordinator_address,
                num_processes=signal.num_processes,
                process_id=signal.process_id,
            )
    info = ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        platform=jax.default_backend(),
        hostname=socket.gethostname(),
        distributed=jax.distributed.is_initialized(),
        reason=reason,
    )
    logger.info("%s", host_line(info))
    return info


def host_line(info: ProcessInfo) -> str:
    """One line per host for the start-up log: grep the per-worker logs to see who joined."""
    return (
        f"host {info.hostname}: process {info.process_index} of {info.process_count}, "
        f"{info.local_device_count} local {info.platform} devices of {info.device_count}; "
        f"jax.distributed {'on' if info.distributed else 'off'} ({info.reason})"
    )


def _manual_cluster(environ: Mapping[str, str]) -> ClusterSignal | None:
    address = environ.get("JAX_COORDINATOR_ADDRESS") or None
    counts = {name: environ.get(name) for name in (NUM_PROCESSES_ENV_VAR, PROCESS_ID_ENV_VAR)}
    if address is None:
        given = [name for name, value in counts.items() if value is not None]
        if given:
            raise DistributedConfigError(
                f"{' and '.join(given)} set without JAX_COORDINATOR_ADDRESS=host:port of process 0"
            )
        return None
    num_processes = _int_var(environ, NUM_PROCESSES_ENV_VAR, default=None)
    process_id = _int_var(environ, PROCESS_ID_ENV_VAR, default=None)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"{PROCESS_ID_ENV_VAR}={process_id} must be in [0, {NUM_PROCESSES_ENV_VAR}={num_processes})"
        )
    return ClusterSignal(True, f"JAX_COORDINATOR_ADDRESS={address}", address, num_processes, process_id)


def _int_var(environ: Mapping[str, str], name: str, *, default: int | None) -> int | None:
    if name not in environ:
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedConfigError(f"environment variable {name}={environ[name]!r} is not an integer") from None

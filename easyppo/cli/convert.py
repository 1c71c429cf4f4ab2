"""``easyppo convert``: Hugging Face <-> easyppo model checkpoints, and a logit check.

Flags become calls into ``easyppo.weights`` (``model_checkpoint``, ``verify``); every host of a pod
runs the same command.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import jax
import ml_collections

from easyppo.core import files
from easyppo.core import sharding as sharding_lib
from easyppo.run import distributed
from easyppo.run.export_checkpoint import export_run_adapter, export_run_checkpoint
from easyppo.weights import hf_files, hub, run_directory
from easyppo.weights.hf_mapping import CAUSAL_LM_ARCHITECTURE, DTYPES, KINDS, SCORE_ARCHITECTURE
from easyppo.weights.model_checkpoint import convert_easyppo_to_hf, convert_hf_to_easyppo
from easyppo.weights.verify import VerifyResult, require_transformers, verify

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 2GiB, 500MB or 1000000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


# Default pass mark of ``verify``, relative to the largest |output| of transformers. float32 leaves only
# summation-order noise (~1e-6 relative on the test models); bfloat16 rounds the weights alone by
# ~0.4%, which after a few layers moves logits by a few percent on both sides.
DEFAULT_RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def parse_mesh(text: str) -> ml_collections.ConfigDict:
    """``"1,-1,1"`` -> a mesh config (data, fsdp, tensor); one size may be -1 (all remaining devices)."""
    parts = text.split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) != len(sharding_lib.MESH_AXES):
        raise argparse.ArgumentTypeError(
            f"expected {','.join(sharding_lib.MESH_AXES).upper()} sizes such as 1,-1,1, got {text!r}"
        )
    return ml_collections.ConfigDict(dict(zip(sharding_lib.MESH_AXES, sizes)))


def _print_verify(result: VerifyResult, tolerance: float | None) -> int:
    """Prints the summary and a pass/fail line; returns the exit code (1 when above the tolerance)."""
    if tolerance is None:
        relative = DEFAULT_RELATIVE_TOLERANCE[result.dtype]
        tolerance = relative * result.max_abs_reference
        rule = f"{tolerance:.3e} = {relative:g} x largest |{result.output_name}|"
    else:
        rule = f"{tolerance:g}"
    print(result.summary())
    ok = result.max_abs_diff <= tolerance
    print(f"{'OK' if ok else 'FAILED'}: {'within' if ok else 'above'} tolerance {rule}")
    return 0 if ok else 1


def _is_run(path: str) -> bool:
    """Whether ``path`` is a train run's checkpoint directory or an output directory holding one."""
    return run_directory.is_run_directory(path) or run_directory.is_run_directory(f"{path.rstrip('/')}/checkpoints")


def _to_hf(args: argparse.Namespace, mesh) -> tuple[str, list[str], str | None]:
    """Writes the export; returns (kind, weight files, the model checkpoint ``--verify`` compares the
    export with, or None for a train run, whose export is compared with transformers alone)."""
    if args.peft:
        if not _is_run(args.checkpoint_dir):
            raise ValueError(f"--peft: {args.checkpoint_dir} is not a train run (a LoRA run's adapter is exported)")
        if args.verify:
            raise ValueError("--peft: --verify compares whole models; check the adapter with peft itself")
        kind, files = export_run_adapter(args.checkpoint_dir, args.out_dir, step=args.step, mesh=mesh)
        return kind, files, None
    if _is_run(args.checkpoint_dir):
        # A run's export takes its pad id and tokenizer from the run itself.
        for flag in ("pad_token_id", "tokenizer_dir"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag}: {args.checkpoint_dir} is a train run, which names its own")
        _, kind, weight_files = export_run_checkpoint(
            args.checkpoint_dir,
            args.out_dir,
            step=args.step,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_size,
            mesh=mesh,
        )
        return kind, weight_files, None
    if args.step is not None:
        raise ValueError(f"--step: {args.checkpoint_dir} is a model checkpoint (one step), not a train run")
    _, kind, weight_files = convert_easyppo_to_hf(
        args.checkpoint_dir,
        args.out_dir,
        dtype=args.dtype,
        pad_token_id=args.pad_token_id,
        tokenizer_dir=args.tokenizer_dir,
        max_shard_bytes=args.max_shard_size,
        mesh=mesh,
    )
    return kind, weight_files, args.checkpoint_dir


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyppo convert",
        description="Convert LLaMA checkpoints between Hugging Face and easyppo, and check them against transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_easyppo = commands.add_parser("to-easyppo", help="HF directory -> easyppo model checkpoint")
    to_easyppo.add_argument("hf_dir", help="Hugging Face model directory (config.json + weights)")
    to_easyppo.add_argument("out_dir", help="new easyppo model checkpoint directory")
    to_easyppo.add_argument("--kind", choices=KINDS, help="default: causal_lm or reward, from config.json")
    to_easyppo.add_argument("--param_dtype", choices=DTYPES, help="default: the dtype the weights are stored in")
    to_easyppo.add_argument("--scan_layers", action="store_true", help="store the layers stacked, for scan_layers=True")
    to_easyppo.add_argument("--verify", action="store_true", help="afterwards, compare with transformers")

    to_hf = commands.add_parser("to-hf", help="easyppo model checkpoint or train run (any step) -> HF directory")
    for command in (to_easyppo, to_hf):
        command.add_argument(
            "--mesh",
            type=parse_mesh,
            metavar="DATA,FSDP,TENSOR",
            help="split the parameters over this mesh of every device (e.g. 1,-1,1: FSDP over all), so a "
            "model larger than one device's memory converts; default: the first local device",
        )
    to_hf.add_argument(
        "checkpoint_dir", help="easyppo model checkpoint, or a train run's output or checkpoint directory"
    )
    to_hf.add_argument("--step", type=int, help="a train run's step to export (default: its latest)")
    to_hf.add_argument("out_dir", help="new Hugging Face model directory")
    to_hf.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's parameter dtype")
    to_hf.add_argument("--pad_token_id", type=int, help="reward/value models: overrides the config's pad token id")
    to_hf.add_argument("--tokenizer_dir", help="copy tokenizer files from here (default: the checkpoint)")
    to_hf.add_argument(
        "--max_shard_size",
        type=parse_size,
        default=hf_files.DEFAULT_MAX_SHARD_BYTES,
        help="split the weights into files of at most this size (default 5GiB)",
    )
    to_hf.add_argument("--verify", action="store_true", help="afterwards, compare with transformers")
    to_hf.add_argument(
        "--peft", action="store_true", help="a LoRA run: write its adapter for peft (default: merged weights)"
    )
    to_hf.add_argument(
        "--push_to_hub",
        metavar="ORG/NAME[@BRANCH]",
        help="then upload the export to this hub repository (created if needed; token from $HF_TOKEN)",
    )
    to_hf.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")

    check = commands.add_parser("verify", help="compare easyppo's logits/scores with transformers'")
    check.add_argument("hf_dir", help="Hugging Face model directory (the reference)")
    check.add_argument("--checkpoint", help="easyppo model checkpoint to check (default: hf_dir converted in memory)")
    check.add_argument("--kind", choices=KINDS, help="default: from the checkpoint or config.json")
    for command in (check, to_easyppo, to_hf):
        command.add_argument(
            "--verbose", action="store_true", help="show the traceback of an error instead of its one-line summary"
        )
        group = command if command is check else command.add_argument_group("verification (with --verify)")
        dtype_flag = "--dtype" if command is check else "--verify_dtype"
        group.add_argument(
            dtype_flag,
            dest="verify_dtype",
            choices=DTYPES,
            default="float32",
            help="compute dtype of both models during the check (default float32)",
        )
        group.add_argument("--batch_size", type=int, default=4, help="random sequences (default 4)")
        group.add_argument("--seq_len", type=int, default=16, help="longest sequence (default 16)")
        group.add_argument("--seed", type=int, default=0, help="seed of the random tokens and lengths")
        group.add_argument(
            "--tolerance",
            type=float,
            help="max abs difference allowed (default: 1e-4 x the largest |output| in float32, 5e-2 in bfloat16)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyppo convert``; ``argv`` excludes the program name. Returns the exit code."""
    args = _build_parser().parse_args(argv)
    verify_options = dict(dtype=args.verify_dtype, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    try:
        if args.command == "verify" or getattr(args, "verify", False):
            require_transformers()  # before converting anything
        distributed.initialize()  # every host of a pod runs the same command (EASYPPO_DISTRIBUTED)
        mesh = sharding_lib.make_mesh(args.mesh) if getattr(args, "mesh", None) is not None else None
        if getattr(args, "hf_dir", None):  # read by safetensors and transformers, which need local files
            args.hf_dir = files.local_mirror(args.hf_dir)
        if args.command == "to-easyppo":
            config, kind = convert_hf_to_easyppo(
                args.hf_dir,
                args.out_dir,
                kind=args.kind,
                param_dtype=args.param_dtype,
                scan_layers=args.scan_layers,
                mesh=mesh,
            )
            print(
                f"wrote {kind} checkpoint {args.out_dir}: {config.num_params():,} parameters, "
                f"{config.param_dtype}, scan_layers={config.scan_layers}"
            )
            if args.verify:
                result = verify(args.hf_dir, checkpoint_dir=args.out_dir, **verify_options)
                return _print_verify(result, args.tolerance)
        elif args.command == "to-hf":
            destination = args.out_dir
            with files.staged_directory(destination) as args.out_dir:  # gs://: written locally, then uploaded
                kind, weight_files, reference = _to_hf(args, mesh)
                if args.verify:
                    result = verify(args.out_dir, checkpoint_dir=reference, kind=kind, **verify_options)
                architecture = CAUSAL_LM_ARCHITECTURE if kind == "causal_lm" else SCORE_ARCHITECTURE
                architecture = "peft LoRA adapter" if args.peft else architecture
                print(f"wrote {architecture} {destination}: {', '.join(weight_files)}")
                if args.verify and _print_verify(result, args.tolerance):
                    return 1  # a failed check publishes nothing
                if args.push_to_hub and jax.process_index() == 0:
                    url = hub.push_folder(args.out_dir, args.push_to_hub, private=args.private)
                    print(f"pushed to {url}")
        else:
            result = verify(args.hf_dir, checkpoint_dir=args.checkpoint, kind=args.kind, **verify_options)
            return _print_verify(result, args.tolerance)
    except (ImportError, OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0

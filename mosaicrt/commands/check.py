"""`mosaicrt check ARTIFACT_DIR`: the artifact's backends against the torch reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from mosaicrt.argtypes import nonneg_float
from mosaicrt.errors import InputError


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument(
        "--checkpoint", help="the source checkpoint (default: the one recorded at export)"
    )
    p.add_argument("--engine", help="also run this TensorRT engine (built from the artifact)")
    p.add_argument("--atol", type=nonneg_float, default=1e-4)
    p.add_argument("--rtol", type=nonneg_float, default=1e-3)


def main(args: argparse.Namespace) -> int:
    from mosaicrt.export.artifact import read_manifest
    from mosaicrt.runtime.check import run_check

    manifest, _ = read_manifest(args.artifact)
    checkpoint = args.checkpoint or manifest.get("source_checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InputError(
            f"the torch reference needs the checkpoint {args.artifact} was exported "
            f"from ({checkpoint or 'not recorded'} is not there): pass --checkpoint"
        )
    passed = run_check(args.artifact, checkpoint, args.atol, args.rtol, args.engine)
    against = "onnxruntime and tensorrt" if args.engine else "onnxruntime"
    print(
        f"check {'PASSED' if passed else 'FAILED'}: {against} vs torch reference "
        f"(atol {args.atol}, rtol {args.rtol})"
    )
    return 0 if passed else 1

"""`mosaicrt init DIR --preset P`: write a checkpoint: the trained demo model (`demo`), or random
Tab. 6 weights of a preset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mosaicrt.argtypes import seed
from mosaicrt.errors import InputError
from mosaicrt.outputs import atomic_dir, check_output_dir


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument(
        "--preset",
        required=True,
        help="demo (trained, byte-level, ~3.7M), or random weights: tiny, mini (~40M), "
        "small (~2B), large (~10B)",
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--dtype", help="fp32|fp16|bf16 on disk (default: the preset's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.model.checkpoint import demo_checkpoint, random_tensors, write_checkpoint
    from mosaicrt.model.config import normalize_dtype, parameter_count, preset

    config = preset(args.preset)
    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        raise InputError(f"{out} already holds a checkpoint: pass --force to overwrite it")
    check_output_dir(out, force=args.force, flag="DIR", what="checkpoint")
    n = parameter_count(config)
    if args.preset == "demo":
        config, tensors = demo_checkpoint()
        what = "trained weights"
    else:
        tensors, what = random_tensors(config, args.seed), f"seed {args.seed}"
    dtype = normalize_dtype(args.dtype) if args.dtype else config.torch_dtype
    print(
        f"initialising {args.preset} ({n / 1e6:,.1f}M parameters, {dtype}, {what}) -> {out}",
        file=sys.stderr,
    )
    with atomic_dir(out) as tmp:
        write_checkpoint(tensors, config, tmp, dtype, progress=n > 50_000_000)
    print(out)
    return 0

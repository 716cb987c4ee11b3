"""`mosaicrt init DIR --preset P`: write a checkpoint (random Tab. 6 weights of a preset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mosaicrt.errors import InputError


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--preset", required=True, help="tiny, mini (~40M), small (~2B) or large (~10B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="fp32|fp16|bf16 on disk (default: the preset's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
    from mosaicrt.model.config import normalize_dtype, parameter_count, preset

    config = preset(args.preset)
    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        raise InputError(f"{out} already holds a checkpoint: pass --force to overwrite it")
    dtype = normalize_dtype(args.dtype) if args.dtype else config.torch_dtype
    n = parameter_count(config)
    print(
        f"initialising {args.preset} ({n / 1e6:,.1f}M parameters, {dtype}, seed {args.seed}) "
        f"-> {out}",
        file=sys.stderr,
    )
    write_checkpoint(random_tensors(config, args.seed), config, out, dtype, progress=n > 50_000_000)
    print(out)
    return 0

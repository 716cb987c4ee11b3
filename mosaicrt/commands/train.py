"""`mosaicrt train OUT_DIR`: train a byte-level MMv2 on the CPU (the demo model's recipe)."""

from __future__ import annotations

import argparse
import sys

from mosaicrt.argtypes import positive_float, positive_int, seed
from mosaicrt.outputs import check_output_dir


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from mosaicrt.train.loop import TrainSettings

    d = TrainSettings()
    p.add_argument("out_dir", help="where the checkpoint, train_log.jsonl and loss.png go")
    p.add_argument("--preset", default="demo", help="model shape (default demo); byte-level")
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--seed", type=seed, default=d.seed, help="initialisation and data order")
    p.add_argument(
        "--data",
        action="append",
        help="text files or directories to train on (repeatable; default: the Python standard "
        "library's sources on this machine)",
    )
    p.add_argument("--batch", type=positive_int, default=d.batch, help="episodes per step")
    p.add_argument("--context", type=positive_int, default=d.context, help="tokens per episode")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    p.add_argument("--dtype", help="fp32|fp16|bf16: the saved weights (training runs in fp32)")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint in OUT_DIR")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.model.config import normalize_dtype, preset
    from mosaicrt.train.loop import TrainSettings, train

    out = check_output_dir(args.out_dir, inputs=args.data or [], force=args.force,
                           flag="OUT_DIR", what="training run")  # fmt: skip
    settings = TrainSettings(steps=args.steps, batch=args.batch, context=args.context,
                             lr=args.lr, seed=args.seed)  # fmt: skip
    dtype = normalize_dtype(args.dtype) if args.dtype else None
    train(out, preset(args.preset), settings, args.data, sys.stderr.isatty(), dtype)
    print(out)
    return 0

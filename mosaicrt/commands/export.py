"""`mosaicrt export CKPT -o ARTIFACT_DIR`: the ONNX step graph of a checkpoint."""

from __future__ import annotations

import argparse
import sys

from mosaicrt.argtypes import add_weight_check_arg, positive_int


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="fp32, fp16 or bf16: weights, their MatMuls and the stores (norms, key scan "
        "and softmax stay fp32); bf16 runs on TensorRT or CUDA, not the ORT CPU EP",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=4096,
        help="most tokens one sequence may hold at run time",
    )
    p.add_argument(
        "--last-only",
        action="store_true",
        help="emit logits of each row's last token only (no `score`)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    add_weight_check_arg(p)


def main(args: argparse.Namespace) -> int:
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.model.config import normalize_dtype

    out = export_artifact(
        args.checkpoint,
        args.output,
        dtype=normalize_dtype(args.dtype),
        max_context=args.max_context,
        last_only=args.last_only,
        progress=sys.stderr.isatty(),
        force=args.force,
        check_weights=not args.no_weight_check,
    )
    print(out)
    return 0

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
    p.add_argument(
        "--store-dtype",
        help="fp32, fp16, bf16, int8 or fp8 (e4m3): what the STM and LTM stores hold (default: "
        "--dtype); int8 and fp8 keep an fp32 scale per pair and head, read inside the retrieval",
    )
    p.add_argument(
        "--quantize",
        help="int4 or int8: weight-only block-wise quantization of every weight MatMul "
        "(ONNX Runtime MatMulNBits; lm_head included, embeddings stay in --dtype)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=32,
        help="weights per quantization scale along the input dimension: 32, 64 or 128",
    )
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    add_weight_check_arg(p)


def main(args: argparse.Namespace) -> int:
    from mosaicrt.errors import InputError
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.export.quantize import WeightQuantization
    from mosaicrt.model.config import STORE_DTYPE_ALIASES, normalize_dtype

    if args.quantize is None and args.block_size != 32:
        raise InputError("--block-size applies to --quantize: add --quantize int4 or int8")
    quantize = WeightQuantization(args.quantize, args.block_size) if args.quantize else None
    store_dtype = STORE_DTYPE_ALIASES.get(args.store_dtype, args.store_dtype)  # export checks it
    out = export_artifact(
        args.checkpoint,
        args.output,
        dtype=normalize_dtype(args.dtype),
        max_context=args.max_context,
        last_only=args.last_only,
        progress=sys.stderr.isatty(),
        force=args.force,
        check_weights=not args.no_weight_check,
        quantize=quantize,
        store_dtype=store_dtype,
    )
    print(out)
    return 0

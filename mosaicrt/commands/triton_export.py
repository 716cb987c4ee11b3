"""`mosaicrt triton-export MODEL_DIR -o REPO`: a Triton Inference Server model repository."""

from __future__ import annotations

import argparse

from mosaicrt.argtypes import add_weight_check_arg, positive_float, positive_int
from mosaicrt.runtime.backends import add_state_args, state_limits


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX artifact, TensorRT engine or checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="model repository to write")
    p.add_argument(
        "--backend",
        choices=["onnxruntime", "tensorrt", "torch"],
        help="default: the one the model directory is for",
    )
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-context",
        type=positive_int,
        help="tokens per sequence (default: the artifact's or engine's, 4096 for a checkpoint)",
    )
    p.add_argument("--instances", type=positive_int, default=1, help="model instances (processes)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per step")
    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=600.0,
        help="seconds before an idle sequence is freed",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    add_state_args(p)
    p.add_argument("--force", action="store_true", help="replace an existing repository")
    add_weight_check_arg(p)


def main(args: argparse.Namespace) -> int:
    from mosaicrt.runtime.serving.repository import export_repository

    home = export_repository(
        args.model,
        args.output,
        backend=args.backend,
        max_batch=args.max_batch,
        max_context=args.max_context,
        instances=args.instances,
        prefill_chunk=args.prefill_chunk,
        idle_timeout_s=args.idle_timeout,
        device=args.device,
        force=args.force,
        check_weights=not args.no_weight_check,
        **state_limits(args),
    )
    print(f"model repository: {args.output} (model `mosaicrt`: {home})")
    return 0

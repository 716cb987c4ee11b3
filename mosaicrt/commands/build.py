"""`mosaicrt build ARTIFACT_DIR -o ENGINE_DIR`: a TensorRT engine (same as build.py)."""

from __future__ import annotations

import argparse


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from mosaicrt.plugins.engine import add_build_args

    add_build_args(p)


def main(args: argparse.Namespace) -> int:
    from mosaicrt.plugins.engine import build_engine

    build_engine(
        args.artifact,
        args.output,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_chunk=args.max_chunk,
        target=args.target,
        timing_cache=args.timing_cache,
        force=args.force,
        weights=args.weights,
    )
    return 0

"""`mosaicrt bench latency|throughput|compare|serve`: the benchmarks of mosaicrt.bench, each with
its own options (`mosaicrt bench MODE --help`)."""

from __future__ import annotations

import argparse

MODES = {
    "latency": ("requests submitted together, timed per token", "mosaicrt.bench.batching"),
    "throughput": ("requests queued at once on --batch rows", "mosaicrt.bench.batching"),
    "compare": (
        "decode TPOT of several backends side by side, ratios vs torch eager",
        "mosaicrt.bench.decode",
    ),
    "serve": (
        "1 and N streaming clients through Triton Inference Server on loopback, against the "
        "same requests in process",
        "mosaicrt.bench.triton_server",
    ),
}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    import importlib

    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (help_text, module) in MODES.items():
        sub = modes.add_parser(mode, help=help_text, description=help_text)
        importlib.import_module(module).add_cli_args(sub)


def main(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(MODES[args.mode][1]).main(args)

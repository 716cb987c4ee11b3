"""`mosaicrt` command line: a thin dispatcher over the commands in mosaicrt.commands.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input (one line on stderr; --debug for a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mosaicrt import __version__
from mosaicrt.argtypes import Parser
from mosaicrt.entry import run_main

COMMANDS = {  # name -> (help, module with add_cli_args(parser) and main(args))
    "init": ("write a random-init checkpoint", "init"),
    "inspect": ("config, parameter count and memory plan", "inspect"),
    "export": ("export a checkpoint to an ONNX artifact", "export"),
    "build": ("build a TensorRT engine from an ONNX artifact", "build"),
    "ort-ops": ("build the native ONNX Runtime kernels of the mosaic ops", "ort_ops"),
    "triton-export": ("write a Triton Inference Server model repository", "triton_export"),
    "serve": ("run tritonserver on 127.0.0.1 for a model repository", "serve"),
    "bench": ("latency, throughput or backends compared", "bench"),
    "check": ("compare an artifact's backends with the torch reference", "check"),
    "score": ("logits of token arrays", "score"),
    "generate": ("generate tokens or text", "generate"),
    "train": ("train a byte-level model on the CPU (the demo model's recipe)", "train"),
    "eval": ("recall at long contexts, or bits per byte, through any backend", "eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mosaicrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mosaicrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, module_name) in COMMANDS.items():
        module = importlib.import_module(f"mosaicrt.commands.{module_name}")
        p = sub.add_parser(name, help=help_text)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad argument (one line, code 2)
        return int(exc.code or 0)
    return run_main(args.func, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())

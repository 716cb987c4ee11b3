"""How every entry point (the `mosaicrt` CLI, `python -m mosaicrt.bench.X`) runs its main: bad input
is one line on stderr and exit code 2, an unexpected failure one line and exit code 1, --debug shows
the traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from mosaicrt.argtypes import Parser
from mosaicrt.errors import MosaicError

Main = Callable[[argparse.Namespace], int]


def run_main(main: Main, args: argparse.Namespace, debug: bool = False) -> int:
    """main(args), its errors turned into one line and an exit code."""
    try:
        return main(args)
    except MosaicError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read stdout stopped (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # an unexpected failure: one line unless --debug
        if debug:
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def run_module(
    doc: str, add_cli_args: Callable[[argparse.ArgumentParser], None], main: Main
) -> int:
    """A module's `if __name__ == "__main__"`: its options, --debug, and run_main."""
    parser = Parser(description=doc.strip().splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_cli_args(parser)
    try:
        args = parser.parse_args()
    except SystemExit as exc:  # --help, or a bad argument (one line, code 2)
        return int(exc.code or 0)
    return run_main(main, args, args.debug)

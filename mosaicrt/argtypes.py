"""Argument types for the command line: every number is checked where it enters (finite, in
range, no silent default), and a bad one is one line, `error: argument --x: ...`, exit code 2."""

from __future__ import annotations

import argparse
import math
import re
import sys

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that start with `error:`; exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^64), got {value}")
    return value


SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'512MiB', '2 GiB', '1.5GB', '1048576' -> bytes; InputError for anything else."""
    from mosaicrt.errors import InputError

    match = SIZE.match(str(text))
    if not match:
        raise InputError(
            f"--state-memory {text!r} is not a size: give bytes, or a number with B, KiB, MiB, "
            "GiB (or KB, MB, GB), e.g. 512MiB"
        )
    number, unit = match.groups()
    size = int(float(number) * UNITS[(unit or "b").lower()])
    if size <= 0:
        raise InputError(f"--state-memory must be more than 0 bytes, got {text!r}")
    return size


def size(text: str) -> int:
    """Bytes, or a number with B, KiB, MiB, GiB (KB, MB, GB): --state-memory."""
    from mosaicrt.errors import InputError

    try:
        return parse_size(text)
    except InputError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes, or a number with B, KiB, MiB, GiB "
            "(or KB, MB, GB), e.g. 512MiB"
        ) from None


def nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def probability(text: str) -> float:
    """A top-p: in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive_int_list(text: str, example: str) -> list[int]:
    """Comma-separated positive integers; `example` is shown when there are none."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: give {example}")
    return [positive_int(p) for p in parts]


def context_list(text: str) -> list[int]:
    """Comma-separated positive token counts: 1024,4096."""
    return positive_int_list(text, "token counts, e.g. 1024,4096")


def count_list(text: str) -> list[int]:
    """Comma-separated positive counts: 100, or 100,100,32."""
    return positive_int_list(text, "counts, e.g. 100 or 100,100,32")


def optional_context_list(text: str) -> list[int]:
    """context_list, or "" for none."""
    return context_list(text) if text.strip() else []


def port(text: str) -> int:
    """A TCP port: 1-65535."""
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1-65535, got {value}")
    return value


def add_weight_check_arg(p: argparse.ArgumentParser) -> None:
    """--no-weight-check, for every command that loads weights."""
    p.add_argument(
        "--no-weight-check",
        action="store_true",
        help="skip the scan of every weight for NaN and inf at load (for huge checkpoints)",
    )

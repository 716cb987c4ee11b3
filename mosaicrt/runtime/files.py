"""The files the runtime reads and writes for the command line: token arrays (.npy), prompt and
result JSON lines, and an output that may be stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mosaicrt.errors import InputError, MosaicError


def read_token_array(path: str) -> np.ndarray:
    """An int64 [B, T] array of token ids from a .npy file."""
    if not Path(path).is_file():
        raise InputError(f"token file {path} does not exist")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a .npy array ({exc}): save int64 [B, T] with numpy.save")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"{path} holds {ids.dtype} values; token ids must be integers (int64 [B, T])"
        )
    if ids.ndim != 2:
        raise InputError(f"{path} has shape {list(ids.shape)}; expected [B, T] token ids")
    return ids.astype(np.int64)


def read_prompts(path: str) -> list[list[int] | MosaicError]:
    """One {"input_ids": [...]} per line; a bad line becomes that request's error."""
    if not Path(path).is_file():
        raise InputError(f"prompt file {path} does not exist")
    prompts: list[list[int] | MosaicError] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise TypeError
            prompts.append(ids)
        except (json.JSONDecodeError, KeyError, TypeError):
            prompts.append(InputError(f'{path} line {number} is not {{"input_ids": [int, ...]}}'))
    if not prompts:
        raise InputError(f"{path} has no prompts: write one JSON object per line")
    return prompts


class open_output:
    """A file to write, or stdout for '-'."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        self.fh = sys.stdout if self.path == "-" else open(self.path, "w")
        return self.fh

    def __exit__(self, *exc) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()

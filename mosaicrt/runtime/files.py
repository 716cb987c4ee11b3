"""The files the runtime reads for the command line: token arrays (.npy) and prompt JSON lines.
Whatever the bytes, a reader returns data or raises an InputError that names the file and what
is wrong with it; a bad JSON line becomes that request's error and keeps its place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mosaicrt.errors import InputError, MosaicError

INT64_MAX = np.iinfo(np.int64).max


def read_token_array(path: str) -> np.ndarray:
    """An int64 [B, T] array of token ids (B, T >= 1) from a .npy file."""
    if not Path(path).is_file():
        raise InputError(f"token file {path} does not exist")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(
            f"{path} is not a .npy array ({reason}): save int64 [B, T] with numpy.save"
        ) from None
    if not isinstance(ids, np.ndarray):  # an .npz archive loads as a dict of arrays
        ids.close()
        raise InputError(f"{path} is an .npz archive: save one int64 [B, T] array with numpy.save")
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"{path} holds {ids.dtype} values; token ids must be integers (int64 [B, T])"
        )
    if ids.ndim != 2:
        raise InputError(f"{path} has shape {list(ids.shape)}; expected [B, T] token ids")
    if 0 in ids.shape:
        raise InputError(
            f"{path} has shape {list(ids.shape)}: give at least one sequence of one token"
        )
    if ids.dtype == np.uint64 and int(ids.max()) > INT64_MAX:  # would wrap in int64
        raise InputError(f"{path} has token id {int(ids.max())}, beyond any vocabulary")
    return ids.astype(np.int64)


def read_prompts(path: str) -> list[list[int] | MosaicError]:
    """One {"input_ids": [...]} per line (UTF-8, a BOM allowed). Every line is one request: a
    line that is blank, not UTF-8 or not that object becomes that request's error."""
    if not Path(path).is_file():
        raise InputError(f"prompt file {path} does not exist")
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise InputError(f"{path} has no prompts: write one JSON object per line")
    return [parse_prompt(line, f"{path} line {number}") for number, line in enumerate(lines, 1)]


def parse_prompt(line: bytes, where: str) -> list[int] | MosaicError:
    """The token ids of one JSON line, or the InputError that says why there are none."""
    line = line.rstrip(b"\r")
    if not line.strip():
        return InputError(f'{where} is blank: write {{"input_ids": [int, ...]}} on every line')
    try:
        ids = json.loads(line.decode("utf-8"))["input_ids"]
    except UnicodeDecodeError:
        return InputError(f"{where} is not UTF-8 text")
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, RecursionError):
        return InputError(f'{where} is not {{"input_ids": [int, ...]}}')
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        return InputError(f'{where} is not {{"input_ids": [int, ...]}}')
    return ids

"""Training text that every machine already has: the Python standard library's sources.

Files are split into a training and a held-out part by a hash of their path (about one in ten is
held out), so evaluation filler is text the model never trained on. The recall episodes use `@`
and `?` as markers, so both bytes are removed from the text.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

from mosaicrt.errors import InputError

SPLITS = ("train", "heldout")
MARKERS = b"@?"  # reserved for facts and queries (mosaicrt.train.episodes)
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_files() -> list[Path]:
    """The standard library's .py files, tests and third-party packages left out, sorted."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts[:-1]))


def text_files(paths: list[str | Path]) -> list[Path]:
    """Files named, and text files (.py .txt .md .rst) under directories named, sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()]
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--data {path} does not exist: give text files or directories")
    if not files:
        raise InputError(f"--data {', '.join(map(str, paths))} holds no text files")
    return sorted(files)


def is_heldout(path: Path) -> bool:
    """About one file in ten, by a hash of its name and parent (stable across machines)."""
    key = f"{path.parent.name}/{path.name}".encode()
    return hashlib.sha256(key).digest()[0] % 10 == 0


def load_corpus(split: str, paths: list[str | Path] | None = None) -> bytes:
    """The split's text as bytes, files joined by blank lines, marker bytes removed."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: choose {' or '.join(SPLITS)}")
    return _load(split, tuple(map(str, paths or ())))


@functools.lru_cache(maxsize=4)
def _load(split: str, paths: tuple[str, ...]) -> bytes:
    files = text_files(list(paths)) if paths else default_files()
    chosen = [f for f in files if is_heldout(f) == (split == "heldout")]
    parts = []
    for f in chosen:
        data = f.read_bytes().translate(None, MARKERS)
        if data.strip():
            parts.append(data.strip(b"\n") + b"\n")
    text = b"\n".join(parts)
    if len(text) < 4096:
        raise InputError(
            f"the {split} split holds only {len(text)} bytes of text: give more with --data"
        )
    return text

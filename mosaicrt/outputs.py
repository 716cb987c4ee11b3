"""Safe outputs: every output location is checked before any work starts, and written to a
temporary file or directory beside it that is renamed into place only when complete, so a failed
or interrupted run leaves the old output (or nothing) and never a half-written one.

An output that is one of the command's inputs, or inside one (or that holds one), is refused; an
existing output directory (artifact, engine, repository, checkpoint) needs --force.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mosaicrt.errors import InputError


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def refuse_inputs(output: Path, inputs: list, flag: str) -> None:
    """An output may not be an input, inside one, or hold one."""
    for given in inputs:
        if given is not None and _overlaps(output, Path(given)):
            raise InputError(
                f"{flag} {output} would overwrite the input {given}: write the output elsewhere"
            )


def _check_parent(path: Path, flag: str) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: the directory {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: no permission to write in {parent}")


def check_output_file(path: str | Path, inputs: list = (), flag: str = "--output") -> Path:
    """A file to write (an existing one is replaced): its directory exists and is writable, it
    is not a directory and not an input. '-' (stdout) passes."""
    path = Path(path)
    if str(path) == "-":
        return path
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory: give a file name")
    _check_parent(path, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable")
    refuse_inputs(path, list(inputs), flag)
    return path


def check_output_dir(
    path: str | Path, inputs: list = (), force: bool = False, flag: str = "-o", what: str = "output"
) -> Path:
    """A directory to create (or, with force, replace): not a file, not an input, its parent
    writable, and if it already holds something, force must be given."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file: give a directory to write the {what} into")
    _check_parent(path, flag)
    refuse_inputs(path, list(inputs), flag)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{path} already exists: pass --force to replace the {what}")
    return path


def default_mode(mode: int) -> int:
    """`mode` less the process's umask: what open() or mkdir() would have given."""
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto it when the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode(0o666))  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: object, indent: int = 2) -> None:
    """`data` as JSON (one trailing newline) at `path`, written through atomic_file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside `path`; it replaces `path` when the block succeeds."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(0o777))  # mkdtemp makes it private (0700)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Huge pages for the memory an ONNX Runtime session streams at every decode step.

A CPU decode step reads all the weights once (ONNX Runtime's pre-packed copies, which it
allocates itself), and Linux backs them with 4 KiB pages unless asked otherwise. Each page costs a
TLB entry, and the hardware prefetchers stop at page boundaries, so the reads lose bandwidth.
`collapse_new_memory` moves the anonymous memory mapped while a session loads onto 2 MiB pages
(madvise MADV_COLLAPSE, Linux >= 6.1; MADV_HUGEPAGE before it, which lets the kernel's daemon do
it over time). `full` gives the state's buffers mappings of their own with MADV_HUGEPAGE: numpy
asks for huge pages for large arrays too, but fills them from memory the heap has freed, which is
on small pages already.

Elsewhere (another OS, a kernel without transparent huge pages) it does nothing. Both cost a copy
or a fault per page where the backend opens and allocates; `python -m mosaicrt.bench.ort_paths ART
--paths fused,fused-small-pages` measures what they save (README, Native ONNX Runtime kernels).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # linux/mman.h
Range = tuple[int, int]  # [start, end) addresses


def anonymous_ranges(maps: str = "/proc/self/maps") -> list[Range]:
    """The process's private writable memory that no file backs (the heap included)."""
    ranges = []
    with open(maps) as f:
        for line in f:
            fields = line.split()
            anonymous = len(fields) == 5 or fields[5] == "[heap]"
            if anonymous and fields[1].startswith("rw") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def new_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """The parts of `after` that no range of `before` covers (new mappings, grown ones)."""
    found = []
    for start, end in after:
        parts = [(start, end)]
        for lo, hi in before:
            parts = [
                piece
                for a, b in parts
                for piece in ((a, min(b, lo)), (max(a, hi), b))
                if piece[0] < piece[1]
            ]
        found += parts
    return found


def whole_huge_pages(ranges: list[Range]) -> list[Range]:
    """Each range shrunk to the 2 MiB pages it holds whole (dropped when it holds none)."""
    out = []
    for start, end in ranges:
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            out.append((lo, hi))
    return out


def advise(ranges: list[Range]) -> int:
    """Collapses each range onto huge pages (else marks it for them); the bytes collapsed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in ranges:
        if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
        else:  # an older kernel, or pages it cannot move now
            libc.madvise(start, end - start, MADV_HUGEPAGE)
    return collapsed


@contextmanager
def collapse_new_memory() -> Iterator[list[int]]:
    """Within the block, nothing; after it, the anonymous memory mapped in the meantime moved
    onto huge pages. Yields a list that then holds the bytes collapsed."""
    collapsed: list[int] = []
    if not sys.platform.startswith("linux"):
        yield collapsed
        return
    try:
        before = anonymous_ranges()
    except OSError:  # no /proc
        yield collapsed
        return
    yield collapsed
    collapsed.append(advise(whole_huge_pages(new_ranges(before, anonymous_ranges()))))


def full(shape: tuple, value: float, dtype) -> np.ndarray:
    """np.full(shape, value, dtype) in a mapping of its own, on huge pages where the OS has them.
    (numpy asks for huge pages too, but fills a large array from memory the heap has freed, which
    is on small pages already.)"""
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.full(shape, value, dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    array = np.frombuffer(buffer, dtype, count).reshape(shape)  # its base keeps the mapping
    array.fill(value)
    return array

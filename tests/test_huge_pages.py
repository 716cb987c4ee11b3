"""runtime.huge_pages: the ranges it picks, and the pages Linux really gives."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from mosaicrt.runtime import huge_pages
from mosaicrt.runtime.huge_pages import HUGE_PAGE

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages (madvise or always)",
)


def huge_bytes(start: int, end: int) -> int:
    """AnonHugePages of the mapping that holds [start, end), from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields[0].split("-")) == 2 and ":" not in fields[0]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside = lo <= start and end <= hi
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    return 0


def test_new_ranges_are_what_no_earlier_range_covers():
    before = [(100, 200), (300, 400)]
    after = [(100, 250), (300, 400), (500, 600), (50, 450)]
    assert huge_pages.new_ranges(before, after) == [
        (200, 250),
        (500, 600),
        (50, 100),
        (200, 300),
        (400, 450),
    ]


def test_whole_huge_pages_shrinks_to_aligned_pages():
    ranges = [(1, 3 * HUGE_PAGE + 5), (HUGE_PAGE + 1, 2 * HUGE_PAGE), (0, HUGE_PAGE)]
    assert huge_pages.whole_huge_pages(ranges) == [(HUGE_PAGE, 3 * HUGE_PAGE), (0, HUGE_PAGE)]


def test_full_matches_numpy_and_is_writable():
    for shape, dtype in (((3, 5), np.float32), ((4, HUGE_PAGE // 8), np.float16)):
        array = huge_pages.full(shape, 1.5, dtype)
        assert array.shape == shape and array.dtype == dtype
        np.testing.assert_array_equal(array, np.full(shape, 1.5, dtype))
        array[0, 0] = 2.0
        assert array[0, 0] == 2.0


@needs_thp
def test_full_lies_on_huge_pages():
    array = huge_pages.full((8 * HUGE_PAGE // 4,), 0.0, np.float32)
    start = array.ctypes.data
    assert huge_bytes(start, start + array.nbytes) >= HUGE_PAGE


@needs_thp
def test_memory_mapped_in_the_block_ends_on_huge_pages():
    size = 8 * HUGE_PAGE
    with huge_pages.collapse_new_memory() as collapsed:
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.write(b"\1" * size)  # on small pages where THP is madvise-only
    start = np.frombuffer(buffer, np.uint8).ctypes.data
    if collapsed == [0]:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux >= 6.1)")
    assert collapsed[0] >= 6 * HUGE_PAGE  # the mapping's whole huge pages, and perhaps more
    assert huge_bytes(start, start + size) >= 6 * HUGE_PAGE
    assert buffer[:3] == b"\1\1\1"  # the contents moved with the pages


@needs_thp
def test_the_onnxruntime_state_lies_on_huge_pages(tiny_ckpt, tmp_path):
    """A CPU state's LTM pool (every layer's keys and values, one buffer) is on huge pages: the
    backend's stores come from `full`."""
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.runtime.ort_backend import OrtBackend

    artifact = export_artifact(tiny_ckpt, tmp_path / "onnx", max_context=2048)
    backend = OrtBackend(artifact, device="cpu")
    assert backend.huge_pages
    pool = backend.new_state(8, 2048).pairs["ltm"]
    assert pool.nbytes >= 4 * HUGE_PAGE
    start = pool.ctypes.data
    assert huge_bytes(start, start + pool.nbytes) >= 2 * HUGE_PAGE

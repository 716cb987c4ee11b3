"""What a host call costs right after a decode step's run. A batch-1 step of `mini` reads ~180 MB
of weights and stores through the caches, so the runtime's bookkeeping after it runs from DRAM:
each call pays for its own code and data, far more than its arithmetic. Each round runs the
session once before each call and times the call alone; the report gives medians over the
rounds. The runtime's decode path takes the cheaper form of each pair (graph_state.graph_step,
sampling.scan_rows, OrtBackend.staged), and with a fused last-only graph the scan its run made
(OrtBackend.scan_rows).

    python -m mosaicrt.bench.cold_calls ART --context 950 \\
        --json bench/results/ort_latency_cpu/cold_calls.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.decode import prefill
from mosaicrt.bench.machine import machine_info
from mosaicrt.export import io_spec
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.graph_state import STACKED_PRESENT
from mosaicrt.runtime.ort_backend import OrtBackend
from mosaicrt.runtime.sampling import scan_rows


def calls(backend: OrtBackend, state) -> dict[str, Callable[[], object]]:
    """The calls to time, by name: the decode path's choices beside what they replaced."""
    logits = backend.outputs[1][io_spec.LOGITS].reshape(1, -1)  # (1, V): one row, one token
    present, small = backend.outputs[1][STACKED_PRESENT], np.empty_like(state.small_block)
    ids, staged = np.array([[5]], np.int64), np.empty((1, 1), np.int64)
    pos, lengths, ends = np.array([950], np.int64), np.ones(1, np.int64), [951]
    scanned = {}  # a fused last-only graph's RowScan, read through the backend
    if io_spec.ROW_SCAN in backend.output_specs:
        buffer = backend.outputs[1][io_spec.LOGITS]
        scanned["backend.scan_rows (the run's RowScan)"] = lambda: backend.scan_rows(buffer)
    return {
        "nothing (the timer)": lambda: None,
        "logits max and min (numpy reductions)": lambda: (
            np.isfinite(logits.max(axis=-1)) & np.isfinite(logits.min(axis=-1))
        ).tolist(),
        "logits argmax (np.argmax)": lambda: np.argmax(logits, axis=-1).tolist(),
        "logits argmax (the method)": lambda: logits.argmax(axis=-1).tolist(),
        "scan_rows (argmax, argmin, their values)": lambda: scan_rows(logits),
        "isinstance of torch.Tensor": lambda: isinstance(logits, torch.Tensor),
        "isinstance of np.ndarray": lambda: isinstance(logits, np.ndarray),
        "ids by np.copyto": lambda: np.copyto(staged, ids, casting="unsafe"),
        "ids by assignment": lambda: staged.__setitem__(Ellipsis, ids),
        "positions += lengths (numpy add)": lambda: pos.__iadd__(lengths),
        "positions from a list of ends": lambda: pos.__setitem__(Ellipsis, ends),
        "furthest position: int(array.max())": lambda: int(pos.max()),
        "furthest position: max(array.tolist())": lambda: max(pos.tolist()),
        "present state copied into the past": lambda: small.__setitem__(Ellipsis, present),
    } | scanned


def time_calls(backend: OrtBackend, state, rounds: int) -> dict[str, float]:
    """Median microseconds of each call, each timed right after a run of the step graph."""
    token, one = np.ones((1, 1), np.int64), np.ones(1, np.int64)
    backend.step(token, one, state, True)  # binds the state, fills the output buffers
    host = backend.host_binding(state)
    named = calls(backend, state)
    times: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, call in named.items():
            backend.session.run_with_iobinding(host.binding)  # the same step again
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(seconds) for name, seconds in times.items()}


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    backend = OrtBackend(args.artifact, device="cpu")
    state = prefill(backend, args.context, args.context + 2, 512)
    medians = time_calls(backend, state, args.rounds)
    for name, us in medians.items():
        print(f"{name:45s} {us:8.1f} us")
    if args.json:
        write_json(args.json, {
            "benchmark": "cold_calls",
            "artifact": str(args.artifact),
            "ort_ops": backend.ort_ops,
            "context": args.context,
            "rounds": args.rounds,
            "median_us": medians,
            "machine": machine_info(),
        }, indent=1)  # fmt: skip
    return 0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="an ONNX artifact")
    p.add_argument("--context", type=positive_int, default=950, help="tokens before the step")
    p.add_argument("--rounds", type=positive_int, default=40)
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

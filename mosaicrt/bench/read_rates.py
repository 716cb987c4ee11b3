"""What one core and two read from memory, round after round: a plain sum over a 512 MiB buffer on
huge pages (torch, 1 and all threads) and a decode step's weight products alone (ONNX Runtime's
MatMul, MLAS's GEMV against its packed weights: 16 of `mini`'s 512 x 3072 matrices, on huge pages
as the backend keeps them; 1 and all intra-op threads), each the median of its repeats, all four
in every round. On a host whose memory speed moves from one minute to the next, the rounds show
whether a spell caps what all cores read together or what each core reads, and how near the GEMV
comes to the sum in each.

    python -m mosaicrt.bench.read_rates --rounds 16 --json bench/results/read_rates_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.huge_pages import collapse_new_memory, full
from mosaicrt.runtime.ort_backend import session_options

K, N, MATRICES = 512, 3072, 16  # 100.7 MB of weights, more than the last-level cache


def weights_session(threads: int):
    """An ONNX Runtime session of MATRICES MatMuls of one (1, K) row with (K, N) weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mosaicrt.onnx_graph import IR_VERSION, OPSET

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), f"w{i}")
        for i in range(MATRICES)
    ]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(MATRICES)],
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [
            helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N])
            for i in range(MATRICES)
        ],
        weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    with collapse_new_memory():  # its packed weights, as OrtBackend keeps them
        return ort.InferenceSession(
            model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
        )


def median_gb_s(fn, nbytes: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    cores = os.cpu_count() or 1
    buffer = torch.from_numpy(full((2**27,), 1.0, np.float32))  # 512 MiB
    x = np.ones((1, K), np.float32)
    sessions = {threads: weights_session(threads) for threads in (1, cores)}
    weight_bytes = K * N * 4 * MATRICES
    rounds = []
    for r in range(args.rounds):
        row = {}
        for threads in (1, cores):
            torch.set_num_threads(threads)
            row[f"sum_{threads}t_gb_s"] = median_gb_s(buffer.sum, buffer.numel() * 4, 5)
            row[f"gemv_{threads}t_gb_s"] = median_gb_s(
                lambda s=sessions[threads]: s.run(None, {"x": x}), weight_bytes, args.repeats
            )
        torch.set_num_threads(cores)
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k[:-5]} {v:.1f}" for k, v in row.items()) + " GB/s",
              flush=True)  # fmt: skip
        time.sleep(args.pause)
    result = {
        "benchmark": "read_rates",
        "weights": {"k": K, "n": N, "matrices": MATRICES, "bytes": weight_bytes},
        "rounds": rounds,
        "machine": machine_info(),
    }
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=15, help="GEMV runs per measure")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between rounds")
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

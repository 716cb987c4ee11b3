"""What one core and two read from memory, round after round: a plain sum over a 512 MiB buffer on
huge pages (torch, 1 and all threads) and a decode step's weight products alone (bench.ort_ceiling's
`weights_run`: every weight MatMul of one `mini` row, MLAS's GEMV against its packed weights on huge
pages as the backend keeps them; 1 and all intra-op threads), each the median of its repeats, all
in every round. With the native library built (`mosaicrt ort-ops build`) the same products also
run as mosaic::RowMatMul (ops/ort_row_matmul.h), which streams each weight row by row as the sum
does, split into one range of rows per thread: how near a GEMV of the sum's access pattern comes
to the sum inside a session. On a host whose memory speed moves from one minute to the next, the
rounds show whether a spell caps what all cores read together or what each core reads, and how
near each GEMV comes to the sum in each.

    python -m mosaicrt.bench.read_rates --rounds 16 --json bench/results/read_rates_cpu.json
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.bench.ort_ceiling import median_ms, weights_run
from mosaicrt.model.config import preset
from mosaicrt.ops.ort_library import find_library
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.huge_pages import full

SUM_REPEATS = 5


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    cores = os.cpu_count() or 1
    buffer = torch.from_numpy(full((2**27,), 1.0, np.float32))  # 512 MiB
    readers = {"gemv": None} | ({"row": library} if (library := find_library()) else {})
    if library is None:
        print("no native library (mosaicrt ort-ops build): MLAS's GEMV only")
    weights = {
        (reader, threads): weights_run(preset("mini"), threads, row_matmul_library=lib)
        for reader, lib in readers.items()
        for threads in (1, cores)
    }
    weight_bytes = weights["gemv", 1][1]
    rounds = []
    for r in range(args.rounds):
        row = {}
        for threads in (1, cores):
            torch.set_num_threads(threads)
            ms = median_ms(buffer.sum, SUM_REPEATS, warmup=1)
            row[f"sum_{threads}t_gb_s"] = buffer.numel() * 4 / ms / 1e6
            for reader in readers:
                ms = median_ms(weights[reader, threads][0], args.repeats, warmup=1)
                row[f"{reader}_{threads}t_gb_s"] = weight_bytes / ms / 1e6
        torch.set_num_threads(cores)
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k[:-5]} {v:.1f}" for k, v in row.items()) + " GB/s",
              flush=True)  # fmt: skip
        time.sleep(args.pause)
    result = {
        "benchmark": "read_rates",
        "weight_bytes": weight_bytes,
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

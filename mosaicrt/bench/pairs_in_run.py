"""Who writes a step's new pairs into the stores, side by side on one artifact: the native ONNX
Runtime retrieval inside the run (OrtBackend's default, ort_library.APPEND_PAIRS), or the runtime
after it (pairs_in_run=False, as for the function bodies). Each round decodes the same requests
through the continuous batcher with each backend in turn (the order alternating between rounds),
and reports medians over the decode steps of the batcher's step, of the session.run inside it,
and of their difference: the runtime's bookkeeping.

    python -m mosaicrt.bench.pairs_in_run ART --rows 1 --prompt-len 1024 --new-tokens 160 \\
        --json bench/results/ort_latency_cpu/pairs_in_run_b1.json
"""

from __future__ import annotations

import argparse

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.batching import run_requests, step_overhead
from mosaicrt.bench.machine import machine_info
from mosaicrt.errors import BackendError
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.ort_backend import OrtBackend


def decode_medians(backend: OrtBackend, rows: int, prompt_len: int, new: int) -> dict:
    """Medians over the decode steps of `rows` requests (prompt_len tokens, `new` new ones):
    the batcher's step, the session.run in it, and the rest (batching.step_overhead)."""
    limits = RunLimits(max_batch=rows, max_context=prompt_len + new, prefill_chunk=512)
    prompts = [[3 + (i + j) % 250 for j in range(prompt_len)] for i in range(rows)]
    return step_overhead(run_requests(backend, prompts, new, limits).decode_steps)


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    backends = {flag: OrtBackend(args.artifact, device="cpu", pairs_in_run=flag)
                for flag in (True, False)}  # fmt: skip
    if not backends[True].pairs_in_run:
        raise BackendError(
            f"{args.artifact}: the native retrieval writes no pairs here (it needs the native "
            "ops, `mosaicrt ort-ops build`, and fp32 or fp16 stores)"
        )
    rounds = {"in_run": [], "by_runtime": []}
    for r in range(args.rounds):
        for flag in (True, False) if r % 2 == 0 else (False, True):
            result = decode_medians(backends[flag], args.rows, args.prompt_len, args.new_tokens)
            rounds["in_run" if flag else "by_runtime"].append(result)
            print(f"round {r}, pairs written {'in the run' if flag else 'by the runtime'}: "
                  f"step {result['step_ms']:.2f} ms, run {result['model_run_ms']:.2f} ms, "
                  f"bookkeeping {result['bookkeeping_ms']:.3f} ms", flush=True)  # fmt: skip
    result = {
        "benchmark": "pairs_in_run",
        "artifact": str(args.artifact),
        "rows": args.rows,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": rounds,
        "machine": machine_info(),
    }
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="an ONNX artifact with fp32 or fp16 stores")
    p.add_argument("--rows", type=positive_int, default=1)
    p.add_argument("--prompt-len", type=positive_int, default=1024)
    p.add_argument("--new-tokens", type=positive_int, default=160)
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

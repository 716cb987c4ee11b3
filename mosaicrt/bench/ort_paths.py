"""Ways of running one artifact through ONNX Runtime, side by side: the native kernels with each
layer's memories one node (fused; fused-state-after: the runtime copies the recurrence state
after the run instead of the run writing it in place; fused-small-pages: the weights and the
state on the OS's default pages, runtime.huge_pages) or the ops' kernels alone (native), the
retrieval writing each step's new pairs itself or the runtime after the run (native-pairs-after,
as for the function bodies), or the ops' function bodies (functions). Each round decodes the
same requests through the continuous batcher with every way in turn (the order reversed every
other round), and reports medians over the decode steps of the batcher's step, of the
session.run inside it, and of their difference: the runtime's bookkeeping.

    python -m mosaicrt.bench.ort_paths ART --paths fused,native --prompt-len 4064 \\
        --new-tokens 32 --json bench/results/ort_latency_cpu/fused_vs_native_4k.json
"""

from __future__ import annotations

import argparse

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.batching import run_requests, step_overhead
from mosaicrt.bench.machine import machine_info
from mosaicrt.errors import BackendError, InputError
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.ort_backend import OrtBackend

# OrtBackend's arguments for each way, and what the backend must report for it.
PATHS = {
    "fused": ({"ort_ops": "fused"}, True),
    "fused-state-after": ({"ort_ops": "fused", "present_in_run": False}, True),
    "fused-small-pages": ({"ort_ops": "fused", "huge_pages": False}, True),
    "native": ({"ort_ops": "native"}, True),
    "native-pairs-after": ({"ort_ops": "native", "pairs_in_run": False}, False),
    "functions": ({"ort_ops": "functions"}, False),
}


def decode_medians(backend: OrtBackend, rows: int, prompt_len: int, new: int) -> dict:
    """Medians over the decode steps of `rows` requests (prompt_len tokens, `new` new ones):
    the batcher's step, the session.run in it, and the rest (batching.step_overhead)."""
    limits = RunLimits(max_batch=rows, max_context=prompt_len + new, prefill_chunk=512)
    prompts = [[3 + (i + j) % 250 for j in range(prompt_len)] for i in range(rows)]
    return step_overhead(run_requests(backend, prompts, new, limits).decode_steps)


def open_paths(artifact: str, names: list[str]) -> dict[str, OrtBackend]:
    unknown = [name for name in names if name not in PATHS]
    if unknown or len(names) < 2:
        raise InputError(f"--paths: two or more of {', '.join(PATHS)}")
    backends = {}
    for name in names:
        kwargs, pairs_in_run = PATHS[name]
        backend = backends[name] = OrtBackend(artifact, device="cpu", **kwargs)
        if backend.pairs_in_run != pairs_in_run:
            raise BackendError(
                f"{artifact}: the native retrieval writes no pairs here (it needs fp32 or fp16 "
                "stores): compare native-pairs-after with functions"
            )
    return backends


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    backends = open_paths(args.artifact, args.paths.split(","))
    rounds: dict[str, list] = {name: [] for name in backends}
    for r in range(args.rounds):
        for name in list(backends) if r % 2 == 0 else reversed(backends):
            result = decode_medians(backends[name], args.rows, args.prompt_len, args.new_tokens)
            rounds[name].append(result)
            print(f"round {r}, {name}: step {result['step_ms']:.2f} ms, run "
                  f"{result['model_run_ms']:.2f} ms, bookkeeping "
                  f"{result['bookkeeping_ms']:.3f} ms", flush=True)  # fmt: skip
    result = {
        "benchmark": "ort_paths",
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
    p.add_argument("artifact", help="an ONNX artifact (fp32 stores for fused)")
    p.add_argument("--paths", default="fused,native", help=f"two or more of {', '.join(PATHS)}")
    p.add_argument("--rows", type=positive_int, default=1)
    p.add_argument("--prompt-len", type=positive_int, default=1024)
    p.add_argument("--new-tokens", type=positive_int, default=160)
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

"""Where a step's time goes: torch.profiler over the two steps the continuous batcher runs, for
the torch backend: a prefill step (--prefill-rows rows, a --chunk of prompt each) and a decode
step (every row one token), each with the batcher's work on the logits (the finite check and
greedy choice). Writes each step's wall time and the ops by self time, device and host.

    python -m mosaicrt.bench.profile_steps CKPT --device cuda --kernels triton --batch 64 \
        --context 1024 --out bench/results/profile_small_h200.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.runtime.sampling import Sampler, SamplingParams, scan_rows
from mosaicrt.runtime.torch_backend import TorchBackend


def timed(device: torch.device, fn) -> float:
    """Seconds of fn(), the device drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def steps(backend: TorchBackend, args: argparse.Namespace) -> dict:
    """The two steps as callables, on a state of --batch rows prefilled to --context tokens."""
    B, C, rows = args.batch, args.chunk, min(args.prefill_rows, args.batch)
    runs = 3  # each step runs 3 times: warm-up, timed, profiled
    capacity = args.context + runs * C + runs
    blocks = B * -(-(args.context + runs) // backend.block) + rows * -(-runs * C // backend.block)
    state = backend.new_state(B, capacity, pool_blocks=blocks)  # the blocks the steps take
    gen = torch.Generator().manual_seed(0)
    for start in range(0, args.context, C):  # every row to --context, a chunk at a time
        n = min(C, args.context - start)
        ids = torch.randint(0, backend.config.vocab_size, (B, n), generator=gen)
        backend.step(ids, torch.full((B,), n), state, True)
    sampler = Sampler(SamplingParams())
    prompt = torch.randint(0, backend.config.vocab_size, (rows, C), generator=gen)
    token = torch.ones(B, 1, dtype=torch.int64)

    def after(logits: torch.Tensor) -> None:  # the batcher's work on a step's logits
        _, greedy = scan_rows(logits)
        sampler(logits, list(range(logits.shape[0])), greedy)

    def prefill() -> None:
        after(backend.step(prompt, torch.full((rows,), C), state, True, rows=slice(0, rows),
                           device_logits=True))  # fmt: skip

    def decode() -> None:
        after(backend.step(token, torch.ones(B, dtype=torch.int64), state, True,
                           device_logits=True))  # fmt: skip

    return {f"prefill ({rows} rows x {C} tokens)": prefill, f"decode ({B} rows)": decode}


def main(args: argparse.Namespace) -> int:
    backend = TorchBackend(args.model, device=args.device, kernels=args.kernels,
                           compile=args.compile)  # fmt: skip
    device = backend.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"{args.model}: {vars(args)}", f"machine: {machine_info()}", ""]
    for name, fn in steps(backend, args).items():
        fn()  # warm-up: kernels compiled, graphs captured
        wall = timed(device, fn)
        with profile(activities=activities) as prof:
            fn()
        ops = prof.key_averages()
        part = [f"== {name}: {1e3 * wall:.2f} ms", ops.table(sort_by=sort, row_limit=25)]
        if device.type == "cuda":
            part.append(ops.table(sort_by="self_cpu_time_total", row_limit=15))
        print("\n".join(part))
        lines += part
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default="triton", help="torch or triton")
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    p.add_argument("--batch", type=positive_int, default=64, help="rows of the decode step")
    p.add_argument("--prefill-rows", type=positive_int, default=8, help="rows of the prefill step")
    p.add_argument("--chunk", type=positive_int, default=512, help="prompt tokens per row")
    p.add_argument("--context", type=positive_int, default=1024, help="tokens before the steps")
    p.add_argument("--out", help="write the tables here")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))

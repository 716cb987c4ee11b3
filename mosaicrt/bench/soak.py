"""A decode soak: one sequence decoded for 10,000 steps through each backend, host memory (RSS)
sampled as it goes. The state is allocated once, so after a warm-up the resident memory must stay
flat: a leak of even a few hundred bytes per step would show as a steady climb.

    python -m mosaicrt.bench.soak --json bench/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.decode import open_backends
from mosaicrt.bench.machine import machine_info
from mosaicrt.model.config import preset
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backend import Backend, torch_threads_for


def soak(backend: Backend, steps: int, warmup: int, every: int) -> dict:
    """Decode `steps` tokens (random ids) after a short prompt; RSS every `every` steps."""
    process = psutil.Process()
    state = backend.new_state(1, steps + 16)
    backend.step(torch.ones(1, 8, dtype=torch.int64), torch.tensor([8]), state, True)
    one = torch.ones(1, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    samples, start = [], time.perf_counter()
    with torch_threads_for(backend):
        for step in range(1, steps + 1):
            ids = torch.randint(0, backend.config.vocab_size, (1, 1), generator=gen)
            backend.step(ids, one, state, True)
            if step % every == 0:
                samples.append((step, process.memory_info().rss))
    after = [rss for step, rss in samples if step > warmup]
    base = next(rss for step, rss in samples if step >= warmup)
    return {
        "steps": steps,
        "warmup": warmup,
        "seconds": time.perf_counter() - start,
        "rss_after_warmup_bytes": base,
        "rss_max_bytes": max(after),
        "rss_min_bytes": min(after),
        "drift": (max(after) - base) / base,
        "samples": samples,
    }


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument("--steps", type=positive_int, default=10_000)
    parser.add_argument("--warmup", type=positive_int, default=1_000)
    parser.add_argument("--every", type=positive_int, default=250, help="steps between samples")
    parser.add_argument("--json", help="write results here")


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    config = preset(args.preset).replace(eos_token_id=None)
    result = {"benchmark": "soak", "preset": args.preset, "machine": machine_info(),
              "backends": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            backend = open_backends([name], config, Path(tmp) / name, args.steps + 16)[name]
            run = soak(backend, args.steps, args.warmup, args.every)
            result["backends"][name] = run
            print(
                f"{name}: {args.steps} steps in {run['seconds']:.1f} s; RSS after warm-up "
                f"{run['rss_after_warmup_bytes'] / 2**20:.1f} MiB, max "
                f"{run['rss_max_bytes'] / 2**20:.1f} MiB ({100 * run['drift']:+.2f} %)"
            )
            del backend
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores; {result['preset']} preset, batch 1 "
        f"({m['date'][:10]}).",
        "",
        "| backend | steps | RSS after warm-up (MiB) | max after (MiB) | drift |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in result["backends"].items():
        lines.append(
            f"| {name} | {r['steps']:,} | {r['rss_after_warmup_bytes'] / 2**20:.1f} "
            f"| {r['rss_max_bytes'] / 2**20:.1f} | {100 * r['drift']:+.2f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

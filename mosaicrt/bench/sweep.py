"""Throughput vs batch size and the latency distribution, through the continuous batcher.

For each batch size: 2 x batch requests of random prompts (input_len tokens, output_len new tokens
each, EOS ignored) queued at once; output tokens/s over the wall time. At one batch size the
inter-token latencies of every request give the latency CDF.

    python -m mosaicrt.bench.sweep --json bench/results/sweep_cpu.json \
        --plot bench/results/sweep_cpu.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.batching import run_requests
from mosaicrt.bench.decode import open_backends
from mosaicrt.bench.machine import machine_info
from mosaicrt.bench.metrics import request_metrics
from mosaicrt.model.config import preset
from mosaicrt.runtime.generator import RunLimits


def sweep(backend, batches: list[int], input_len: int, output_len: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows, itl = [], {}
    for batch in batches:
        limits = RunLimits(max_batch=batch, max_context=input_len + output_len, prefill_chunk=512)

        def prompts(n: int) -> list[list[int]]:
            ids = torch.randint(0, backend.config.vocab_size, (n, input_len), generator=gen)
            return ids.tolist()

        run_requests(backend, prompts(batch), 4, limits)  # warm up at this batch size
        run = run_requests(backend, prompts(2 * batch), output_len, limits)
        metrics = request_metrics(run.timings, run.duration)
        rows.append(
            {
                "batch": batch,
                "output_tokens_per_s": metrics["output_tokens_per_s"],
                "tpot_ms": metrics["tpot_ms"],
                "ttft_ms": metrics["ttft_ms"],
            }
        )
        itl[batch] = sorted(x for t in run.timings for x in t.itl_ms)
        print(f"{backend.name} batch {batch:3d}: {metrics['output_tokens_per_s']:8.1f} tokens/s")
    return {"rows": rows, "itl_ms": {str(b): v for b, v in itl.items()}}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, data in result["backends"].items():
        rows = data["rows"]
        left.plot([r["batch"] for r in rows], [r["output_tokens_per_s"] for r in rows],
                  marker="o", label=name)  # fmt: skip
        for batch, samples in data["itl_ms"].items():
            y = np.arange(1, len(samples) + 1) / len(samples)
            right.plot(samples, y, label=f"{name}, batch {batch}")
    left.set_xscale("log", base=2)
    left.set_xlabel("batch size (concurrent sequences)")
    left.set_ylabel("output tokens/s")
    left.set_title(f"throughput, {result['preset']}, {result['input_len']} in / "
                   f"{result['output_len']} out")  # fmt: skip
    right.set_xscale("log")
    right.set_xlabel("inter-token latency (ms)")
    right.set_ylabel("fraction of tokens")
    right.set_title("latency CDF")
    batches = [r["batch"] for r in next(iter(result["backends"].values()))["rows"]]
    left.set_xticks(batches, [str(b) for b in batches])
    left.minorticks_off()
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.xaxis.set_minor_formatter(ScalarFormatter())
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    m = result["machine"]
    batches = [r["batch"] for r in next(iter(result["backends"].values()))["rows"]]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores; torch {m['torch']}; {result['preset']} "
        f"preset, fp32, {result['input_len']} prompt tokens, {result['output_len']} new tokens per "
        f"request, 2 x batch requests queued ({m['date'][:10]}). Output tokens/s:",
        "",
        "| backend | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "| --- |" + " --- |" * len(batches),
    ]
    for name, data in result["backends"].items():
        cells = " | ".join(f"{r['output_tokens_per_s']:.1f}" for r in data["rows"])
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--cdf-batches", default="1,8", help="batch sizes whose ITLs are kept")
    parser.add_argument("--input-len", type=positive_int, default=128)
    parser.add_argument("--output-len", type=positive_int, default=32)
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="write a PNG here")


def main(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    batches = [int(b) for b in args.batches.split(",")]
    keep = set(args.cdf_batches.split(","))
    result = {
        "benchmark": "sweep",
        "preset": args.preset,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "machine": machine_info(),
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):  # one runtime at a time: their thread pools
            backend = open_backends([name], config, Path(tmp) / name, 4096)[name]
            data = sweep(backend, batches, args.input_len, args.output_len)
            data["itl_ms"] = {b: v for b, v in data["itl_ms"].items() if b in keep}
            result["backends"][name] = data
            del backend
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

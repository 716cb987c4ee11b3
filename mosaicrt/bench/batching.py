"""`mosaicrt bench latency|throughput`: requests in process through the continuous batcher, timed
per token, reported as TTFT/TPOT/ITL/E2EL, tokens per second, memory, and roofline fractions.

latency:    --iters rounds of --batch requests submitted together (after --warmup rounds).
throughput: --num-requests requests (default 4 x --batch) queued at once on --batch rows.
Requests ignore EOS so every one produces exactly --output-len tokens. Prompts are random tokens
of --input-len, or of lengths drawn from --input-len-mix (e.g. 256-1024:90,8192:10), or a
--dataset's. Under --state-memory the report's "pool" says how many sequences ran at once at
most, against how many a static allocation of the same bytes holds at --max-context.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from mosaicrt.argtypes import nonneg_int, positive_int
from mosaicrt.bench.machine import (
    machine_info,
    measure_bandwidth_gb_s,
    measure_gpu_bandwidth_gb_s,
    measure_gpu_peak_gflops,
    measure_peak_gflops,
    peak_memory,
    restart_peaks,
)
from mosaicrt.bench.metrics import RequestTiming, request_metrics
from mosaicrt.bench.roofline import decode_bytes, prefill_flops
from mosaicrt.bench.state_bytes import measure_state, weights_read_bytes
from mosaicrt.errors import MosaicError
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backend import Backend, torch_threads_for
from mosaicrt.runtime.backends import add_run_args, open_run_backend
from mosaicrt.runtime.batcher import pool_blocks
from mosaicrt.runtime.generator import ContinuousBatcher, Request, RunLimits
from mosaicrt.runtime.paging import blocks_for
from mosaicrt.runtime.sampling import SamplingParams


@dataclass
class Run:
    """One run_requests: each request's token timestamps, the wall time, the batcher's state
    pool report (None without a pool), and each decode step's (step, model run) seconds where
    the backend times its model runs (onnxruntime: its `run_seconds` hook)."""

    timings: list[RequestTiming]
    duration: float
    pool: dict | None
    decode_steps: list[tuple[float, float]]


def run_requests(
    backend: Backend, prompts: list[list[int]], output_len: int, limits: RunLimits
) -> Run:
    """Submit all prompts at once and run them to the end."""
    with torch_threads_for(backend):
        return _run_requests(backend, prompts, output_len, limits)


def _run_requests(
    backend: Backend, prompts: list[list[int]], output_len: int, limits: RunLimits
) -> Run:
    batcher = ContinuousBatcher(backend, SamplingParams(), limits, ignore_eos=True)
    requests = [Request(i, p, output_len) for i, p in enumerate(prompts)]
    times: dict[int, list[float]] = {r.rid: [] for r in requests}
    runs: list[float] | None = [] if hasattr(backend, "run_seconds") else None
    if runs is not None:
        backend.run_seconds = runs
    decode_steps = []
    start = time.perf_counter()
    try:
        for request in requests:
            batcher.submit(request)
        while batcher.busy:
            before, ran = time.perf_counter(), len(runs or ())
            events = batcher.step()
            now = time.perf_counter()
            if runs is not None and len(runs) == ran + 1 and not batcher.last_prefill:
                decode_steps.append((now - before, runs[-1]))  # one model run, a decode step
            for request, token, _ in events:
                if token is not None:
                    times[request.rid].append(now)
    finally:
        if runs is not None:
            backend.run_seconds = None
    duration = time.perf_counter() - start
    timings = [RequestTiming(start, tuple(times[r.rid]), len(r.prompt)) for r in requests]
    return Run(timings, duration, batcher.pool_report(), decode_steps)


def input_len_mix(text: str) -> list[tuple[int, int, float]]:
    """'256-1024:90,8192:10' -> [(256, 1024, 0.9), (8192, 8192, 0.1)]: prompt lengths drawn
    uniformly from each range, the ranges by weight."""
    parts = []
    try:
        for item in text.split(","):
            lengths, weight = item.split(":")
            lo, _, hi = lengths.partition("-")
            parts.append((int(lo), int(hi or lo), float(weight)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a length mix: give LO-HI:WEIGHT or LEN:WEIGHT items separated by "
            "commas, e.g. 256-1024:90,8192:10"
        ) from None
    if any(lo < 1 or hi < lo or w <= 0 for lo, hi, w in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: lengths must be >= 1 with LO <= HI, weights > 0"
        )
    total = sum(w for _, _, w in parts)
    return [(lo, hi, w / total) for lo, hi, w in parts]


class PromptSource:
    """Prompts for the benchmark: a dataset's in turn, or random tokens of input_len, or of
    lengths drawn from a mix (input_len_mix)."""

    def __init__(self, vocab: int, input_len: int, dataset, mix, seed: int) -> None:
        self.vocab, self.dataset, self.mix = vocab, dataset, mix
        self.gen, self.taken = torch.Generator().manual_seed(seed), 0
        self.longest = input_len
        if dataset:
            self.longest = max(len(p) for p in dataset)
        if mix:
            self.longest = max(hi for _, hi, _ in mix)

    def length(self) -> int:
        pick = float(torch.rand((), generator=self.gen))
        for lo, hi, weight in self.mix:
            if pick < weight:
                break
            pick -= weight
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def __call__(self, n: int) -> list[list[int]]:
        if self.dataset:
            self.taken += n
            return [self.dataset[(self.taken - n + i) % len(self.dataset)] for i in range(n)]
        lengths = [self.length() if self.mix else self.longest for _ in range(n)]
        return [torch.randint(0, self.vocab, (k,), generator=self.gen).tolist() for k in lengths]


def pool_summary(backend: Backend, pool: dict, limits: RunLimits) -> dict:
    """The batcher's pool report, and under a budget how many sequences of max_context a static
    allocation of the same bytes holds, against the most that ran at once."""
    summary = pool | {"max_context": limits.max_context, "state_memory": limits.state_memory}
    if limits.state_memory is not None:
        static = static_sequences(backend, limits)
        summary["static_sequences"] = static
        summary["admitted_vs_static"] = pool["peak_running"] / max(static, 1)
    return summary


def static_sequences(backend: Backend, limits: RunLimits) -> int:
    """Sequences a static allocation (every row sized for max_context) fits in the budget."""
    sizes = backend.state_sizes()
    per_row = sizes.row_bytes + blocks_for(limits.max_context, sizes.block) * sizes.block_bytes
    return min(limits.max_batch, limits.state_memory // per_row)


def run_bench(
    backend: Backend,
    mode: str,
    batch: int,
    input_len: int,
    output_len: int,
    warmup: int,
    iters: int,
    num_requests: int | None,
    dataset: list[list[int]] | None = None,
    seed: int = 0,
    mix: list[tuple[int, int, float]] | None = None,
    max_context: int | None = None,
    state_memory: int | None = None,
    prefix_cache: bool = True,
) -> dict:
    """Run the benchmark; prompts are random (input_len tokens, or lengths drawn from `mix`)
    or taken in turn from dataset."""
    config = backend.config
    prompts = PromptSource(config.vocab_size, input_len, dataset, mix, seed)
    input_len = prompts.longest
    limits = RunLimits(
        max_batch=batch,
        max_context=max(max_context or 0, input_len + output_len),
        prefill_chunk=min(512, input_len),
        state_memory=state_memory,
        prefix_cache=prefix_cache,
    )
    for _ in range(warmup):
        run_requests(backend, prompts(batch), output_len, limits)
    peak_loaded = peak_memory()  # loading and the warmup requests
    # The rates right before the timed requests too, where the peaks can be restarted after that
    # probe (Linux): its buffers are not the benchmark's memory.
    rates_before = measure_rates(backend) if restart_peaks() else None
    restart_peaks()
    if mode == "latency":
        runs, between, peak_loaded = timed_rounds(
            backend, lambda: prompts(batch), output_len, limits, iters, rates_before, peak_loaded
        )
    else:
        runs = [run_requests(backend, prompts(num_requests or 4 * batch), output_len, limits)]
        between = []
    timings = [t for run in runs for t in run.timings]
    report = request_metrics(timings, sum(run.duration for run in runs))
    if runs[-1].pool is not None:
        report["pool"] = pool_summary(backend, runs[-1].pool, limits)
    if decode_steps := [s for run in runs for s in run.decode_steps]:
        report["decode_step"] = step_overhead(decode_steps)
    # (host, GPU) peak bytes, read before the probes below
    peak_host, peak_gpu = max_peaks(peak_loaded, peak_memory())
    rates = rates_before, between, measure_rates(backend)
    report.update(
        {
            "mode": mode,
            "backend": backend.name,
            "batch": batch,
            "input_len": input_len,
            "output_len": output_len,
            "warmup": warmup,
            "iters": iters if mode == "latency" else 1,
            "memory": {
                "peak_host_bytes": peak_host,
                "peak_gpu_bytes": peak_gpu,
                "state": measure_state(
                    backend, batch, limits.max_context, pool_blocks(backend, limits)
                )
                | {
                    "weights_read_bytes": decode_bytes(
                        config, [], backend.store_dtype_name(), weights_read_bytes(backend)
                    )
                },
            },
            "config": config.to_dict(),
        }
    )
    report.update(roofline(backend, report, batch, input_len, output_len, rates))
    return report


def timed_rounds(
    backend: Backend,
    requests: Callable[[], list[list[int]]],
    output_len: int,
    limits: RunLimits,
    iters: int,
    rates_before: tuple[float, float] | None,
    peak: tuple[int, int | None],
) -> tuple[list, list[tuple[float, float]], tuple[int, int | None]]:
    """`iters` rounds of requests; where the rates were measured before them (rates_before), they
    are measured between the rounds too, the probes' memory left out of the (host, GPU) peak:
    (the rounds' runs, the rates between them, the peak so far)."""
    runs, between = [], []
    for i in range(iters):
        runs.append(run_requests(backend, requests(), output_len, limits))
        if rates_before is not None and i < iters - 1:
            peak = max_peaks(peak, peak_memory())
            between.append(measure_rates(backend))
            restart_peaks()
    return runs, between, peak


def max_peaks(a: tuple[int, int | None], b: tuple[int, int | None]) -> tuple[int, int | None]:
    """The larger of two (host, GPU) peaks, each part on its own (GPU None without one)."""
    return max(a[0], b[0]), None if a[1] is None else max(a[1], b[1] or 0)


def step_overhead(decode_steps: list[tuple[float, float]]) -> dict:
    """Medians over decode steps of the batcher's step, of the model run within it, and of the
    difference: the runtime's bookkeeping (feeds, binding, state updates, sampling)."""
    return {
        "steps": len(decode_steps),
        "step_ms": 1e3 * statistics.median(step for step, _ in decode_steps),
        "model_run_ms": 1e3 * statistics.median(run for _, run in decode_steps),
        "bookkeeping_ms": 1e3 * statistics.median(step - run for step, run in decode_steps),
    }


def measure_rates(backend: Backend) -> tuple[float, float]:
    """(memory bandwidth GB/s, matmul peak GFLOP/s) measured now, on the GPU for a GPU backend."""
    if torch.device(getattr(backend, "device", "cpu")).type == "cuda":
        return measure_gpu_bandwidth_gb_s(), measure_gpu_peak_gflops()
    return measure_bandwidth_gb_s(), measure_peak_gflops()


def roofline(
    backend: Backend,
    report: dict,
    batch: int,
    input_len: int,
    output_len: int,
    rates: tuple[tuple[float, float] | None, list[tuple[float, float]], tuple[float, float]],
) -> dict:
    """Decode bytes per step over the memory bandwidth and prefill FLOPs over the matmul peak,
    against the measured TPOT and TTFT. rates: (bandwidth, peak) measured just before the timed
    requests (None where it was not), between their rounds, and just after them; the roofline
    takes their means, as a machine whose speed drifts during the run had on average (any one
    alone moves the fraction with the drift)."""
    config = backend.config
    before, between, (bw_after, peak_after) = rates
    bw_before, peak_before = before or (None, None)
    measured = ([before] if before else []) + between + [(bw_after, peak_after)]
    bandwidth = sum(bw for bw, _ in measured) / len(measured)
    peak = sum(p for _, p in measured) / len(measured)
    mid = [input_len + output_len // 2] * batch  # contexts halfway through decoding
    step_bytes = decode_bytes(config, mid, backend.store_dtype_name(), weights_read_bytes(backend))
    roof_decode_ms = 1e3 * step_bytes / (bandwidth * 1e9)
    roof_prefill_ms = 1e3 * batch * prefill_flops(config, input_len) / (peak * 1e9)
    tpot = report["tpot_ms"]["mean"]
    return {
        "roofline": {
            "decode_bytes_per_step": step_bytes,
            "decode_roofline_ms": roof_decode_ms,
            "decode_fraction": roof_decode_ms / tpot if tpot else None,
            "prefill_flops": batch * prefill_flops(config, input_len),
            "prefill_roofline_ms": roof_prefill_ms,
            "prefill_fraction": roof_prefill_ms / report["ttft_ms"]["mean"],
        },
        "machine": machine_info()
        | {
            "bandwidth_gb_s": bandwidth,
            "peak_gflops": peak,
            "bandwidth_before_after_gb_s": [bw_before, bw_after],
            "bandwidth_between_rounds_gb_s": [bw for bw, _ in between],
            "peak_before_after_gflops": [peak_before, peak_after],
            "peak_between_rounds_gflops": [p for _, p in between],
        },
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"mosaicrt bench {report['mode']}: {report['backend']}, batch "
        f"{report['batch']}, {report['input_len']} in / {report['output_len']} out"
    )
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        table.add_row(key, *(f"{report[key][c]:.2f}" for c in ("mean", "p50", "p90", "p99")))
    console = Console()
    console.print(table)
    roof = report["roofline"]
    decode = roof["decode_fraction"]
    before, after = report["machine"]["bandwidth_before_after_gb_s"]
    between = report["machine"].get("bandwidth_between_rounds_gb_s", [])
    probes = [f"{before:.1f} before"] if before else []
    probes += [f"{' and '.join(f'{bw:.1f}' for bw in between)} between the rounds of"] * bool(
        between
    )
    measured = ", ".join(probes + [f"{after:.1f} after"])
    console.print(
        f"requests/s {report['requests_per_s']:.2f}   output tokens/s "
        f"{report['output_tokens_per_s']:.1f}   total tokens/s {report['total_tokens_per_s']:.1f}\n"
        f"roofline: decode {100 * decode:.0f} % of {report['machine']['bandwidth_gb_s']:.1f} GB/s "
        f"({measured} the timed requests), "
        f"prefill {100 * roof['prefill_fraction']:.0f} % of "
        f"{report['machine']['peak_gflops']:.0f} GFLOP/s   peak host memory "
        f"{report['memory']['peak_host_bytes'] / 2**20:.0f} MiB"
        if decode is not None
        else ""
    )
    if step := report.get("decode_step"):
        console.print(
            f"decode step {step['step_ms']:.2f} ms: model run {step['model_run_ms']:.2f} ms, "
            f"runtime bookkeeping {step['bookkeeping_ms']:.2f} ms (medians over {step['steps']})"
        )
    pool = report.get("pool")
    if pool:
        line = (
            f"state pool: {pool['blocks_total']} blocks of {pool['block_bytes'] / 2**20:.2f} MiB, "
            f"peak {pool['blocks_peak']} used, {pool['peak_running']} sequences at once at most, "
            f"{pool['prefix_cache_hits']} prefix-cache hits, {pool['preemptions']} preemptions"
        )
        if "static_sequences" in pool:
            line += (
                f"; a static allocation of the same bytes holds {pool['static_sequences']} "
                f"sequences of {pool['max_context']} tokens ({pool['admitted_vs_static']:.1f}x)"
            )
        console.print(line)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """`mosaicrt bench latency|throughput MODEL ...`"""
    add_run_args(p)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=positive_int, default=32, help="new tokens per request")
    p.add_argument("--context", type=positive_int, help="decode at this context (sets --input-len)")
    p.add_argument("--dataset", help='JSONL of {"input_ids": [...]} prompts instead of random')
    p.add_argument(
        "--input-len-mix",
        type=input_len_mix,
        help="random prompts of lengths drawn from LO-HI:WEIGHT ranges, e.g. 256-1024:90,8192:10",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        help="tokens per sequence the state allows (default: the longest prompt + --output-len)",
    )
    p.add_argument(
        "--num-requests", type=positive_int, help="throughput: requests queued (4x batch)"
    )
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed rounds first")
    p.add_argument("--iters", type=positive_int, default=3, help="latency: timed rounds")
    p.add_argument("--json", help="write the report here")


def main(args: argparse.Namespace) -> int:
    """args.mode is latency or throughput (the bench command sets it)."""
    from mosaicrt.runtime.files import read_prompts
    from mosaicrt.runtime.generator import check_ids

    if args.json:
        check_output_file(args.json, inputs=[args.model, args.dataset], flag="--json")
    backend = open_run_backend(args)
    dataset = None
    if args.dataset:
        dataset = read_prompts(args.dataset)
        for number, ids in enumerate(dataset, start=1):
            if isinstance(ids, MosaicError):
                raise ids
            check_ids(ids, backend.config.vocab_size, f"{args.dataset} line {number}")
    report = run_bench(backend, args.mode, args.batch, args.context or args.input_len,
                       args.output_len, args.warmup, args.iters, args.num_requests,
                       dataset, mix=args.input_len_mix, max_context=args.max_context,
                       state_memory=args.state_memory,
                       prefix_cache=not args.no_prefix_cache)  # fmt: skip
    print_table(report)
    if args.json:
        write_json(args.json, report)
    return 0

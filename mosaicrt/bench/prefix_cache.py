"""The prefix cache on ONNX Runtime: requests that share a long prompt prefix (many-shot
prompts, one document queried many times), queued at once, with and without the cache.

Every request is the same prefix of random tokens and a suffix of its own; each one decodes
--new tokens (greedy, EOS ignored). With the cache, the first request prefills the prefix and the
others start from its state at the last multiple of --prefill-chunk inside their prompt, and
prefill only the rest. Both modes run in turn for --rounds rounds on one session (a slow spell
of the machine hits both alike); the report gives each mode's wall times, the speedup of the
medians, and whether every request produced the same tokens in both.

    python -m mosaicrt.bench.prefix_cache --preset mini --json bench/results/prefix_cache_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info
from mosaicrt.export.artifact import export_artifact
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import preset
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.backend import torch_threads_for
from mosaicrt.runtime.batcher import ContinuousBatcher, Request
from mosaicrt.runtime.limits import RunLimits
from mosaicrt.runtime.ort_backend import OrtBackend
from mosaicrt.runtime.sampling import SamplingParams


def shared_prompts(vocab: int, requests: int, prefix: int, suffix: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(0, vocab, (prefix,), generator=gen).tolist()
    return [head + torch.randint(0, vocab, (suffix,), generator=gen).tolist()
            for _ in range(requests)]  # fmt: skip


def run_once(backend, prompts: list[list[int]], new: int, limits: RunLimits) -> tuple:
    """(seconds, every request's tokens, the pool report) of one run of all requests."""
    batcher = ContinuousBatcher(backend, SamplingParams(), limits, ignore_eos=True)
    requests = [Request(i, p, new) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for request in requests:
        batcher.submit(request)
    with torch_threads_for(backend):
        while batcher.busy:
            batcher.step()
    seconds = time.perf_counter() - start
    return seconds, [r.output for r in requests], batcher.pool_report()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini", help="the model shape (random weights)")
    p.add_argument("--requests", type=positive_int, default=8)
    p.add_argument("--prefix", type=positive_int, default=2000, help="shared prompt tokens")
    p.add_argument("--suffix", type=positive_int, default=24, help="each request's own tokens")
    p.add_argument("--new", type=positive_int, default=16, help="tokens each request decodes")
    p.add_argument("--prefill-chunk", type=positive_int, default=256)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.json:
        check_output_file(args.json, flag="--json")
    config = preset(args.preset)
    context = args.prefix + args.suffix + args.new
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(random_tensors(config, seed=0), config, Path(tmp) / "ckpt")
        artifact = export_artifact(Path(tmp) / "ckpt", Path(tmp) / "art", max_context=context,
                                   last_only=True)  # fmt: skip
        backend = OrtBackend(artifact, device="cpu")
        prompts = shared_prompts(config.vocab_size, args.requests, args.prefix, args.suffix)
        modes = {"prefix_cache": True, "no_prefix_cache": False}
        times = {mode: [] for mode in modes}
        tokens, pools = {}, {}
        run_once(backend, prompts[:1], 2, RunLimits(1, context, args.prefill_chunk))  # warm up
        for _ in range(args.rounds):
            for mode, cache in modes.items():
                limits = RunLimits(args.requests, context, args.prefill_chunk, prefix_cache=cache)
                seconds, tokens[mode], pools[mode] = run_once(backend, prompts, args.new, limits)
                times[mode].append(seconds)
                print(f"{mode}: {seconds:.2f} s", flush=True)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    report = {
        "benchmark": "prefix_cache",
        "backend": f"onnxruntime ({backend.ort_ops} mosaic ops)",
        "preset": args.preset,
        "requests": args.requests,
        "prefix_tokens": args.prefix,
        "suffix_tokens": args.suffix,
        "new_tokens": args.new,
        "prefill_chunk": args.prefill_chunk,
        "seconds": times,
        "median_seconds": median,
        "speedup": median["no_prefix_cache"] / median["prefix_cache"],
        "identical_tokens": tokens["prefix_cache"] == tokens["no_prefix_cache"],
        "pool": pools,
        "machine": machine_info(),
    }
    print(f"speedup {report['speedup']:.2f}x, identical tokens: {report['identical_tokens']}, "
          f"cache hits {pools['prefix_cache']['prefix_cache_hits']}")  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

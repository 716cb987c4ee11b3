"""GPU benchmark of the Triton kernels against their physical peers.

- chunk retrieval (prefill from scratch, LTM delay 1 = plain causal on shifted keys) vs
  torch.nn.functional.scaled_dot_product_attention with the flash backend, same shapes (bf16);
- decode retrieval over a long LTM store vs the HBM roofline (bytes of the visible pairs / copy
  bandwidth measured in the same run);
- the gated key scan vs the same bandwidth.

    python -m mosaicrt.bench.kernels --json bench/results/kernels_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from mosaicrt.bench.machine import machine_info


def timed_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median CUDA-event time of fn in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gb_s(gib: float = 2.0) -> float:
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9  # read + write


def gpu_info() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["nvidia_smi"] = dict(zip(query.split(","), [v.strip() for v in out.split(",")]))
    except (ImportError, OSError, subprocess.TimeoutExpired):
        pass
    return info


def bench_chunk(T: int, H: int, hs: int) -> dict:
    from mosaicrt.plugins.kernels.retrieval import retrieve

    dev, bf16 = "cuda", torch.bfloat16
    q = torch.randn(1, T, H, hs, device=dev, dtype=bf16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    empty = torch.empty(1, 1, H, hs, device=dev, dtype=bf16)
    pos = torch.ones(1, dtype=torch.int64, device=dev)  # pair j of the chunk is tau = j
    lengths = torch.full((1,), T, dtype=torch.int64, device=dev)
    ours = timed_ms(
        lambda: retrieve(
            q,
            empty,
            empty,
            k,
            v,
            pos,
            lengths,
            window=0,
            delay=1,
            ring=False,
            half_dot=True,
            block_m=64,
            block_n=64,
        )
    )
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        sdpa = timed_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=1.0
            )
        )
    flops = 2 * 2 * H * hs * T * T / 2  # causal: half the score matrix, QK^T and PV
    return {
        "T": T,
        "heads": H,
        "head_dim": hs,
        "dtype": "bfloat16",
        "ours_ms": ours,
        "sdpa_flash_ms": sdpa,
        "ours_tflops": flops / ours / 1e9,
        "sdpa_tflops": flops / sdpa / 1e9,
        "throughput_vs_sdpa": sdpa / ours,
    }


def bench_decode(context: int, B: int, H: int, hs: int, bandwidth: float) -> dict:
    from mosaicrt.plugins.kernels.retrieval import retrieve_decode

    dev, bf16 = "cuda", torch.bfloat16
    store_k = torch.randn(B, context, H, hs, device=dev, dtype=bf16)
    store_v = torch.randn_like(store_k)
    q = torch.randn(B, 1, H, hs, device=dev)
    new = torch.randn(B, 1, H, hs, device=dev, dtype=bf16)
    pos = torch.full((B,), context + 1, dtype=torch.int64, device=dev)
    lengths = torch.ones(B, dtype=torch.int64, device=dev)
    ms = timed_ms(
        lambda: retrieve_decode(
            q, store_k, store_v, new, new, pos, lengths, window=0, delay=1, ring=False
        )
    )
    nbytes = 2 * B * context * H * hs * 2
    return {
        "context": context,
        "batch": B,
        "heads": H,
        "head_dim": hs,
        "ms": ms,
        "gb_s": nbytes / (ms * 1e-3) / 1e9,
        "bandwidth_fraction": nbytes / (ms * 1e-3) / 1e9 / bandwidth,
    }


def bench_scan(B: int, C: int, H: int, hs: int, bandwidth: float) -> dict:
    from mosaicrt.plugins.kernels.scan import gated_key_scan, scan_bytes

    dev = "cuda"
    k = torch.randn(B, C, H, hs, device=dev, dtype=torch.bfloat16)
    g, lam = torch.randn(B, C, H, device=dev), -torch.rand(B, C, H, device=dev)
    s = torch.zeros(B, H, hs, device=dev)
    mx = torch.full((B, H), float("-inf"), device=dev)
    lengths = torch.full((B,), C, dtype=torch.int64, device=dev)
    ms = timed_ms(lambda: gated_key_scan(k, g, lam, lengths, s, mx, 1e-6))
    nbytes = scan_bytes(B, C, H, hs, 2)
    return {
        "batch": B,
        "chunk": C,
        "heads": H,
        "head_dim": hs,
        "ms": ms,
        "gb_s": nbytes / (ms * 1e-3) / 1e9,
        "bandwidth_fraction": nbytes / (ms * 1e-3) / 1e9 / bandwidth,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "mosaicrt.bench.kernels needs a CUDA GPU (the CPU runs the kernels only "
            "under the Triton interpreter, which says nothing about speed)"
        )
    bandwidth = copy_bandwidth_gb_s()
    result = {
        "benchmark": "kernels",
        "machine": machine_info() | gpu_info(),
        "copy_bandwidth_gb_s": bandwidth,
        "chunk_retrieval": [bench_chunk(8192, 16, 128)],
        "decode_retrieval": [bench_decode(32768, b, 16, 128, bandwidth) for b in (1, 8)],
        "gated_scan": [bench_scan(8, 8192, 16, 128, bandwidth)],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

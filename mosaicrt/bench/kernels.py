"""GPU benchmark of the Triton kernels against their physical peers, over a few tilings each.

- prefill retrieval as the runtime runs it (a chunk of queries after a bf16 store, the chunk's
  own pairs fp32) with each of the kernel's products (PRODUCTS), against float64;
- chunk retrieval (prefill from scratch, LTM delay 1 = plain causal on shifted keys) vs
  torch.nn.functional.scaled_dot_product_attention with the flash backend, same shapes (bf16);
- decode retrieval over a long LTM store vs the HBM roofline (bytes of the visible pairs / copy
  bandwidth measured in the same run), launched eagerly and from a CUDA graph (as decode runs);
- the same at 1k and 4k pairs and batch 1, 8 and 64, over the number of slices each (sequence,
  head) is split in, next to the kernel's own choice (`splits`);
- the gated key scan vs the same bandwidth, timed from a CUDA graph too (its three launches
  would otherwise wait on the host at batch 1).

Every tiling is checked against a torch computation of the same function before it is timed.

    python -m mosaicrt.bench.kernels --json bench/results/kernels_<gpu>.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from mosaicrt.bench.machine import cuda_ms, machine_info, measure_gpu_bandwidth_gb_s
from mosaicrt.errors import BackendError

# The tilings tried; the fastest of earlier sweeps (bench/results/kernels_h*.json) are the
# kernels' defaults.
CHUNK_TILINGS = [
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (128, 128, 8, 2),
]  # block_m, block_n, warps, stages
DECODE_TILINGS = [
    (16, 128, 8, 3),
    (32, 128, 8, 3),
    (16, 128, 8, 4),
    (16, 64, 4, 4),
    (32, 64, 4, 4),
    (16, 256, 8, 3),
    (8, 128, 8, 3),
    (16, 128, 4, 4),
]  # splits, block_n, warps, stages
DECODE_SPLITS = [("auto", 128, 8, 4)] + [(s, 128, 8, 4) for s in (1, 2, 4, 8, 16)]
SCAN_TILINGS = [
    (warps, stages, seg)
    for warps, stages in [(1, 2), (1, 3), (2, 2)]
    for seg in (64, 128, 256, 512)
]  # warps, stages, tokens per program


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def graph_ms(fn) -> float:
    """Median time of fn replayed from a CUDA graph (no launch gaps), in ms."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay)


PRODUCTS = {  # the chunk kernel's score and value products, as `retrieve` takes them
    "bf16": {"half_dot": True},  # tensor cores on the bf16 pairs (flash attention's way)
    "bf16x3": {"precision": "bf16x3"},  # fp32 q and weights split in three bf16 terms
    "tf32x3": {"precision": "tf32x3"},  # fp32, as three tf32 tensor-core products
    "fp32": {"precision": "ieee"},  # one fp32 product (FMA units)
}
PREFILL_TILINGS = {  # per products: block_m, block_n, warps, stages
    "bf16": [(64, 64, 4, 3), (128, 64, 8, 2)],
    "bf16x3": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2)],
    "tf32x3": [(64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
    "fp32": [(64, 64, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 2, 2)],
}


def time_chunk_tilings(tilings, run, want, flops: float, err_key: str, timer) -> list[dict]:
    """Each tiling (block_m, block_n, warps, stages) of the chunk kernel, run(*tiling): its error
    against `want` (under err_key), then its time by `timer` and TFLOP/s; a tiling the compiler
    or the shared memory cannot take records its error instead."""
    results = []
    for tiling in tilings:
        try:
            err = rel_err(run(*tiling), want)
            ms = timer(functools.partial(run, *tiling))
        except Exception as e:
            results.append({"tiling": list(tiling), "error": repr(e)[:200]})
            continue
        results.append({"tiling": list(tiling), "ms": ms, "tflops": flops / ms / 1e9, err_key: err})
    return results


def bench_chunk(T: int, H: int, hs: int, products: str = "bf16") -> dict:
    """Prefill of T tokens from scratch vs SDPA flash on the same (B=1, H, T, hs) bf16 shapes,
    with the kernel's products in `products` (PRODUCTS)."""
    from mosaicrt.ops.associative_memory.kernel import retrieve

    dev, bf16 = "cuda", torch.bfloat16
    q = torch.randn(1, T, H, hs, device=dev, dtype=bf16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    empty = torch.empty(1, 1, H, hs, device=dev, dtype=bf16)
    pos = torch.ones(1, dtype=torch.int64, device=dev)  # pair j of the chunk is tau = j
    lengths = torch.full((1,), T, dtype=torch.int64, device=dev)
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=1.0
            )

    want = sdpa().transpose(1, 2)  # (1, T, H, hs): query i sees pairs 0..i, as ours
    sdpa_ms = cuda_ms(sdpa)
    flops = 2 * 2 * H * hs * T * T / 2  # causal: half the score matrix, QK^T and PV

    def ours(bm: int, bn: int, warps: int, stages: int) -> torch.Tensor:
        return retrieve(q, empty, empty, k, v, pos, lengths, window=0, delay=1, ring=False,
                        block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                        **PRODUCTS[products])  # fmt: skip

    tilings = time_chunk_tilings(CHUNK_TILINGS, ours, want, flops, "rel_err_vs_sdpa", cuda_ms)
    ok = [t for t in tilings if "ms" in t and t["rel_err_vs_sdpa"] < 2e-2]
    best = min(ok, key=lambda t: t["ms"]) if ok else None
    return {
        "T": T,
        "heads": H,
        "head_dim": hs,
        "dtype": "bfloat16",
        "products": products,
        "sdpa_flash_ms": sdpa_ms,
        "sdpa_tflops": flops / sdpa_ms / 1e9,
        "best": best,
        "throughput_vs_sdpa": sdpa_ms / best["ms"] if best else None,
        "tilings": tilings,
    }


def bench_prefill(B: int, S: int, C: int, H: int, hs: int, products: str) -> dict:
    """A prefill chunk as the runtime runs it: C queries per row after S stored bf16 pairs (LTM,
    delay 1), the chunk's own pairs fp32; error against float64, speed as TFLOP/s."""
    from mosaicrt.ops.associative_memory.kernel import retrieve

    dev, gen = "cuda", torch.Generator("cuda").manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, H, hs, device=dev, generator=gen), dim=-1
    )
    store_k, store_v = unit(B, S).bfloat16(), 3 * unit(B, S).bfloat16()
    new_k, new_v = unit(B, C), 3 * unit(B, C)
    q = 30 * unit(B, C)  # beta(n) folded in, as large as trained models have it
    pos = torch.full((B,), S + 1, dtype=torch.int64, device=dev)  # pairs 0..S-1 are stored
    lengths = torch.full((B,), C, dtype=torch.int64, device=dev)
    keys = torch.cat([store_k.double(), new_k.double()], 1)  # (B, S+C, H, hs): tau = 0..S+C-1
    scores = torch.einsum("bqhd,bnhd->bhqn", q.double(), keys)
    tau, t = torch.arange(S + C, device=dev), S + 1 + torch.arange(C, device=dev)
    scores = scores.masked_fill(tau[None, :] > t[:, None] - 1, float("-inf"))  # delay 1
    values = torch.cat([store_v.double(), new_v.double()], 1)
    want = torch.einsum("bhqn,bnhd->bqhd", scores.softmax(-1), values)
    del scores
    flops = 2 * 2 * B * H * hs * C * (S + (C + 1) / 2)  # scores and weighted values

    def ours(bm: int, bn: int, warps: int, stages: int) -> torch.Tensor:
        return retrieve(q, store_k, store_v, new_k, new_v, pos, lengths, window=0, delay=1,
                        ring=False, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                        **PRODUCTS[products])  # fmt: skip

    few = lambda fn: cuda_ms(fn, iters=10, warmup=2)  # noqa: E731  (the fp32 products are slow)
    tilings = time_chunk_tilings(
        PREFILL_TILINGS[products], ours, want, flops, "rel_err_vs_fp64", few
    )
    timed = [t for t in tilings if "ms" in t]
    best = min(timed, key=lambda t: t["ms"]) if timed else None
    return {"batch": B, "stored": S, "chunk": C, "heads": H, "head_dim": hs,
            "store_dtype": "bfloat16", "products": products, "best": best,
            "tilings": tilings}  # fmt: skip


def bench_decode(
    context: int, B: int, H: int, hs: int, bandwidth: float, tilings=DECODE_TILINGS
) -> dict:
    """One query per sequence over `context` stored bf16 pairs (LTM, delay 1) and one new pair,
    over the given (splits, block_n, warps, stages) tilings; splits "auto": retrieve_decode's
    own choice for the shape (`decode_splits`)."""
    from mosaicrt.ops.associative_memory.kernel import retrieve_decode

    dev, bf16 = "cuda", torch.bfloat16
    store_k = torch.randn(B, context, H, hs, device=dev, dtype=bf16)
    store_v = torch.randn_like(store_k)
    q = 8 * torch.nn.functional.normalize(torch.randn(B, 1, H, hs, device=dev), dim=-1)
    new_k = torch.randn(B, 1, H, hs, device=dev, dtype=bf16)
    new_v = torch.randn_like(new_k)
    pos = torch.full((B,), context + 1, dtype=torch.int64, device=dev)  # sees all + the new one
    lengths = torch.ones(B, dtype=torch.int64, device=dev)
    keys = torch.cat([store_k, new_k], 1).float()  # (B, context+1, H, hs)
    scores = torch.einsum("bqhd,bnhd->bhqn", q, keys)
    want = torch.einsum(
        "bhqn,bnhd->bqhd", scores.softmax(-1), torch.cat([store_v, new_v], 1).float()
    )
    nbytes = 2 * B * (context + 1) * H * hs * 2
    results = []
    for splits, bn, warps, stages in tilings:
        split = {}  # "auto": retrieve_decode's own choice; else exactly `splits` slices
        if splits != "auto":
            split = {"max_splits": splits, "split_size": 1, "programs": B * H * splits}

        def ours():
            return retrieve_decode(q, store_k, store_v, new_k, new_v, pos, lengths, window=0,
                                   delay=1, ring=False, block_n=bn, num_warps=warps,
                                   num_stages=stages, **split)  # fmt: skip

        err = rel_err(ours(), want)
        eager, graphed = cuda_ms(ours), graph_ms(ours)
        results.append(
            {
                "tiling": [splits, bn, warps, stages],
                "ms": eager,
                "graph_ms": graphed,
                "bandwidth_fraction": nbytes / (graphed * 1e-3) / 1e9 / bandwidth,
                "rel_err": err,
            }
        )
    ok = [t for t in results if t["rel_err"] < 1e-4]
    best = min(ok, key=lambda t: t["graph_ms"]) if ok else None
    return {
        "context": context,
        "batch": B,
        "heads": H,
        "head_dim": hs,
        "dtype": "bfloat16",
        "bytes": nbytes,
        "best": best,
        "bandwidth_fraction": best["bandwidth_fraction"] if best else None,
        "tilings": results,
    }


def bench_scan(B: int, C: int, H: int, hs: int, bandwidth: float) -> dict:
    """The key scan over a chunk of C tokens (bf16 projections in, fp32 unit keys out)."""
    from mosaicrt.ops.gated_key_scan.kernel import gated_key_scan, scan_bytes
    from mosaicrt.ops.gated_key_scan.reference import gated_key_scan as reference_scan

    dev = "cuda"
    k = torch.randn(B, C, H, hs, device=dev, dtype=torch.bfloat16)
    g, lam = torch.randn(B, C, H, device=dev), -torch.rand(B, C, H, device=dev)
    lengths = torch.full((B,), C, dtype=torch.int64, device=dev)

    def fresh_state():
        return torch.zeros(B, H, hs, device=dev), torch.full((B, H), float("-inf"), device=dev)

    # Check on the first 512 tokens against the reference recurrence (sequential in torch).
    n = min(C, 512)
    valid = torch.ones(B, n, dtype=torch.bool, device=dev)
    want = reference_scan(k[:, :n].float(), g[:, :n], lam[:, :n], valid, *fresh_state(), 1e-6)
    nbytes = scan_bytes(B, C, H, hs, 2)
    tilings = []
    for warps, stages, seg in SCAN_TILINGS:
        opts = dict(num_warps=warps, num_stages=stages)
        s, mx = fresh_state()
        got = gated_key_scan(k[:, :n], g[:, :n], lam[:, :n], lengths.clamp(max=n), s, mx, 1e-6,
                             segment=min(seg, 128), **opts)  # fmt: skip
        err = rel_err(got, want)
        s, mx = fresh_state()
        run = lambda: gated_key_scan(k, g, lam, lengths, s, mx, 1e-6, segment=seg, **opts)  # noqa: E731
        ms = graph_ms(run)
        tilings.append(
            {
                "tiling": [warps, stages, seg],
                "ms": ms,
                "eager_ms": cuda_ms(run),
                "bandwidth_fraction": nbytes / (ms * 1e-3) / 1e9 / bandwidth,
                "rel_err": err,
            }
        )
    ok = [t for t in tilings if t["rel_err"] < 1e-4]
    best = min(ok, key=lambda t: t["ms"]) if ok else None
    return {
        "batch": B,
        "chunk": C,
        "heads": H,
        "head_dim": hs,
        "bytes": nbytes,
        "best": best,
        "bandwidth_fraction": best["bandwidth_fraction"] if best else None,
        "tilings": tilings,
    }


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write results here")
    parser.add_argument(
        "--only",
        default="prefill,chunk,decode,splits,scan",
        help="comma-separated subset of prefill,chunk,decode,splits,scan",
    )


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise BackendError(
            "mosaicrt.bench.kernels needs a CUDA GPU (the CPU runs the kernels only "
            "under the Triton interpreter, which says nothing about speed)"
        )
    bandwidth = measure_gpu_bandwidth_gb_s()
    result = {
        "benchmark": "kernels",
        "machine": machine_info(),
        "copy_bandwidth_gb_s": bandwidth,
    }
    parts = args.only.split(",")
    if "prefill" in parts:
        result["prefill_retrieval"] = [bench_prefill(8, 2048, 512, 16, 128, p) for p in PRODUCTS]
    if "chunk" in parts:  # bf16 pairs: the split products are tf32x3's here
        result["chunk_retrieval"] = [bench_chunk(8192, 16, 128, p) for p in ("bf16", "tf32x3")]
    if "decode" in parts:
        result["decode_retrieval"] = [bench_decode(32768, b, 16, 128, bandwidth) for b in (1, 8)]
    if "splits" in parts:  # the split a decode step takes at short contexts and large batches
        result["decode_splits"] = [
            bench_decode(c, b, 16, 128, bandwidth, DECODE_SPLITS)
            for c in (1024, 4096)
            for b in (1, 8, 64)
        ]
    if "scan" in parts:
        result["gated_scan"] = [bench_scan(B, 8192, 16, 128, bandwidth) for B in (8, 1)]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine'].get('gpu')}: copy bandwidth {bandwidth:.0f} GB/s")
    for r in result.get("prefill_retrieval", []):
        print(f"prefill B={r['batch']} S={r['stored']} C={r['chunk']} {r['products']} products:")
        for t in r["tilings"]:
            print(
                f"  {t['tiling']}: "
                + (
                    t.get("error")
                    or f"{t['ms']:.3f} ms "
                    f"{t['tflops']:.1f} TFLOP/s, rel err vs fp64 {t['rel_err_vs_fp64']:.1e}"
                )
            )
    for r in result.get("chunk_retrieval", []):
        b = r["best"] or {}
        print(
            f"chunk T={r['T']} hs={r['head_dim']} {r['products']} products: best "
            f"{b.get('tiling')} {b.get('ms', 0):.3f} ms "
            f"{b.get('tflops', 0):.0f} TFLOP/s; sdpa flash {r['sdpa_flash_ms']:.3f} ms "
            f"{r['sdpa_tflops']:.0f} TFLOP/s; ratio {r['throughput_vs_sdpa']}"
        )
    for r in result.get("decode_retrieval", []) + result.get("decode_splits", []):
        b = r["best"] or {}
        print(
            f"decode ctx={r['context']} B={r['batch']}: best {b.get('tiling')} graph "
            f"{b.get('graph_ms', 0):.4f} ms eager {b.get('ms', 0):.4f} ms, "
            f"{r['bandwidth_fraction']} of bandwidth"
        )
        for t in r["tilings"]:
            print(f"  {t['tiling']}: {t['graph_ms']:.4f} ms, {100 * t['bandwidth_fraction']:.0f} %")
    for r in result.get("gated_scan", []):
        b = r["best"] or {}
        print(
            f"scan B={r['batch']} C={r['chunk']}: best {b.get('tiling')} {b.get('ms', 0):.3f} ms, "
            f"{r['bandwidth_fraction']} of bandwidth"
        )
        for t in r["tilings"]:
            print(
                f"  {t['tiling']}: {t['ms']:.3f} ms (eager {t['eager_ms']:.3f}), "
                f"{100 * t['bandwidth_fraction']:.0f} %, rel err {t['rel_err']:.1e}"
            )


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

"""The native AssociativeMemory kernel alone on ONNX Runtime's CPU provider, one node per case:
LTM decode over a long store (a step's layers in turn: bytes over the read bandwidth) and a
prefill chunk over stored pairs (FLOPs over the fp32 matmul peak), both measured in the same run.
The step graph around the op is bench.ort_ceiling's and `bench latency`'s; this isolates the
kernel, to compare its builds side by side: --march native,x86-64-v3 times this CPU's own build
and the AVX2 one (mosaicrt.ops.ort_library), case by case in turn.

    python -m mosaicrt.bench.ort_ops --stores fp32,fp16 --json bench/results/ort_ops_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from mosaicrt.argtypes import positive_int
from mosaicrt.bench.machine import machine_info, measure_bandwidth_gb_s, measure_peak_gflops
from mosaicrt.bench.ort_ceiling import median_ms
from mosaicrt.errors import InputError
from mosaicrt.model.config import preset
from mosaicrt.model.state import pair_bytes
from mosaicrt.ops.associative_memory import SCALED_STORES
from mosaicrt.ops.associative_memory.reference import quantize_pairs
from mosaicrt.ops.ort_library import build_library
from mosaicrt.outputs import check_output_file, write_json
from mosaicrt.runtime.ort_backend import session_options

# A mini layer's LTM on its heads (H heads of hs), blocks of S pairs as the artifact stores them.
LAYER = preset("mini")
H, HS, S = LAYER.num_heads, LAYER.head_dim, 128
# --stores names -> store dtypes (int8 and fp8: a scale per pair and head, SCALED_STORES)
STORES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "fp8": "float8_e4m3fn"}


def ltm_inputs(batch: int, chunk: int, stored: int, store: str, seed: int = 0) -> dict:
    """AssociativeMemory inputs of `batch` rows, each with `stored` pairs (blocks of S) and a
    chunk of `chunk` queries right after them: every stored pair visible (LTM delay 1)."""
    rng = np.random.default_rng(seed)
    nb = -(-stored // S)
    tau = np.arange(nb * S).reshape(nb, 1, S).repeat(batch, 1)  # (NB, B, S)
    t = stored + np.arange(chunk)[None, :].repeat(batch, 0)  # (B, C)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    keys, values = unit(nb * batch, H, S, HS), rng.standard_normal((nb * batch, H, S, HS))
    stores, scales = {}, {}
    dtype = STORES[store]
    for name, pairs in (("store_k", keys), ("store_v", values)):
        if dtype not in SCALED_STORES:
            stores[name] = pairs.astype(dtype)
            continue
        q, scale = quantize_pairs(torch.from_numpy(pairs.astype(np.float32)), dtype)
        stores[name], scales[name + "_scale"] = q.view(torch.int8).numpy(), scale.numpy()
    return {
        "q": unit(batch, chunk, H, HS),
        "t": t,
        **stores,
        "store_blocks": np.arange(nb * batch).reshape(batch, nb),
        "store_tau": np.where(tau < stored, tau, -1),
        "new_k": unit(batch, chunk, H, HS),
        "new_v": rng.standard_normal((batch, chunk, H, HS)).astype(np.float32),
        "new_tau": t - 1,
        "beta0": np.full(H, 1.0, np.float32),
        "beta1": np.full(H, 4.0, np.float32),
        "alpha": np.full(H, 0.5, np.float32),
        **scales,  # AssociativeMemoryInt8 / -Fp8: inputs 12 and 13
    }


def session(inputs: dict, threads: int, library: Path, store: str):
    """One native AssociativeMemory node (-Int8, -Fp8 for scaled stores; LTM: no window, delay
    1) in its own session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mosaicrt.onnx_graph import IR_VERSION, OPSET
    from mosaicrt.ops import DOMAIN
    from mosaicrt.ops.geometry import NO_WINDOW

    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int8): TensorProto.INT8}  # fmt: skip
    op = SCALED_STORES[STORES[store]][0] if STORES[store] in SCALED_STORES else "AssociativeMemory"
    node = helper.make_node(op, list(inputs), ["y"], domain=DOMAIN, window=NO_WINDOW, delay=1)
    graph = helper.make_graph(
        [node],
        "associative_memory",
        [helper.make_tensor_value_info(k, elem[v.dtype], v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        ir_version=IR_VERSION,
    )
    options = session_options(threads, library)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def cases(args: argparse.Namespace) -> list[dict]:
    """(kind, batch, chunk, stored, store) of every case the flags ask for."""
    out = []
    for store in args.stores.split(","):
        if store not in STORES:
            raise InputError(f"unknown store dtype {store!r}: give {', '.join(STORES)}")
        out += [{"kind": "decode", "batch": b, "chunk": 1, "stored": args.context, "store": store}
                for b in (1, 8)]  # fmt: skip
        out.append({"kind": "chunk", "batch": 1, "chunk": args.chunk, "stored": args.chunk_stored,
                    "store": store})  # fmt: skip
    return out


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, flag="--json")
    libraries = {march: build_library(march=march) for march in args.march.split(",")}
    bandwidth, peak = measure_bandwidth_gb_s(), measure_peak_gflops()
    rows = []
    for case, (march, library) in itertools.product(cases(args), libraries.items()):
        layers = [ltm_inputs(case["batch"], case["chunk"], case["stored"], case["store"], seed)
                  for seed in range(args.layers if case["kind"] == "decode" else 1)]  # fmt: skip
        sess = session(layers[0], args.threads, library, case["store"])
        ms = median_ms(lambda: [sess.run(None, x) for x in layers], args.repeats, warmup=1)
        ms /= len(layers)
        pairs = case["batch"] * case["stored"]
        row = case | {"march": march, "ms": ms}
        if case["kind"] == "decode":  # every stored key and value read once, scales included
            row["bytes"] = pairs * pair_bytes(LAYER, STORES[case["store"]])
            row["gb_s"] = row["bytes"] / (ms * 1e-3) / 1e9
            row["roofline_fraction"] = row["gb_s"] / bandwidth
            fraction = row["roofline_fraction"]
            shown = f"{row['gb_s']:5.1f} GB/s = {100 * fraction:3.0f} % of the read bandwidth"
        else:  # every query against every stored pair and the chunk's earlier ones: q.k and p.v
            seen = case["chunk"] * case["stored"] + case["chunk"] * (case["chunk"] + 1) // 2
            row["flops"] = 4 * case["batch"] * seen * H * HS
            row["gflop_s"] = row["flops"] / (ms * 1e-3) / 1e9
            row["peak_fraction"] = row["gflop_s"] / peak
            shown = f"{row['gflop_s']:5.1f} GFLOP/s = {100 * row['peak_fraction']:3.0f} % of peak"
        print(f"{march:10s} {case['kind']:6s} batch {case['batch']} chunk {case['chunk']:4d} "
              f"over {case['stored']:5d} {case['store']} pairs: {ms:7.2f} ms, {shown}",
              flush=True)  # fmt: skip
        rows.append(row)
    result = {
        "benchmark": "ort_ops",
        "heads": H,
        "head_size": HS,
        "block": S,
        "threads": args.threads,
        "rows": rows,
        "machine": machine_info() | {"bandwidth_gb_s": bandwidth, "peak_gflops": peak},
    }
    if args.json:
        write_json(args.json, result, indent=1)
    return 0


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=positive_int, default=4096, help="stored pairs, decode")
    p.add_argument("--chunk", type=positive_int, default=512, help="queries of a prefill chunk")
    p.add_argument("--chunk-stored", type=positive_int, default=1024,
                   help="stored pairs before the chunk")  # fmt: skip
    p.add_argument("--stores", default="fp32", help="comma-separated: fp32, fp16, int8, fp8")
    p.add_argument("--layers", type=positive_int, default=8,
                   help="decode: stores of this many layers read in turn, as a step reads them "
                   "(more bytes than the last-level cache holds)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--march", default="native",
                   help="comma-separated -march targets of the native ops' builds, compared "
                   "case by case (native: this CPU's, as `mosaicrt ort-ops build`; "
                   "x86-64-v3: AVX2)")  # fmt: skip
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

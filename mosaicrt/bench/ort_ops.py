"""The native AssociativeMemory kernel alone on ONNX Runtime's CPU provider, one node per case:
LTM decode over a long store (a step's layers in turn: bytes over the read bandwidth) and a
prefill chunk over stored pairs (FLOPs over the fp32 matmul peak), both measured in the same run.
The step graph around the op is bench.ort_ceiling's and `bench latency`'s; this isolates the
kernel, to compare its builds side by side: --march native,x86-64-v3 times this CPU's own build
and the AVX2 one (mosaicrt.ops.ort_library), case by case in turn. --gqa times, in turn with
each fp32 decode case, ONNX Runtime's own com.microsoft::GroupQueryAttention over the same pairs
(beta(n) folded into the query, scale 1, past and present bound to one buffer so that it reads only
the valid prefix and appends in place): the LTM half of the route that maps the memories onto ONNX
Runtime's fused attention kernels instead of a native library, checked to give the same output.

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
from mosaicrt.bench.ort_ceiling import medians_in_turn
from mosaicrt.errors import InputError
from mosaicrt.model.config import preset
from mosaicrt.model.state import pair_bytes
from mosaicrt.ops.associative_memory import SCALED_STORES
from mosaicrt.ops.associative_memory.reference import quantize_pairs
from mosaicrt.ops.geometry import NO_WINDOW, visible_count
from mosaicrt.ops.geometry import bandwidth as beta
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


class GqaRun:
    """The decode retrieval of `inputs` (a native case's, fp32) as one GroupQueryAttention node:
    each row's stored pairs copied into a (B, H, capacity, hs) past buffer that the node reads up
    to the stored count and appends the new pair to, bound as both past and present."""

    def __init__(self, inputs: dict, threads: int):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from mosaicrt.onnx_graph import IR_VERSION, OPSET

        q, blocks, tau = inputs["q"], inputs["store_blocks"], inputs["store_tau"]
        batch, stored = q.shape[0], int((tau[:, 0] >= 0).sum())
        capacity = stored + 1
        past = {}
        for name in ("store_k", "store_v"):  # pool (P, H, S, hs) -> rows (B, H, capacity, hs)
            rows = inputs[name][blocks].transpose(0, 2, 1, 3, 4).reshape(batch, H, -1, HS)
            buffer = np.zeros((batch, H, capacity, HS), np.float32)
            buffer[:, :, :stored] = rows[:, :, :stored]
            past[name] = ort.OrtValue.ortvalue_from_numpy(buffer)
        n = visible_count(inputs["t"][:, 0], NO_WINDOW, 1).astype(np.float32)  # (B,)
        b = beta(n, inputs["beta0"], inputs["beta1"], inputs["alpha"])  # (B, H)
        feeds = {
            "query": (q[:, 0] * b[:, :, None]).reshape(batch, 1, H * HS),
            "key": inputs["new_k"].reshape(batch, 1, H * HS),
            "value": inputs["new_v"].reshape(batch, 1, H * HS),
            "seqlens_k": np.full(batch, stored, np.int32),  # the new pair's row; stored + 1 in all
            "total_sequence_length": np.array(stored + 1, np.int32),
        }
        f, i32 = TensorProto.FLOAT, TensorProto.INT32
        node = helper.make_node(
            "GroupQueryAttention",
            ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length"],
            ["output", "present_key", "present_value"],
            domain="com.microsoft", num_heads=H, kv_num_heads=H, scale=1.0,
        )  # fmt: skip
        kv = [batch, H, capacity, HS]
        graph = helper.make_graph(
            [node], "gqa",
            [helper.make_tensor_value_info(k, i32 if v.dtype == np.int32 else f, v.shape)
             for k, v in feeds.items()]
            + [helper.make_tensor_value_info(k, f, kv) for k in ("past_key", "past_value")],
            [helper.make_tensor_value_info("output", f, None)]
            + [helper.make_tensor_value_info(k, f, kv) for k in ("present_key", "present_value")],
        )  # fmt: skip
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            session_options(threads, None),
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.binding = self.session.io_binding()
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        for io, store in (("key", "store_k"), ("value", "store_v")):
            self.binding.bind_ortvalue_input(f"past_{io}", past[store])
            self.binding.bind_ortvalue_output(f"present_{io}", past[store])
        self.binding.bind_output("output")

    def run(self) -> np.ndarray:
        """y (B, 1, H, hs); the new pair is written at the same row each call."""
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[-1].numpy().reshape(-1, 1, H, HS)


def check_gqa(native: np.ndarray, gqa: np.ndarray) -> None:
    """The two retrievals must agree before their times are compared (fp32 roundings apart)."""
    err = float(np.abs(native - gqa).max())
    if not err <= 1e-4:
        raise RuntimeError(f"GroupQueryAttention and the native kernel differ by {err:.2e}")


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
        runs = {"native": lambda: [sess.run(None, x) for x in layers]}
        gqa = args.gqa and case["kind"] == "decode" and case["store"] == "fp32"
        if gqa:
            gqa_layers = [GqaRun(x, args.threads) for x in layers]
            check_gqa(sess.run(None, layers[0])[0], gqa_layers[0].run())
            runs["gqa"] = lambda: [g.run() for g in gqa_layers]
        ms = {k: v / len(layers) for k, v in medians_in_turn(runs, args.repeats, 1).items()}
        pairs = case["batch"] * case["stored"]
        row = case | {"march": march, "ms": ms["native"]}
        if case["kind"] == "decode":  # every stored key and value read once, scales included
            row["bytes"] = pairs * pair_bytes(LAYER, STORES[case["store"]])
            for name, key in (("native", "gb_s"), ("gqa", "gqa_gb_s")):
                if name in ms:
                    row[key] = row["bytes"] / (ms[name] * 1e-3) / 1e9
            row["roofline_fraction"] = row["gb_s"] / bandwidth
            fraction = row["roofline_fraction"]
            shown = f"{row['gb_s']:5.1f} GB/s = {100 * fraction:3.0f} % of the read bandwidth"
            if gqa:
                row["gqa_ms"] = ms["gqa"]
                shown += f"; GroupQueryAttention {ms['gqa']:7.2f} ms, {row['gqa_gb_s']:5.1f} GB/s"
        else:  # every query against every stored pair and the chunk's earlier ones: q.k and p.v
            seen = case["chunk"] * case["stored"] + case["chunk"] * (case["chunk"] + 1) // 2
            row["flops"] = 4 * case["batch"] * seen * H * HS
            row["gflop_s"] = row["flops"] / (ms["native"] * 1e-3) / 1e9
            row["peak_fraction"] = row["gflop_s"] / peak
            shown = f"{row['gflop_s']:5.1f} GFLOP/s = {100 * row['peak_fraction']:3.0f} % of peak"
        print(f"{march:10s} {case['kind']:6s} batch {case['batch']} chunk {case['chunk']:4d} "
              f"over {case['stored']:5d} {case['store']} pairs: {ms['native']:7.2f} ms, {shown}",
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
    p.add_argument("--gqa", action="store_true",
                   help="also time ONNX Runtime's GroupQueryAttention over each fp32 decode "
                   "case's pairs, in turn with the native kernel")  # fmt: skip
    p.add_argument("--json", help="write results here")


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

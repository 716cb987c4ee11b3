"""The most of the DRAM roofline a decode step can reach with ONNX Runtime's CPU MatMuls.

A decode step must read the weights once and the valid stored pairs once (bench.roofline). This
benchmark times only those reads, done as the step graph does them and nothing else: x @ W^T
against prepacked constant weights (every projection of every layer and the head), and keys @ q,
p @ values over each layer's LTM blocks and STM ring (fed as inputs, as the runtime feeds them).
Bytes over the read bandwidth measured in the same run, divided by the time, is the roofline
fraction of a graph that had no other node: the ceiling for the decode benchmark's fraction.

    python -m mosaicrt.bench.ort_ceiling --preset mini --context 4096 \\
        --json bench/results/ort_ceiling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from mosaicrt.bench.machine import machine_info, measure_bandwidth_gb_s
from mosaicrt.export.artifact import DEFAULT_LTM_BLOCK
from mosaicrt.export.graph import IR_VERSION, OPSET
from mosaicrt.model.config import ModelConfig, preset


def weight_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every decode-step MatMul against a weight, as the exporter lays them out."""
    d, f, nM = config.hidden_size, config.intermediate_size, len(config.memories)
    heads = nM * config.num_heads
    memory_proj = (d, 2 * heads * config.head_dim + 2 * heads)  # k~, v~, log g, lam
    layer = [memory_proj, (heads * config.head_dim, d), (d, 2 * f), (f, d)]
    return layer * config.num_layers + [(d, config.vocab_size)]


def store_shapes(config: ModelConfig, context: int, block: int) -> list[tuple[tuple, int]]:
    """((NB, 1, H, S, hs), valid pairs) of every store a decode step reads at this context
    (batch 1): the STM ring whole, the LTM blocks that hold a visible pair."""
    H, hs = config.num_heads, config.head_dim
    stores = []
    for _ in range(config.num_layers):
        if "stm" in config.memories:
            ring = config.stm_window - 1
            stores.append(((1, 1, H, ring, hs), min(context, ring)))
        if "ltm" in config.memories:
            visible = max(0, context - config.ltm_delay + 1)
            stores.append(((max(1, -(-visible // block)), 1, H, block, hs), visible))
    return stores


def session(nodes: list, inputs: list, outputs: list[str], inits: list, threads: int):
    import onnxruntime as ort

    graph = helper.make_graph(
        nodes,
        "ceiling",
        inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def median_ms(run, steps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def weights_case(config: ModelConfig, threads: int) -> tuple[float, int]:
    """(median ms, bytes) of every weight GEMV of one decode step, one after the other."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, feeds, outs, nbytes = [], [], [], {}, [], 0
    for i, (k, n) in enumerate(weight_shapes(config)):
        w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nbytes += w.nbytes
        x = f"x{k}"
        if x not in feeds:
            feeds[x] = rng.standard_normal((1, 1, k)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, k]))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        outs.append(f"y{i}")
    sess = session(nodes, inputs, outs, inits, threads)
    return median_ms(lambda: sess.run(outs, feeds), 50), nbytes


def stores_case(config: ModelConfig, context: int, block: int, threads: int) -> tuple[float, int]:
    """(median ms, bytes) of keys @ q and p @ values over every store of one decode step."""
    rng = np.random.default_rng(1)
    nodes, inputs, feeds, outs, nbytes = [], [], {}, [], 0
    H, hs = config.num_heads, config.head_dim
    feeds["q"] = rng.standard_normal((1, H, hs, 1)).astype(np.float32)
    inputs.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, list(feeds["q"].shape)))
    for i, (shape, valid) in enumerate(store_shapes(config, context, block)):
        for name in (f"k{i}", f"v{i}"):
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        p = f"p{i}"
        feeds[p] = rng.random((shape[0], 1, H, 1, shape[3])).astype(np.float32)
        inputs.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, list(feeds[p].shape)))
        nodes.append(helper.make_node("MatMul", [f"k{i}", "q"], [f"s{i}"]))
        nodes.append(helper.make_node("MatMul", [p, f"v{i}"], [f"y{i}"]))
        outs += [f"s{i}", f"y{i}"]
        nbytes += 2 * valid * H * hs * 4  # valid pairs only, as the roofline counts them
    sess = session(nodes, inputs, outs, [], threads)
    return median_ms(lambda: sess.run(outs, feeds), 30), nbytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--block", type=int, default=DEFAULT_LTM_BLOCK)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    config = preset(args.preset)
    bandwidth = measure_bandwidth_gb_s()
    w_ms, w_bytes = weights_case(config, args.threads)
    s_ms, s_bytes = stores_case(config, args.context, args.block, args.threads)

    def fraction(nbytes: int, ms: float) -> float:
        return nbytes / (bandwidth * 1e9) / (ms * 1e-3)

    result = {
        "benchmark": "ort_ceiling",
        "machine": machine_info(),
        "preset": args.preset,
        "context": args.context,
        "ltm_block": args.block,
        "threads": args.threads,
        "bandwidth_gb_s": bandwidth,
        "weights": {"ms": w_ms, "bytes": w_bytes, "roofline_fraction": fraction(w_bytes, w_ms)},
        "stores": {"ms": s_ms, "bytes": s_bytes, "roofline_fraction": fraction(s_bytes, s_ms)},
        "step": {
            "ms": w_ms + s_ms,
            "bytes": w_bytes + s_bytes,
            "roofline_fraction": fraction(w_bytes + s_bytes, w_ms + s_ms),
        },
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"read bandwidth {bandwidth:.1f} GB/s, {args.preset} at context {args.context}:")
    for part in ("weights", "stores", "step"):
        r = result[part]
        print(
            f"  {part:8s} {r['bytes'] / 1e6:7.1f} MB in {r['ms']:6.2f} ms: "
            f"{100 * r['roofline_fraction']:.0f} % of the roofline"
        )


if __name__ == "__main__":
    main()

"""The most of the DRAM roofline a decode step can reach with ONNX Runtime's CPU MatMuls.

A decode step must read the weights once and the valid stored pairs once (bench.roofline). This
benchmark times only those reads, done as the step graph does them and nothing else: x @ W^T
against prepacked constant weights (every projection of every layer and the head), and keys @ q,
p @ values over each layer's LTM blocks and STM ring (fed as inputs, as the runtime feeds them).
Bytes over the read bandwidth measured in the same run (the mean of a measure before the cases and
one after them), divided by the time, is the roofline fraction of a graph that had no other node:
the ceiling for the decode benchmark's fraction.
The weight MatMuls are also timed for a step of --batch rows (default 8): MLAS multiplies one row
by a GEMV and several by a GEMM, which read the same weights at different rates. And the same
weight matrices are only read, a torch sum of each in turn: a step reads its weights as separate
matrices, one parallel region each, not as the probe's one large buffer, and the sums are what
such a read costs with no arithmetic.

In the same run it measures what the rest of a step costs: the exported step graph of a random
checkpoint, with the mosaic ops as their function bodies and (when built, `mosaicrt ort-ops build`)
as the native kernels, alone and with each layer's memory nodes one native node (`--ort-ops fused`):
the nodes ONNX Runtime runs after its optimizations, its decode TPOT at the context and at a short
one, every path's steps timed in turn, and the runtime's bookkeeping around session.run; and ONNX
Runtime's cost per node of a chain of small elementwise nodes. It also times the same step graph
without its weight reads (every MatMul against a weight cut to WEIGHT_ROWS rows of it, its input
sliced to match: the same nodes and state reads, a few KB of weights): what the step costs besides
reading the weights, in turn with the full steps (whose weight reads evict the caches, as a real
step's do) and, at the short context, with its runs back to back (caches warm). With those it states
the budget of a target fraction (default 80 %): the step time it allows, minus the MatMuls' time,
against the other nodes' dispatch alone and against that measured rest.

    python -m mosaicrt.bench.ort_ceiling --preset mini --context 4096 \\
        --json bench/results/ort_ceiling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mosaicrt.argtypes import positive_int, probability
from mosaicrt.bench.decode import prefill
from mosaicrt.bench.machine import machine_info, measure_bandwidth_gb_s
from mosaicrt.bench.roofline import decode_bytes
from mosaicrt.errors import InputError
from mosaicrt.export.artifact import DEFAULT_LTM_BLOCK, MODEL_FILE, export_artifact
from mosaicrt.model.checkpoint import random_tensors, write_checkpoint
from mosaicrt.model.config import ModelConfig, preset
from mosaicrt.onnx_graph import IR_VERSION, OPSET
from mosaicrt.ops import DOMAIN, DOMAIN_VERSION
from mosaicrt.ops.ort_library import find_library
from mosaicrt.runtime.huge_pages import collapse_new_memory
from mosaicrt.runtime.ort_backend import (
    OrtBackend,
    fused_graph,
    native_ops_library,
    read_graph,
    session_options,
)


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


def session(
    nodes: list,
    inputs: list,
    outputs: list[str],
    inits: list,
    threads: int,
    library: Path | None = None,
):
    """A CPU session of these nodes (the native mosaic ops registered from `library`)."""
    import onnxruntime as ort

    graph = helper.make_graph(
        nodes,
        "ceiling",
        inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    with collapse_new_memory():  # its packed weights on huge pages, as OrtBackend keeps them
        return ort.InferenceSession(
            model.SerializeToString(),
            session_options(threads, library),
            providers=["CPUExecutionProvider"],
        )


def medians_in_turn(runs: dict[str, Callable[[], object]], steps: int, warmup: int = 10) -> dict:
    """Median ms of each run, the runs taking turns step by step (a drifting machine's speed
    then hits them alike)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def median_ms(run: Callable[[], object], steps: int, warmup: int = 10) -> float:
    return medians_in_turn({"run": run}, steps, warmup)["run"]


def weights_run(
    config: ModelConfig, threads: int, rows: int = 1, row_matmul_library: Path | None = None
) -> tuple[Callable, int]:
    """(run, bytes): every weight MatMul of one decode step of `rows` rows, one after the other
    (one row: MLAS's GEMV; more: its GEMM, which reads the same weights once); given the native
    library, each a mosaic::RowMatMul instead (ops/ort_row_matmul.h: the weight streamed row by
    row, in `threads` ranges of its rows)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, feeds, outs, nbytes = [], [], [], {}, [], 0
    for i, (k, n) in enumerate(weight_shapes(config)):
        w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nbytes += w.nbytes
        x = f"x{k}"
        if x not in feeds:
            feeds[x] = rng.standard_normal((rows, 1, k)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [rows, 1, k]))
        if row_matmul_library is None:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        else:
            nodes.append(helper.make_node("RowMatMul", [x, f"w{i}"], [f"y{i}"], domain=DOMAIN,
                                          parts=threads))  # fmt: skip
        outs.append(f"y{i}")
    sess = session(nodes, inputs, outs, inits, threads, row_matmul_library)
    return lambda: sess.run(outs, feeds), nbytes


def weights_summed_run(config: ModelConfig) -> Callable:
    """The same weight matrices read with no arithmetic: a torch sum of each, one after the other
    (each a parallel region of its own, as each MatMul node is): how fast a step can read its
    weights as separate matrices, against the bandwidth probe's one large buffer."""
    weights = [torch.ones(k, n) for k, n in weight_shapes(config)]
    return lambda: [w.sum() for w in weights]


def weights_cases(config: ModelConfig, threads: int, batch: int) -> tuple[dict, int]:
    """(median ms by case, bytes) of the weight reads: the sums (`weights_summed`) first, then
    the MatMuls at batch 1 (`weights`) and at `batch` rows (`weights_batch`) in turn. Not all
    in turn: torch's OpenMP threads spin for milliseconds after a parallel sum, taking the cores
    from the session that runs next (which then measured 2x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the sums on as many threads as the sessions
    try:
        summed = median_ms(weights_summed_run(config), 50)
    finally:
        torch.set_num_threads(before)
    gemv, nbytes = weights_run(config, threads)
    runs = {"weights": gemv, "weights_batch": weights_run(config, threads, batch)[0]}
    return medians_in_turn(runs, 50) | {"weights_summed": summed}, nbytes


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


def dispatch_case(config: ModelConfig, threads: int, nodes: int = 1000) -> float:
    """Microseconds per node of a chain of small elementwise nodes on a hidden vector (1, 1, d):
    the least any non-MatMul node of a decode step costs."""
    rng = np.random.default_rng(2)
    shape = [1, 1, config.hidden_size]
    chain, prev = [], "x"
    for i in range(nodes):  # alternating ops, so no optimizer pass merges the chain
        chain.append(helper.make_node("Mul" if i % 2 else "Add", [prev, "c"], [f"y{i}"]))
        prev = f"y{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    inits = [numpy_helper.from_array(np.full([1], 1.0001, np.float32), "c")]
    sess = session(chain, inputs, [prev], inits, threads)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    return 1e3 * median_ms(lambda: sess.run([prev], feeds), 100) / nodes


WEIGHT_ROWS = 8  # rows of each weight the step graph keeps without its weight reads


def without_weight_reads(artifact: Path, out: Path) -> Path:
    """A copy of the artifact whose every MatMul against a 2-D weight multiplies the first
    WEIGHT_ROWS columns of its input by the first WEIGHT_ROWS rows of the weight: the same
    nodes, outputs of the same shapes, and next to nothing of the weights read."""
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    model = onnx.load(artifact / MODEL_FILE)
    graph = model.graph
    other_uses = {name for node in graph.node for i, name in enumerate(node.input)
                  if node.op_type != "MatMul" or i != 1}  # fmt: skip
    weights = {w.name: w for w in graph.initializer
               if len(w.dims) == 2 and w.name not in other_uses}  # fmt: skip
    nodes, cut = [], set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        name = node.input[1]
        if name not in cut:  # the weight's first rows, in its place
            rows = numpy_helper.to_array(weights[name])[:WEIGHT_ROWS]
            weights[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rows), name))
            cut.add(name)
        x = f"{node.output[0]}_first_columns"
        nodes.append(
            helper.make_node("Slice", [node.input[0], "cut_0", "cut_rows", "cut_axis"], [x])
        )
        nodes.append(helper.make_node("MatMul", [x, name], list(node.output), name=node.name))
    for name, value in (("cut_0", 0), ("cut_rows", WEIGHT_ROWS), ("cut_axis", -1)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, out / MODEL_FILE)
    return out


def optimized_nodes(
    model_path: Path, threads: int, workdir: Path, library: Path | None
) -> tuple[int, int]:
    """(all nodes, MatMul nodes) of the graph ONNX Runtime runs: function bodies inlined, or
    the mosaic nodes on the native library's kernels."""
    import onnxruntime as ort

    options = session_options(threads, library)
    options.optimized_model_filepath = str(workdir / "optimized.onnx")
    options.log_severity_level = 3  # the note that an optimized model is machine-specific
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return len(ops), sum(op in ("MatMul", "FusedMatMul", "Gemm") for op in ops)


# A decode step's feed at batch 1, as the batcher steps: one token, one length.
DECODE_FEED = (np.ones((1, 1), np.int64), np.ones(1, np.int64))


def step_case(
    config: ModelConfig,
    contexts: list[int],
    block: int,
    threads: int,
    steps: int,
    paths: list[str],
) -> dict[str, tuple[int, int, dict]]:
    """The exported step graph of a random checkpoint with the mosaic ops as each of `paths`
    (ort_ops): its node counts, and at each context (batch 1) its decode TPOT and the time of
    session.run within it (the rest is the runtime's bookkeeping), and session.run of the same
    graph without its weight reads (without_weight_reads). The steps of every path, context and
    graph are timed in turn, round after round, so that the machine's drift hits them alike."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_checkpoint(random_tensors(config, 0), config, workdir / "ckpt")
        warmup = 3
        capacity = max(contexts) + 2 * (warmup + steps)  # each step adds a token
        artifact = export_artifact(
            workdir / "ckpt", workdir / "onnx", max_context=capacity, ltm_block=block
        )
        cut = without_weight_reads(artifact, workdir / "cut")
        counts = {p: path_nodes(artifact, config, threads, workdir, p) for p in paths}
        backends = {
            (ort_ops, kind): OrtBackend(path, device="cpu", threads=threads, ort_ops=ort_ops)
            for ort_ops in paths
            for kind, path in (("step", artifact), ("no_weight_reads", cut))
        }
        torch.set_num_threads(OrtBackend.torch_threads)
        states = {
            (key, c): prefill(backend, c, capacity, 512)
            for key, backend in backends.items()
            for c in contexts
        }
        step_s, run_s = steps_in_turn(backends, states, warmup, steps)
        ms = lambda seconds: 1e3 * statistics.median(seconds)  # noqa: E731
        short = min(contexts)
        found = {}
        for ort_ops in paths:
            step, no_weights = (ort_ops, "step"), (ort_ops, "no_weight_reads")
            timings = {
                c: {
                    "tpot_ms": ms(step_s[step, c]),
                    "session_run_ms": ms(run_s[step, c]),
                    "no_weight_reads_run_ms": ms(run_s[no_weights, c]),
                }
                for c in contexts
            }
            # The short step without weight reads again, its runs back to back (alone in the
            # turn): nothing between them evicts the caches, as the weight reads of the steps in
            # turn do.
            alone = {(no_weights, short): states[no_weights, short]}
            _, back_to_back = steps_in_turn(backends, alone, warmup, steps)
            timings[short]["no_weight_reads_back_to_back_run_ms"] = ms(
                back_to_back[no_weights, short]
            )
            found[ort_ops] = (*counts[ort_ops], timings)
        return found


def path_nodes(
    artifact: Path, config: ModelConfig, threads: int, workdir: Path, ort_ops: str
) -> tuple[int, int]:
    """(nodes, MatMul nodes) of the graph ONNX Runtime runs for the artifact as `ort_ops`."""
    library = native_ops_library(ort_ops, ["CPUExecutionProvider"])
    graph = artifact / MODEL_FILE
    if ort_ops == "fused":  # the graph the session runs: each layer's memories one node
        fused = workdir / "fused.onnx"
        onnx.save(fused_graph(read_graph(graph, False), config, ort_ops, artifact), fused)
        graph = fused
    return optimized_nodes(graph, threads, workdir, library)


def steps_in_turn(backends: dict, states: dict, warmup: int, steps: int) -> tuple[dict, dict]:
    """Decode steps of every (backend, context) state in turn, warmup + steps rounds: each
    step's time and its session.run's, by (backend key, context), the warmup left out."""
    step_s = {key: [] for key in states}
    run_s = {key: [] for key in states}
    for backend in backends.values():
        backend.run_seconds = []  # the backend's timing hook: session.run's time
    for i in range(warmup + steps):  # in turn (each session's pool stops when its run returns)
        for (key, c), state in states.items():
            t0 = time.perf_counter()
            backends[key].step(*DECODE_FEED, state, True, device_logits=True)
            if i >= warmup:
                step_s[key, c].append(time.perf_counter() - t0)
                run_s[key, c].append(backends[key].run_seconds[-1])
    return step_s, run_s


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mini")
    p.add_argument("--context", type=positive_int, default=4096)
    p.add_argument("--block", type=positive_int, default=DEFAULT_LTM_BLOCK)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--target", type=probability, default=0.8, help="roofline fraction to budget")
    p.add_argument("--steps", type=positive_int, default=30, help="timed decode steps")
    p.add_argument(
        "--short-context", type=positive_int, default=16, help="also time the step graph here"
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=8,
        help="also time the weights read for this many rows",
    )
    p.add_argument("--json", help="write results here")


def main(args: argparse.Namespace) -> int:
    if not 0 < args.short_context < args.context:
        raise InputError("--short-context must be below --context")
    result = measure(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Every case of the module docstring, in one run, against the bandwidth measured in it."""
    config = preset(args.preset)
    bandwidth_before = measure_bandwidth_gb_s()
    weights_ms, w_bytes = weights_cases(config, args.threads, args.batch)
    w_ms, wb_ms, summed_ms = (weights_ms[k] for k in ("weights", "weights_batch", "weights_summed"))
    s_ms, s_bytes = stores_case(config, args.context, args.block, args.threads)
    per_node_us = dispatch_case(config, args.threads)
    short_stores_ms = stores_case(config, args.short_context, args.block, args.threads)[0]
    paths = ["functions"] + (["native", "fused"] if find_library() else [])
    contexts = [args.short_context, args.context]
    found = step_case(config, contexts, args.block, args.threads, args.steps, paths)
    # The mean of the bandwidths measured before and after the cases: what a machine whose
    # speed drifts had on average while they ran.
    bandwidth_after = measure_bandwidth_gb_s()
    bandwidth = (bandwidth_before + bandwidth_after) / 2
    roofline_ms = decode_bytes(config, [args.context]) / (bandwidth * 1e9) * 1e3
    steps = {}
    for ort_ops, (nodes, matmuls, timings) in found.items():
        step = {"ort_ops": ort_ops, "nodes": nodes, "matmul_nodes": matmuls,
                **timings[args.context]}  # fmt: skip
        step["short_context"] = {
            "context": args.short_context,
            **timings[args.short_context],
            "stores_ms": short_stores_ms,  # the store MatMuls alone at that context
        }
        step["roofline_fraction"] = roofline_ms / step["tpot_ms"]
        step["bookkeeping_ms"] = step["tpot_ms"] - step["session_run_ms"]
        steps[ort_ops] = step
    step = steps[paths[-1]]  # the fastest path this machine has
    other_nodes = step["nodes"] - step["matmul_nodes"]
    budget = {
        "target_fraction": args.target,
        "step_ms": roofline_ms / args.target,  # the longest step that meets the target
        "matmul_ms": w_ms + s_ms,  # the ceiling's MatMuls, nothing else
        "left_ms": roofline_ms / args.target - (w_ms + s_ms),
        "dispatch_floor_ms": other_nodes * per_node_us / 1e3,
        # session.run without its weight reads: the other nodes and the state reads, measured
        "rest_ms": step["no_weight_reads_run_ms"],
        "bookkeeping_ms": step["bookkeeping_ms"],
    }

    def fraction(nbytes: int, ms: float) -> float:
        return nbytes / (bandwidth * 1e9) / (ms * 1e-3)

    return {
        "benchmark": "ort_ceiling",
        "machine": machine_info(),
        "preset": args.preset,
        "context": args.context,
        "short_context": args.short_context,
        "ltm_block": args.block,
        "threads": args.threads,
        "bandwidth_gb_s": bandwidth,
        "bandwidth_before_after_gb_s": [bandwidth_before, bandwidth_after],
        "weights": {"ms": w_ms, "bytes": w_bytes, "roofline_fraction": fraction(w_bytes, w_ms)},
        "weights_summed": {
            "ms": summed_ms,
            "bytes": w_bytes,
            "roofline_fraction": fraction(w_bytes, summed_ms),
        },
        "weights_batch": {
            "rows": args.batch,
            "ms": wb_ms,
            "bytes": w_bytes,
            "roofline_fraction": fraction(w_bytes, wb_ms),
        },
        "stores": {"ms": s_ms, "bytes": s_bytes, "roofline_fraction": fraction(s_bytes, s_ms)},
        "step": {
            "ms": w_ms + s_ms,
            "bytes": w_bytes + s_bytes,
            "roofline_fraction": fraction(w_bytes + s_bytes, w_ms + s_ms),
        },
        "dispatch_us_per_node": per_node_us,
        "step_graph": step,
        "step_graphs": steps,
        "budget": budget,
    }


def print_summary(result: dict) -> None:
    step, budget = result["step_graph"], result["budget"]
    short = step["short_context"]
    print(f"read bandwidth {result['bandwidth_gb_s']:.1f} GB/s, {result['preset']} at context "
          f"{result['context']}:")  # fmt: skip
    for part in ("weights", "stores", "step"):
        r = result[part]
        print(
            f"  {part:8s} {r['bytes'] / 1e6:7.1f} MB in {r['ms']:6.2f} ms: "
            f"{100 * r['roofline_fraction']:.0f} % of the roofline"
        )
    summed = result["weights_summed"]
    print(f"  the weights only read (a sum of each matrix): {summed['ms']:6.2f} ms, "
          f"{100 * summed['roofline_fraction']:.0f} % of the roofline")  # fmt: skip
    wb = result["weights_batch"]
    print(f"  the weights at batch {wb['rows']}: {wb['ms']:6.2f} ms, "
          f"{100 * wb['roofline_fraction']:.0f} % of the roofline")  # fmt: skip
    for path in result["step_graphs"].values():
        print(
            f"  step graph, mosaic ops as {path['ort_ops']}: {path['nodes']} nodes "
            f"({path['matmul_nodes']} MatMul), TPOT {path['tpot_ms']:.2f} ms = "
            f"{100 * path['roofline_fraction']:.0f} % of the roofline (session.run "
            f"{path['session_run_ms']:.2f} ms, bookkeeping {path['bookkeeping_ms']:.2f} ms); "
            f"from context {short['context']} its session.run grows by "
            f"{path['session_run_ms'] - path['short_context']['session_run_ms']:.2f} ms"
        )
    print(
        f"  the store MatMuls alone grow by {result['stores']['ms'] - short['stores_ms']:.2f} ms "
        f"from context {short['context']} to {result['context']}"
    )
    other_nodes = step["nodes"] - step["matmul_nodes"]
    print(
        f"  at {100 * budget['target_fraction']:.0f} %: a step may take "
        f"{budget['step_ms']:.2f} ms; the MatMuls alone take {budget['matmul_ms']:.2f} ms, "
        f"leaving {budget['left_ms']:.2f} ms "
        f"for {other_nodes} other nodes, whose dispatch alone costs "
        f"{budget['dispatch_floor_ms']:.2f} ms ({result['dispatch_us_per_node']:.2f} us each), "
        f"plus {budget['bookkeeping_ms']:.2f} ms of bookkeeping; without its weight reads the "
        f"step graph's session.run takes {budget['rest_ms']:.2f} ms (at context "
        f"{short['context']}: {short['no_weight_reads_run_ms']:.2f} ms, "
        f"{short['no_weight_reads_back_to_back_run_ms']:.2f} ms with its runs back to back, "
        "the caches warm)"
    )


if __name__ == "__main__":
    from mosaicrt.entry import run_module

    raise SystemExit(run_module(__doc__, add_cli_args, main))

"""Each layer's memory nodes of a step graph as one native `mosaic::LayerMemories` node, for an
ONNX Runtime session that registers the native library (ops/ort_layer_memories.h); and smaller
rewrites for the same sessions: each feed-forward's activation one native `mosaic::SwiGLU` node
(ops/ort_swiglu.h), each residual Add with the RMSNorm after it one of ONNX Runtime's
SkipSimplifiedLayerNormalization nodes, and a last-only graph's logits scanned by one native
`mosaic::RowScan` node (ops/ort_row_scan.h) for the batcher.

The artifact keeps its portable nodes (GatedKeyScan, one AssociativeMemory per memory, and about
thirty small standard nodes a layer: the projection's split, the new pairs, the pending key and
value, the heads' concatenation) for TensorRT and every runtime without the library. In a session
with the library each of those nodes costs a few microseconds of dispatch and of caches the weight
reads have emptied; the fused kernel does the same work in one node. The rewrite reads what it
needs from the graph (the per-head constants, the windows and delays) and checks the nodes it reads
them from: a graph whose layers are not export.builder's fp32-store pattern (int8, fp8 or fp16
stores) is left as it is, with the reason. tests/test_ort_fusion.py runs the rewritten graph
against the unfused one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mosaicrt.export import io_spec
from mosaicrt.ops import DOMAIN


class NotFusable(Exception):
    """The graph is not the pattern the fused kernel replaces (the message says where)."""


class Graph:
    """A step graph's nodes with their producers and consumers, by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {v.name: v for v in self.graph.input}

    def input_type(self, tensor: str) -> int | None:
        """The element type of a graph input (None for any other tensor)."""
        value = self.inputs.get(tensor)
        return value.type.tensor_type.elem_type if value is not None else None

    def made_by(self, tensor: str, op_type: str) -> onnx.NodeProto:
        node = self.producer.get(tensor)
        if node is None or node.op_type != op_type:
            found = node.op_type if node is not None else "no node"
            raise NotFusable(f"{tensor} comes from {found}, not {op_type}")
        return node

    def only_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto:
        users = self.consumers[tensor]
        if len(users) != 1 or users[0].op_type != op_type:
            raise NotFusable(f"{tensor} is not read by one {op_type} alone")
        return users[0]

    def constant(self, tensor: str) -> np.ndarray:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.made_by(tensor, "Constant")
        return numpy_helper.to_array(node.attribute[0].t)

    def const_operand(self, node: onnx.NodeProto) -> tuple[np.ndarray, str]:
        """(the constant, the other input) of a binary node with one constant input."""
        for i in (0, 1):
            try:
                return self.constant(node.input[i]), node.input[1 - i]
            except NotFusable:
                continue
        raise NotFusable(f"{node.name} has no constant input")


def attribute(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise NotFusable(f"{node.name} has no attribute {name}")


def value_mixing(g: Graph, layer: int, v_raw: str) -> dict:
    """gamma, 1 - gamma, alpha_psi (per head) and the normalization's eps, from the nodes that
    make new.{layer}.values = alpha_psi * normalize(gamma * v_prev + (1 - gamma) * v~)."""
    alpha_psi, normalized = g.const_operand(
        g.made_by(io_spec.new_pairs_name(layer, "values"), "Mul")
    )
    div = g.made_by(normalized, "Div")
    mixed = div.input[0]
    norm_eps, norm = g.const_operand(g.made_by(div.input[1], "Max"))
    if g.made_by(norm, "ReduceL2").input[0] != mixed:
        raise NotFusable(f"layer {layer}: the values are not L2-normalized")
    terms = [g.const_operand(g.made_by(x, "Mul")) for x in g.made_by(mixed, "Add").input]
    now = [c for c, x in terms if x == v_raw]
    before = [c for c, x in terms if x != v_raw]
    if len(now) != 1 or len(before) != 1:
        raise NotFusable(f"layer {layer}: the values do not mix v~ with the one before")
    return {
        "gamma": before[0].reshape(-1),
        "one_minus_gamma": now[0].reshape(-1),
        "alpha_psi": alpha_psi.reshape(-1),
        "norm_eps": float(norm_eps),
    }


def layer_node(g: Graph, layer: int, memories: tuple[str, ...]) -> tuple[onnx.NodeProto, list]:
    """The LayerMemories node for `layer`, and the tensors it stops at (its inputs)."""
    past = {f: io_spec.small_name("past", layer, f) for f in io_spec.SMALL_FIELDS}
    present = {f: io_spec.small_name("present", layer, f) for f in io_spec.SMALL_FIELDS}
    scan = g.made_by(present["s"], "GatedKeyScan")
    k_raw, log_g, log_lam, valid, s, mx = scan.input
    split = g.made_by(g.made_by(k_raw, "Reshape").input[0], "Split")
    if len(split.output) != 4 or split.output[2] != log_g or (s, mx) != (past["s"], past["mx"]):
        raise NotFusable(f"layer {layer}: the key scan's inputs are not the projection's")
    if g.made_by(g.made_by(log_lam, "Neg").input[0], "Abs").input[0] != split.output[3]:
        raise NotFusable(f"layer {layer}: log lambda is not -|lambda|")
    v_raw = g.only_consumer(split.output[1], "Reshape").output[0]
    retrievals = [
        next((n for n in g.consumers[io_spec.store_name(layer, kind, "keys")]
              if n.op_type == "AssociativeMemory"), None)
        for kind in memories
    ]  # fmt: skip
    if any(node is None or len(node.input) != 12 for node in retrievals):
        raise NotFusable(f"layer {layer}: a memory is not read by AssociativeMemory on fp stores")
    if any(g.input_type(n.input[i]) != onnx.TensorProto.FLOAT for n in retrievals for i in (2, 3)):
        raise NotFusable("the fused kernel reads float32 stores only")
    y = retrievals[0].output[0]
    if len(memories) > 1:
        y = g.only_consumer(y, "Concat").output[0]
    y = g.only_consumer(y, "Reshape").output[0]
    first = retrievals[0].input
    inputs = [split.input[0], valid, first[1], first[8], s, mx, past["k_pend"], past["v_pend"]]
    for node in retrievals:
        inputs += list(node.input[2:6])  # store_k, store_v, store_blocks, store_tau
    outputs = [y, *present.values()] + [
        io_spec.new_pairs_name(layer, f) for f in ("keys", "values")
    ]
    params = value_mixing(g, layer, v_raw)
    for i, name in ((9, "beta0"), (10, "beta1"), (11, "alpha")):
        params[name] = np.concatenate([g.constant(n.input[i]).reshape(-1) for n in retrievals])
    node = helper.make_node(
        "LayerMemories",
        inputs,
        outputs,
        name=f"/model/layers.{layer}/LayerMemories",
        domain=DOMAIN,
        eps=float(attribute(scan, "eps")),
        window=[int(attribute(n, "window")) for n in retrievals],
        delay=[int(attribute(n, "delay")) for n in retrievals],
        **{k: [float(x) for x in v] if isinstance(v, np.ndarray) else v for k, v in params.items()},
    )
    return node, inputs


def block_nodes(g: Graph, outputs: list[str], inputs: list[str]) -> set[int]:
    """Indices of the nodes on the way from `inputs` to `outputs`."""
    stop, seen, todo = set(inputs), set(), list(outputs)
    index = {id(node): i for i, node in enumerate(g.graph.node)}
    while todo:
        node = g.producer.get(todo.pop())
        if node is None or index[id(node)] in seen:
            continue
        seen.add(index[id(node)])
        todo += [x for x in node.input if x and x not in stop]
    return seen


def still_read(nodes, candidates: set[int], made: set[str], graph_outputs: set[str]) -> set[int]:
    """The candidates that the graph still reads once the rest are gone (a constant or a step
    tensor another layer reads too), and the nodes they read, and so on; `made` are the fused
    nodes' outputs, which no replaced node makes any more."""
    kept: set[int] = set()
    while True:
        read = graph_outputs | {x for i, n in enumerate(nodes) if i not in candidates - kept
                                for x in n.input}  # fmt: skip
        more = {i for i in candidates - kept if set(nodes[i].output) & (read - made)}
        if not more:
            return kept
        kept |= more


def fuse_layer_memories(model: onnx.ModelProto, num_layers: int, memories: tuple[str, ...]) -> str:
    """Rewrite `model` in place, every layer's memory nodes one LayerMemories node; '' when done,
    else why not (the model is then left as it was)."""
    g = Graph(model)
    try:
        fused = [layer_node(g, layer, memories) for layer in range(num_layers)]
    except NotFusable as exc:
        return str(exc)
    nodes = list(g.graph.node)
    blocks = [block_nodes(g, list(node.output), inputs) for node, inputs in fused]
    made = {out for node, _ in fused for out in node.output}
    graph_outputs = {o.name for o in g.graph.output}
    candidates = set().union(*blocks)
    drop = candidates - still_read(nodes, candidates, made, graph_outputs)
    # Each fused node goes where the last node of its block was: after all its inputs' makers.
    placed = {max(block): node for block, (node, _) in zip(blocks, fused)}
    rewritten = []
    for i, node in enumerate(nodes):
        if i in placed:
            rewritten.append(placed[i])
        if i not in drop:
            rewritten.append(node)
    del g.graph.node[:]
    g.graph.node.extend(without_dead_nodes(rewritten, graph_outputs))
    drop_unread_initializers(g.graph)
    return ""


def skip_norm(g: Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list]:
    """A residual Add and the RMSNorm of its sum (export.builder's rmsnorm pattern, ending in
    `mul`) as one com.microsoft SkipSimplifiedLayerNormalization node, which also returns the
    sum; with the nodes it replaces. NotFusable where `mul` ends no such pattern."""
    div = g.made_by(mul.input[0], "Div")
    total = div.input[0]  # the residual sum, which the next residual Add reads too
    sqrt = g.made_by(div.input[1], "Sqrt")
    add_eps = g.made_by(sqrt.input[0], "Add")
    eps, mean_square = g.const_operand(add_eps)
    mean = g.made_by(mean_square, "ReduceMean")
    power = g.made_by(mean.input[0], "Pow")
    residual = g.made_by(total, "Add")
    if power.input[0] != total or mul.input[1] not in g.initializers:
        raise NotFusable(f"{mul.name} does not end an RMSNorm of a residual sum")
    node = helper.make_node(
        "SkipSimplifiedLayerNormalization",
        [residual.input[0], residual.input[1], mul.input[1]],
        [mul.output[0], "", "", total],  # (mean and inverse deviation not asked for)
        name=f"{mul.name}/skip_norm",
        domain="com.microsoft",
        epsilon=float(eps),
    )
    return node, [mul, div, sqrt, add_eps, mean, power, residual]


def fuse_skip_norms(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place, each residual Add and the RMSNorm after it one ONNX Runtime
    SkipSimplifiedLayerNormalization node (its CPU kernel: one node instead of two, each of
    which a decode step otherwise pays in cold caches). Returns how many were fused."""
    return replace_patterns(model, "Mul", skip_norm)


def swiglu(g: Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list]:
    """silu(gate) * up of export.builder's feed-forward (a Split of the gate-and-up projection
    in two halves, Sigmoid, Mul, Mul ending in `mul`) as one native mosaic::SwiGLU node of the
    projection (ops/ort_swiglu.h); with the nodes it replaces. NotFusable where `mul` ends no
    such pattern."""
    silu = g.made_by(mul.input[0], "Mul")
    split = g.made_by(mul.input[1], "Split")
    sigmoid = g.made_by(silu.input[1], "Sigmoid")
    gate, up = split.output
    halves = g.constant(split.input[1]) if len(split.input) > 1 else None
    if (
        attribute(split, "axis") != -1
        or halves is None
        or len(halves) != 2
        or halves[0] != halves[1]
        or (silu.input[0], sigmoid.input[0], mul.input[1]) != (gate, gate, up)
        or sorted(n.op_type for n in g.consumers[gate]) != ["Mul", "Sigmoid"]
        or len(g.consumers[up]) != 1
        or len(g.consumers[silu.output[0]]) != 1
    ):
        raise NotFusable(f"{mul.name} does not end silu(gate) * up of one projection's halves")
    node = helper.make_node(
        "SwiGLU", [split.input[0]], [mul.output[0]], name=f"{mul.name}/swiglu", domain=DOMAIN
    )
    return node, [mul, silu, sigmoid, split]


def fuse_swiglu(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place, each feed-forward's Split, Sigmoid and two Muls one native
    mosaic::SwiGLU node (a session that registers the library: four nodes' dispatch and cold
    caches per layer become one). Returns how many were fused."""
    return replace_patterns(model, "Mul", swiglu)


def add_row_scan(model: onnx.ModelProto) -> bool:
    """Add a native mosaic::RowScan node after the fp32 logits (B, V) of a last-only graph, as
    the output io_spec.ROW_SCAN (B,) int64: each row's greedy token, -1 where the row is not
    finite (sampling.scan_rows, ops/ort_row_scan.h). It reads the logits while they are in the
    caches; the host reads its B numbers instead. False (nothing added) for logits of every
    position."""
    logits = next(o for o in model.graph.output if o.name == io_spec.LOGITS)
    tensor = logits.type.tensor_type
    if len(tensor.shape.dim) != 2 or tensor.elem_type != onnx.TensorProto.FLOAT:
        return False
    batch = tensor.shape.dim[0]
    model.graph.node.append(
        helper.make_node(
            "RowScan", [io_spec.LOGITS], [io_spec.ROW_SCAN], name="/row_scan", domain=DOMAIN
        )
    )
    model.graph.output.append(
        helper.make_tensor_value_info(
            io_spec.ROW_SCAN, onnx.TensorProto.INT64, [batch.dim_param or batch.dim_value]
        )
    )
    return True


def replace_patterns(model: onnx.ModelProto, op_type: str, match) -> int:
    """Replace, in place, each pattern that match(graph, node) finds ending in a node of
    `op_type` by the one node it returns, put where the pattern's last node was (after every
    input, before every reader); the constants only the replaced nodes read go too. Returns
    how many were replaced."""
    g = Graph(model)
    found = {}  # id(last node) -> (the fused node, the nodes it replaces)
    for node in g.graph.node:
        if node.op_type == op_type:
            try:
                found[id(node)] = match(g, node)
            except NotFusable:
                continue
    replaced = {id(old) for _, olds in found.values() for old in olds}
    nodes = [found[id(n)][0] if id(n) in found else n for n in g.graph.node
             if id(n) in found or id(n) not in replaced]  # fmt: skip
    del g.graph.node[:]
    g.graph.node.extend(without_dead_nodes(nodes, {o.name for o in g.graph.output}))
    drop_unread_initializers(g.graph)
    return len(found)


def without_dead_nodes(nodes: list, graph_outputs: set[str]) -> list:
    """nodes less those whose outputs nothing reads (the constants only replaced nodes read)."""
    while True:
        read = {name for node in nodes for name in node.input} | graph_outputs
        kept = [node for node in nodes if any(out in read for out in node.output)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads (the replaced nodes' constants), in place: no
    weight is copied."""
    read = {name for node in graph.node for name in node.input}
    unread = [i for i, t in enumerate(graph.initializer) if t.name not in read]
    for i in reversed(unread):
        del graph.initializer[i]

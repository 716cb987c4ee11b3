"""The `mosaic` custom ops and their ONNX function bodies (reference computation, standard ops).

Stock ONNX Runtime inlines the bodies, so it needs no custom library; TensorRT's parser picks a
registered plugin instead because every node carries `plugin_namespace` (see export/README in the
docs and the plugins stage).

mosaic::GatedKeyScan (version 1), attribute eps:
    k_raw (B, C, H, hs), log_g (B, C, H), log_lam (B, C, H), valid (B, C) bool,
    s_in (B, H, hs), mx_in (B, H)  ->  keys (B, C, H, hs), s_out (B, H, hs), mx_out (B, H)
  The stabilised key recurrence k_bar = exp(mx) * s over a chunk, in parallel form: with
  Lam(tau, t) = sum_{tau < i <= t} log_lam_i (a masked cumulative sum, same terms as the sequential
  recurrence),
      k_bar_t = sum_{tau <= t} exp(log_g_tau + Lam(tau, t)) k~_tau + exp(Lam(-1, t)) k_bar_in,
  shifted by the running max M_t so no exponent overflows. Padding tokens (valid False) are no-ops.

mosaic::AssociativeMemory (version 1), attributes kind ("stm"|"ltm"), window, delay:
    q (B, C, H, hs) unit keys of the queries, t (B, C) int64 their positions,
    store_k, store_v (NB, B, H, S, hs) stored pairs in blocks of S, store_tau (NB, B, S) int64,
    new_k, new_v (B, C, H, hs) pairs completed by this chunk, new_tau (B, C) int64,
    beta0, beta1, alpha (H,) fp32 bandwidth parameters (already transformed)
    ->  y (B, C, H, hs)
  Pair tau is visible to query t when tau >= 0 and delay <= t - tau <= window - 1 (STM: delay 1,
  window h; LTM: delay m, window unbounded). n_t = max(0, min(t - delay + 1, window - delay)),
  beta(n) = beta1 * n^alpha + beta0 scales the query, softmax scale 1, empty set -> 0. The softmax
  runs over stored and new pairs together, split-and-merged as in flash-decoding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from mosaicrt.export.graph import FLOAT, OPSET, GraphBuilder

DOMAIN = "mosaic"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
NO_WINDOW = 2**62  # the LTM has no window: every pair older than the delay is visible
NEG_INF = float("-inf")
FLOOR = -1e30  # running-max floor: keeps exp(-inf - -inf) out of a fresh state


def _attr_const(g: GraphBuilder, attr: str, kind: int) -> str:
    """A Constant whose value is the function attribute `attr` (a reference, filled per node)."""
    out = g.fresh(attr)
    node = helper.make_node("Constant", [], [out], name=f"/{out}")
    field = {AttributeProto.FLOAT: "value_float", AttributeProto.INT: "value_int"}[kind]
    node.attribute.append(helper.make_attribute_ref(field, kind))
    node.attribute[-1].ref_attr_name = attr
    g.nodes.append(node)
    return out


def gated_key_scan_function() -> onnx.FunctionProto:
    g = GraphBuilder()
    inputs = ["k_raw", "log_g", "log_lam", "valid", "s_in", "mx_in"]
    eps = _attr_const(g, "eps", AttributeProto.FLOAT)
    C = g.dim("k_raw", 1)
    valid3 = g.unsqueeze("valid", 2)  # (B, C, 1)
    a = g.op("Transpose", g.op("Where", valid3, "log_g", g.const(NEG_INF)), perm=[0, 2, 1])
    lam = g.op("Transpose", g.op("Where", valid3, "log_lam", g.const(0.0)), perm=[0, 2, 1])
    steps = g.arange(C)  # (C,)
    # Lam[tau, t] = sum_i lam_i [tau < i <= t]: cumulative sum over i of lam masked by i > tau.
    after = g.op("Cast", g.op("Greater", g.unsqueeze(steps, 0), g.unsqueeze(steps, 1)), to=1)
    lam_masked = g.op("Mul", g.unsqueeze(lam, 2), after)  # (B, H, tau, i)
    Lam = g.op(
        "Transpose", g.op("CumSum", lam_masked, g.const(3, np.int64)), perm=[0, 1, 3, 2]
    )  # (B, H, t, tau)
    causal = g.op("LessOrEqual", g.unsqueeze(steps, 0), g.unsqueeze(steps, 1))  # [t, tau]: tau<=t
    w = g.op("Where", causal, g.op("Add", Lam, g.unsqueeze(a, 2)), g.const(NEG_INF))  # (B,H,t,tau)
    w_state = g.op(
        "Add", g.unsqueeze("mx_in", 2), g.op("CumSum", lam, g.const(2, np.int64))
    )  # (B, H, t)
    M = g.op("Max", g.op("ReduceMax", w, g.ints(3), keepdims=0), w_state, g.const(FLOOR))
    E = g.op("Exp", g.op("Sub", w, g.unsqueeze(M, 3)))  # (B, H, t, tau)
    k_h = g.op("Transpose", "k_raw", perm=[0, 2, 1, 3])  # (B, H, C, hs)
    carried = g.op(
        "Mul", g.unsqueeze(g.op("Exp", g.op("Sub", w_state, M)), 3), g.unsqueeze("s_in", 2)
    )  # (B, H, t, hs)
    s = g.op("Add", g.op("MatMul", E, k_h), carried)  # (B, H, t, hs)
    # k = k_bar / max(||k_bar||, eps) with k_bar = exp(M) s  <=>  s / max(||s||, eps exp(-M)).
    bound = g.op("Mul", eps, g.op("Exp", g.op("Neg", M)))
    denom = g.op("Max", g.op("ReduceL2", s, g.ints(3), keepdims=1), g.unsqueeze(bound, 3))
    g.op("Transpose", g.op("Div", s, denom), perm=[0, 2, 1, 3], outputs=["keys"])
    last = g.op("Sub", C, g.const(1, np.int64))
    g.op("Gather", s, last, axis=2, outputs=["s_out"])  # (B, H, hs)
    g.op("Gather", M, last, axis=2, outputs=["mx_out"])  # (B, H)
    return helper.make_function(
        DOMAIN,
        "GatedKeyScan",
        inputs,
        ["keys", "s_out", "mx_out"],
        g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["eps"],
    )


def associative_memory_function() -> onnx.FunctionProto:
    g = GraphBuilder()
    inputs = [
        "q",
        "t",
        "store_k",
        "store_v",
        "store_tau",
        "new_k",
        "new_v",
        "new_tau",
        "beta0",
        "beta1",
        "alpha",
    ]
    q, t, store_k, store_v, store_tau, new_k, new_v, new_tau, beta0, beta1, alpha = inputs
    window = _attr_const(g, "window", AttributeProto.INT)
    delay = _attr_const(g, "delay", AttributeProto.INT)
    one, zero = g.const(1, np.int64), g.const(0, np.int64)

    # beta(n_t) folded into the query.
    n = g.op("Min", g.op("Add", g.op("Sub", t, delay), one), g.op("Sub", window, delay))
    n = g.op("Cast", g.op("Max", n, zero), to=1)  # (B, C) fp32
    beta = g.op("Add", g.op("Mul", beta1, g.op("Pow", g.unsqueeze(n, 2), alpha)), beta0)  # (B,C,H)
    qb = g.op("Mul", q, g.unsqueeze(beta, 3))  # (B, C, H, hs)

    def mask(tau: str, tq: str) -> str:
        """0 where pair tau is visible to query tq, -inf elsewhere: added to the scores (a
        broadcast Add is far cheaper than a broadcast Where over every head's scores)."""
        age = g.op("Sub", tq, tau)
        visible = g.op(
            "And",
            g.op("And", g.op("GreaterOrEqual", tau, zero), g.op("GreaterOrEqual", age, delay)),
            g.op("LessOrEqual", age, g.op("Sub", window, one)),
        )
        return g.op("Where", visible, g.const(0.0), g.const(NEG_INF))

    # Stores may be fp16/bf16: the products run in fp32 (scores reach beta ~ 150). For fp32 stores
    # the Cast is a no-op that ONNX Runtime removes.
    store_k, store_v = g.op("Cast", store_k, to=FLOAT), g.op("Cast", store_v, to=FLOAT)
    # Stored pairs: keys on the left, so no store is transposed.
    q_cols = g.op("Transpose", qb, perm=[0, 2, 3, 1])  # (B, H, hs, C)
    s_old = g.op("MatMul", store_k, q_cols)  # (NB, B, H, S, C)
    tau_old = g.unsqueeze(store_tau, 2, 4)  # (NB, B, 1, S, 1)
    t_old = g.unsqueeze(t, 0, 2, 3)  # (1, B, 1, 1, C)
    s_old = g.op("Add", s_old, mask(tau_old, t_old))
    # New pairs of this chunk.
    q_rows = g.op("Transpose", qb, perm=[0, 2, 1, 3])  # (B, H, C, hs)
    s_new = g.op("MatMul", q_rows, g.op("Transpose", new_k, perm=[0, 2, 3, 1]))  # (B, H, C, C')
    s_new = g.op("Add", s_new, mask(g.unsqueeze(new_tau, 1, 2), g.unsqueeze(t, 1, 3)))

    # Scores to (NB, B, H, C, S) before the exp, so the probabilities meet the values in a plain
    # MatMul (a transposed operand would take a slower, fused path over the whole store).
    s_old = g.op("Transpose", s_old, perm=[0, 1, 2, 4, 3])  # (NB, B, H, C, S)
    # One softmax over both parts: a shared max (0 when the set is empty), then merged sums.
    m_old = g.op("ReduceMax", s_old, g.ints(0, 4), keepdims=0)  # (B, H, C)
    m = g.op("Max", m_old, g.op("ReduceMax", s_new, g.ints(3), keepdims=0))  # (B, H, C)
    m = g.op("Where", g.op("IsInf", m), g.const(0.0), m)
    e_old = g.op("Exp", g.op("Sub", s_old, g.unsqueeze(m, 0, 4)))  # (NB, B, H, C, S)
    e_new = g.op("Exp", g.op("Sub", s_new, g.unsqueeze(m, 3)))  # (B, H, C, C')
    denom = g.op(
        "Add",
        g.op("ReduceSum", e_old, g.ints(0, 4), keepdims=0),
        g.op("ReduceSum", e_new, g.ints(3), keepdims=0),
    )  # (B, H, C)
    y_old = g.op(
        "ReduceSum", g.op("MatMul", e_old, store_v), g.ints(0), keepdims=0
    )  # (B, H, C, hs)
    y_new = g.op("MatMul", e_new, g.op("Transpose", new_v, perm=[0, 2, 1, 3]))  # (B, H, C, hs)
    # A non-empty set has denom >= 1 (its max term is exp(0)); an empty one has 0 / 1 = 0.
    y = g.op("Div", g.op("Add", y_old, y_new), g.unsqueeze(g.op("Max", denom, g.const(1.0)), 3))
    g.op("Transpose", y, perm=[0, 2, 1, 3], outputs=["y"])  # (B, C, H, hs)
    return helper.make_function(
        DOMAIN,
        "AssociativeMemory",
        inputs,
        ["y"],
        g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["kind", "window", "delay"],
    )


def functions() -> list[onnx.FunctionProto]:
    return [gated_key_scan_function(), associative_memory_function()]


def plugin_attrs() -> dict[str, str]:
    """Attributes that let TensorRT parsers pick a registered plugin over the function body."""
    return {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}

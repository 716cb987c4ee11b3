"""GatedKeyScan as an ONNX function body (standard ops only; stock ONNX Runtime inlines it).

The parallel form of the recurrence over a chunk: with Lam(tau, t) = sum_{tau < i <= t} log_lam_i
(a masked cumulative sum, the same terms as the sequential recurrence),
    k_bar_t = sum_{tau <= t} exp(log_g_tau + Lam(tau, t)) k~_tau + exp(Lam(-1, t)) k_bar_in,
shifted by the running max M_t so that no exponent overflows. Padding tokens are no-ops.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from mosaicrt.onnx_graph import OPSET, GraphBuilder
from mosaicrt.ops import DOMAIN
from mosaicrt.ops.gated_key_scan import FLOOR, NAME

NEG_INF = float("-inf")


def function() -> onnx.FunctionProto:
    g = GraphBuilder()
    inputs = ["k_raw", "log_g", "log_lam", "valid", "s_in", "mx_in"]
    eps = g.attribute("eps", AttributeProto.FLOAT)
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
        NAME,
        inputs,
        ["keys", "s_out", "mx_out"],
        g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["eps"],
    )

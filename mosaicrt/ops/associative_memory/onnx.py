"""AssociativeMemory as an ONNX function body (standard ops only; stock ONNX Runtime inlines it).

Stored pairs live in a pool of blocks of S pairs, (P, H, S, hs); row b's i-th block is pool block
store_blocks[b, i], and its positions are store_tau[i, b] (NB, B, S). The body gathers each row's
blocks, (NB, B, H, S, hs), and retrieves from them with the chunk's new pairs beside them.
beta(n_t) scales the query; one softmax runs over stored and new pairs together (a shared max,
merged sums), in fp32 whatever the stores' type.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from mosaicrt.onnx_graph import FLOAT, OPSET, GraphBuilder
from mosaicrt.ops import DOMAIN
from mosaicrt.ops.associative_memory import NAME, NAME_INT8

NEG_INF = float("-inf")


INPUTS = ("q", "t", "store_k", "store_v", "store_blocks", "store_tau", "new_k", "new_v", "new_tau",
          "beta0", "beta1", "alpha")  # fmt: skip
SCALE_INPUTS = ("store_k_scale", "store_v_scale")  # AssociativeMemoryInt8: (P, H, S) fp32


def visibility_mask(g: GraphBuilder, tau: str, tq: str, window: str, delay: str) -> str:
    """0 where pair tau is visible to query tq, -inf elsewhere: added to the scores (a broadcast
    Add is far cheaper than a broadcast Where over every head's scores)."""
    one, zero = g.const(1, np.int64), g.const(0, np.int64)
    age = g.op("Sub", tq, tau)
    visible = g.op(
        "And",
        g.op("And", g.op("GreaterOrEqual", tau, zero), g.op("GreaterOrEqual", age, delay)),
        g.op("LessOrEqual", age, g.op("Sub", window, one)),
    )
    return g.op("Where", visible, g.const(0.0), g.const(NEG_INF))


def function(int8_stores: bool = False) -> onnx.FunctionProto:
    """AssociativeMemory, or AssociativeMemoryInt8 (int8 stores and their scales)."""
    g = GraphBuilder()
    q, t, store_k, store_v, store_blocks, store_tau, new_k, new_v, new_tau, beta0, beta1, alpha = (
        INPUTS
    )
    window = g.attribute("window", AttributeProto.INT)
    delay = g.attribute("delay", AttributeProto.INT)
    one, zero = g.const(1, np.int64), g.const(0, np.int64)

    # beta(n_t) folded into the query.
    n = g.op("Min", g.op("Add", g.op("Sub", t, delay), one), g.op("Sub", window, delay))
    n = g.op("Cast", g.op("Max", n, zero), to=1)  # (B, C) fp32
    beta = g.op("Add", g.op("Mul", beta1, g.op("Pow", g.unsqueeze(n, 2), alpha)), beta0)  # (B,C,H)
    qb = g.op("Mul", q, g.unsqueeze(beta, 3))  # (B, C, H, hs)

    def rows_blocks(pool: str) -> str:
        """Pool (P, H, S[, hs]) -> every row's blocks (NB, B, H, S[, hs])."""
        blocks = g.op("Gather", pool, store_blocks, axis=0)  # (B, NB, H, S[, hs])
        perm = [1, 0, 2, 3, 4] if pool in (store_k, store_v) else [1, 0, 2, 3]
        return g.op("Transpose", blocks, perm=perm)

    # Stores may be fp16/bf16: the products run in fp32 (scores reach beta ~ 150). For fp32 stores
    # the Cast is a no-op that ONNX Runtime removes.
    store_k = g.op("Cast", rows_blocks(store_k), to=FLOAT)
    store_v = g.op("Cast", rows_blocks(store_v), to=FLOAT)
    # Stored pairs: keys on the left, so no store is transposed.
    q_cols = g.op("Transpose", qb, perm=[0, 2, 3, 1])  # (B, H, hs, C)
    s_old = g.op("MatMul", store_k, q_cols)  # (NB, B, H, S, C)
    if int8_stores:  # pair s's key is store_k[s] * store_k_scale[s]
        s_old = g.op("Mul", s_old, g.unsqueeze(rows_blocks(SCALE_INPUTS[0]), 4))
    tau_old = g.unsqueeze(store_tau, 2, 4)  # (NB, B, 1, S, 1)
    t_old = g.unsqueeze(t, 0, 2, 3)  # (1, B, 1, 1, C)
    s_old = g.op("Add", s_old, visibility_mask(g, tau_old, t_old, window, delay))
    # New pairs of this chunk.
    q_rows = g.op("Transpose", qb, perm=[0, 2, 1, 3])  # (B, H, C, hs)
    s_new = g.op("MatMul", q_rows, g.op("Transpose", new_k, perm=[0, 2, 3, 1]))  # (B, H, C, C')
    new_mask = visibility_mask(g, g.unsqueeze(new_tau, 1, 2), g.unsqueeze(t, 1, 3), window, delay)
    s_new = g.op("Add", s_new, new_mask)

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
    if int8_stores:  # pair s's value is store_v[s] * store_v_scale[s]: scale its weight
        p_old = g.op("Mul", e_old, g.unsqueeze(rows_blocks(SCALE_INPUTS[1]), 3))  # (NB,B,H,C,S)
    else:
        p_old = e_old
    y_old = g.op(
        "ReduceSum", g.op("MatMul", p_old, store_v), g.ints(0), keepdims=0
    )  # (B, H, C, hs)
    y_new = g.op("MatMul", e_new, g.op("Transpose", new_v, perm=[0, 2, 1, 3]))  # (B, H, C, hs)
    # A non-empty set has denom >= 1 (its max term is exp(0)); an empty one has 0 / 1 = 0.
    y = g.op("Div", g.op("Add", y_old, y_new), g.unsqueeze(g.op("Max", denom, g.const(1.0)), 3))
    g.op("Transpose", y, perm=[0, 2, 1, 3], outputs=["y"])  # (B, C, H, hs)
    return helper.make_function(
        DOMAIN,
        NAME_INT8 if int8_stores else NAME,
        list(INPUTS + SCALE_INPUTS if int8_stores else INPUTS),
        ["y"],
        g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["window", "delay"],
    )

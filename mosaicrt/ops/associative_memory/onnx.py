"""AssociativeMemory as an ONNX function body (standard ops only; stock ONNX Runtime inlines it).

Stored pairs live in a pool of blocks of S pairs, (P, H, S, hs); row b's i-th block is pool block
store_blocks[b, i], and its positions are store_tau[i, b] (NB, B, S). The body gathers each row's
blocks, (NB, B, H, S, hs), and retrieves from them with the chunk's new pairs beside them.
beta(n_t) scales the query; one softmax runs over stored and new pairs together (a shared max,
merged sums), in fp32 whatever the stores' type.

fp8 (e4m3) stores travel as their bits in int8 tensors: ONNX defines Gather (and most ops) for no
fp8 type. `e4m3_bits` encodes fp32 values in the graph; the body decodes gathered bits through a
table of the 256 values (a negative int8 indexes it from the end: bits >= 0x80).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from mosaicrt.onnx_graph import FLOAT, OPSET, GraphBuilder
from mosaicrt.ops import DOMAIN
from mosaicrt.ops.associative_memory import NAME, NAME_FP8

NEG_INF = float("-inf")
E4M3_MAX = 448.0  # the largest finite e4m3 value
E4M3_MIN_EXPONENT = -6  # of its normal values; below them the subnormals, steps of 2^-9
E4M3_MANTISSA_BITS = 3


def e4m3_values() -> np.ndarray:
    """The fp32 value of each of the 256 e4m3 bit patterns (0x7F and 0xFF are NaN)."""
    import torch

    bits = torch.arange(256, dtype=torch.uint8)
    return bits.view(torch.float8_e4m3fn).float().numpy()


def e4m3_bits(g: GraphBuilder, y: str, out: str) -> None:
    """`out` (int8) = the bits of fp32 `y` rounded to the nearest e4m3 value (ties to even, as
    torch's cast), |y| clipped to 448. With e the binade of |y| (>= -6: the subnormals share
    binade -6's step), the step is 2^(e-3), n = round(|y| / step) and the magnitude's bits are
    (e + 6) * 8 + n, a carry into the next binade included; the sign is bit 7, the int8's sign
    (a negative value's byte is magnitude - 128). e comes from a logarithm: where rounding puts
    it one binade off (|y| within ~1e-7 of a power of two), n counts steps of the neighbouring
    binade and the bits come out the same."""
    a = g.op("Min", g.op("Abs", y), g.const(E4M3_MAX))
    log2 = g.op("Mul", g.op("Log", a), g.const(1 / np.log(2)))  # Log(0) = -inf: binade -6
    binade = g.op("Max", g.op("Floor", log2), g.const(float(E4M3_MIN_EXPONENT)))  # e, -6..8
    above = g.op("Sub", binade, g.const(float(E4M3_MIN_EXPONENT)))  # e + 6, 0..14
    steps = 2.0 ** np.arange(E4M3_MIN_EXPONENT, 9, dtype=np.float32) / 2**E4M3_MANTISSA_BITS
    step = g.op("Gather", g.const(steps), g.op("Cast", above, to=TensorProto.INT32), axis=0)
    n = g.op("Round", g.op("Div", a, step))
    magnitude = g.op("Add", g.op("Mul", above, g.const(8.0)), n)
    negative = g.op("Cast", g.op("Less", y, g.const(0.0)), to=FLOAT)  # (a Where is far slower)
    signed = g.op("Sub", magnitude, g.op("Mul", negative, g.const(128.0)))
    g.op("Cast", signed, to=TensorProto.INT8, outputs=[out])


INPUTS = ("q", "t", "store_k", "store_v", "store_blocks", "store_tau", "new_k", "new_v", "new_tau",
          "beta0", "beta1", "alpha")  # fmt: skip
SCALE_INPUTS = ("store_k_scale", "store_v_scale")  # scaled stores (Int8, Fp8): (P, H, S) fp32


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


def as_float(g: GraphBuilder, pairs: str, name: str) -> str:
    """Gathered store pairs as fp32: a Cast (a no-op that ONNX Runtime removes for fp32 stores),
    or for AssociativeMemoryFp8's e4m3 bits a lookup in the table of their values."""
    if name != NAME_FP8:
        return g.op("Cast", pairs, to=FLOAT)
    bits = g.op("Cast", pairs, to=TensorProto.INT32)  # e4m3 bits as int8, -128..127
    return g.op("Gather", g.const(e4m3_values()), bits, axis=0)  # a negative index: from the end


def function(name: str = NAME) -> onnx.FunctionProto:
    """AssociativeMemory, or a variant of it over scaled stores (AssociativeMemoryInt8 or
    AssociativeMemoryFp8: the stores and their scales; one body, the Cast reads either)."""
    scaled = name != NAME
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
        """Pool (P, H, S[, hs]) -> every row's blocks (B, NB, H, S[, hs]): one copy of the
        blocks a step reads, used in that order (a transpose would copy them again)."""
        return g.op("Gather", pool, store_blocks, axis=0)

    # Stores may be fp16/bf16/int8/fp8: the products run in fp32 (scores reach beta ~ 150).
    store_k, store_v = (as_float(g, rows_blocks(pool), name) for pool in (store_k, store_v))
    # Stored pairs: keys on the left, so no store is transposed.
    q_cols = g.unsqueeze(g.op("Transpose", qb, perm=[0, 2, 3, 1]), 1)  # (B, 1, H, hs, C)
    s_old = g.op("MatMul", store_k, q_cols)  # (B, NB, H, S, C)
    if scaled:  # pair s's key is store_k[s] * store_k_scale[s]
        s_old = g.op("Mul", s_old, g.unsqueeze(rows_blocks(SCALE_INPUTS[0]), 4))
    tau_old = g.unsqueeze(g.op("Transpose", store_tau, perm=[1, 0, 2]), 2, 4)  # (B, NB, 1, S, 1)
    t_old = g.unsqueeze(t, 1, 2, 3)  # (B, 1, 1, 1, C)
    s_old = g.op("Add", s_old, visibility_mask(g, tau_old, t_old, window, delay))
    # New pairs of this chunk.
    q_rows = g.op("Transpose", qb, perm=[0, 2, 1, 3])  # (B, H, C, hs)
    s_new = g.op("MatMul", q_rows, g.op("Transpose", new_k, perm=[0, 2, 3, 1]))  # (B, H, C, C')
    new_mask = visibility_mask(g, g.unsqueeze(new_tau, 1, 2), g.unsqueeze(t, 1, 3), window, delay)
    s_new = g.op("Add", s_new, new_mask)

    # Scores to (B, NB, H, C, S) before the exp, so the probabilities meet the values in a plain
    # MatMul (a transposed operand would take a slower, fused path over the whole store).
    s_old = g.op("Transpose", s_old, perm=[0, 1, 2, 4, 3])  # (B, NB, H, C, S)
    # One softmax over both parts: a shared max (0 when the set is empty), then merged sums.
    m_old = g.op("ReduceMax", s_old, g.ints(1, 4), keepdims=0)  # (B, H, C)
    m = g.op("Max", m_old, g.op("ReduceMax", s_new, g.ints(3), keepdims=0))  # (B, H, C)
    m = g.op("Where", g.op("IsInf", m), g.const(0.0), m)
    e_old = g.op("Exp", g.op("Sub", s_old, g.unsqueeze(m, 1, 4)))  # (B, NB, H, C, S)
    e_new = g.op("Exp", g.op("Sub", s_new, g.unsqueeze(m, 3)))  # (B, H, C, C')
    denom = g.op(
        "Add",
        g.op("ReduceSum", e_old, g.ints(1, 4), keepdims=0),
        g.op("ReduceSum", e_new, g.ints(3), keepdims=0),
    )  # (B, H, C)
    if scaled:  # pair s's value is store_v[s] * store_v_scale[s]: scale its weight
        p_old = g.op("Mul", e_old, g.unsqueeze(rows_blocks(SCALE_INPUTS[1]), 3))  # (B,NB,H,C,S)
    else:
        p_old = e_old
    y_old = g.op(
        "ReduceSum", g.op("MatMul", p_old, store_v), g.ints(1), keepdims=0
    )  # (B, H, C, hs)
    y_new = g.op("MatMul", e_new, g.op("Transpose", new_v, perm=[0, 2, 1, 3]))  # (B, H, C, hs)
    # A non-empty set has denom >= 1 (its max term is exp(0)); an empty one has 0 / 1 = 0.
    y = g.op("Div", g.op("Add", y_old, y_new), g.unsqueeze(g.op("Max", denom, g.const(1.0)), 3))
    g.op("Transpose", y, perm=[0, 2, 1, 3], outputs=["y"])  # (B, C, H, hs)
    return helper.make_function(
        DOMAIN,
        name,
        list(INPUTS + SCALE_INPUTS if scaled else INPUTS),
        ["y"],
        g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["window", "delay"],
    )

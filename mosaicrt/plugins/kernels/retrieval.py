"""Associative-memory retrieval in Triton: flash-attention-style online softmax with the visible set
given by loop bounds, for a chunk of queries (C >= 1) against stored pairs and the chunk's own pairs.

Query t (= pos + i) sees pairs tau in [lo_t, hi_t]: STM lo_t = t-h+1, hi_t = t-1; LTM lo_t = 0,
hi_t = t-m (eq. 10). Pairs tau <= pos-2 come from the store (STM: a ring, slot tau mod (h-1); LTM:
slot tau), pairs tau in [pos-1, pos+len-2] from the chunk's new pairs (index tau-pos+1). The key
loop runs over tau from the block's lowest lo_t to its highest hi_t, so no mask is materialised
and nothing outside the window or before the delay is read. beta(n_t) is already folded into q;
the softmax scale is 1. An empty visible set gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _retrieval_kernel(
    Q, KS, VS, KN, VN, POS, LEN, Y,
    stride_qb, stride_qc, stride_qh,
    stride_sb, stride_sn, stride_sh,
    stride_nb, stride_nc, stride_nh,
    stride_yb, stride_yc, stride_yh,
    C, H, SLOTS, D,
    WINDOW: tl.constexpr, DELAY: tl.constexpr, RING: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    pos = tl.load(POS + b).to(tl.int64)
    length = tl.load(LEN + b).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    t = pos + offs_m  # query positions (BLOCK_M,)
    in_d = offs_d[None, :] < D  # HEAD_DIM is hs rounded up to a power of two
    q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qc + h * stride_qh + offs_d[None, :],
                mask=(offs_m[:, None] < C) & in_d, other=0.0).to(tl.float32)
    hi_t = t - DELAY
    if WINDOW > 0:
        lo_t = tl.maximum(t - WINDOW + 1, 0)
    else:
        lo_t = tl.zeros([BLOCK_M], dtype=tl.int64)
    newest = pos + length - 2  # last pair that exists after this chunk
    lo = tl.maximum(pos + pid_m * BLOCK_M - WINDOW + 1, 0) if WINDOW > 0 else 0
    hi = tl.minimum(pos + tl.minimum((pid_m + 1) * BLOCK_M, C) - 1 - DELAY, newest)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi + 1, BLOCK_N):
        tau = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        stored = (tau <= pos - 2) & (tau >= 0)
        fresh = (tau >= pos - 1) & (tau <= newest)
        if RING:
            slot = tau % SLOTS
        else:
            slot = tau
        s_ptr = b * stride_sb + slot[:, None] * stride_sn + h * stride_sh + offs_d[None, :]
        n_ptr = b * stride_nb + (tau - pos + 1)[:, None] * stride_nc + h * stride_nh + offs_d[None, :]
        from_store = stored[:, None] & in_d
        from_chunk = fresh[:, None] & in_d
        k = (tl.load(KS + s_ptr, mask=from_store, other=0.0).to(tl.float32)
             + tl.load(KN + n_ptr, mask=from_chunk, other=0.0).to(tl.float32))
        v = (tl.load(VS + s_ptr, mask=from_store, other=0.0).to(tl.float32)
             + tl.load(VN + n_ptr, mask=from_chunk, other=0.0).to(tl.float32))
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, tl.trans(k))
        visible = ((tau[None, :] >= lo_t[:, None]) & (tau[None, :] <= hi_t[:, None])
                   & (stored | fresh)[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    # A non-empty set has l >= 1 (its max term is exp(0)); an empty one has acc = 0.
    y = acc / tl.maximum(l_i, 1.0)[:, None]
    tl.store(Y + b * stride_yb + offs_m[:, None] * stride_yc + h * stride_yh + offs_d[None, :],
             y, mask=(offs_m[:, None] < C) & in_d)


def retrieve(q: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor,
             new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor,
             window: int, delay: int, ring: bool, block_m: int = 16,
             block_n: int = 32) -> torch.Tensor:
    """Retrieval for a chunk.

    Args:
        q: (B, C, H, hs) queries, beta folded in.   store_k, store_v: (B, N, H, hs) the store.
        new_k, new_v: (B, C, H, hs) pairs completed by the chunk (pair j is tau = pos-1+j).
        pos: (B,) chunk start positions.   lengths: (B,) real tokens per row.
        window: h for the STM, 0 for none.   delay: 1 for the STM, m for the LTM.
        ring: the store is a ring of N slots (STM) rather than indexed by tau (LTM).
    Returns:
        (B, C, H, hs) fp32.
    """
    B, C, H, hs = q.shape
    for name, x in (("q", q), ("store_k", store_k), ("store_v", store_v), ("new_k", new_k),
                    ("new_v", new_v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    y = torch.empty(B, C, H, hs, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(C, block_m), B * H)
    _retrieval_kernel[grid](
        q, store_k, store_v, new_k, new_v, pos, lengths, y,
        q.stride(0), q.stride(1), q.stride(2),
        store_k.stride(0), store_k.stride(1), store_k.stride(2),
        new_k.stride(0), new_k.stride(1), new_k.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        C, H, store_k.shape[1], hs,
        WINDOW=window, DELAY=delay, RING=ring, IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=max(16, triton.next_power_of_2(hs)),
    )
    return y


def retrieval_bytes(B: int, C: int, H: int, hs: int, visible: int, elem: int) -> int:
    """Bytes a retrieval must move: queries, visible keys and values, outputs (for benchmarks)."""
    return elem * B * H * hs * (2 * C + 2 * visible)

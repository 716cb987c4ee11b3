"""Associative-memory retrieval in Triton: flash-attention-style online softmax with the visible set
given by loop bounds, for a chunk of queries (C >= 1) against stored pairs and the chunk's pairs.

Query t (= pos + i) sees pairs tau in [lo_t, hi_t]: STM lo_t = t-h+1, hi_t = t-1; LTM lo_t = 0,
hi_t = t-m (eq. 10). Pairs tau <= pos-2 come from the store (STM: a ring, slot tau mod (h-1); LTM:
slot tau), pairs tau in [pos-1, pos+len-2] from the chunk's new pairs (index tau-pos+1). A block
of queries walks two sections of keys, the store's and the chunk's, from the block's lowest lo_t
to its highest hi_t, so no mask is materialised and nothing outside the window or before the
delay is read. Without a window, the tiles every query of the block sees take an unmasked path
(the causal "off-diagonal" tiles of flash attention); only the last tiles of a section are masked.
beta(n_t) is already folded into q; the softmax scale is 1. An empty visible set gives 0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _row_offsets(
    row, SLOTS, BLOCK_SLOTS, stride_blk, stride_n, TABLE,
    RING: tl.constexpr, BLOCKED: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N,) offsets of stored rows: modulo SLOTS in a ring; a paged store keeps row r in
    slot r % BLOCK_SLOTS of pool block TABLE[r // BLOCK_SLOTS] (TABLE: the row's block
    table)."""
    if RING:
        row = row % SLOTS
    if BLOCKED:
        block = tl.load(TABLE + row // BLOCK_SLOTS, mask=row < SLOTS, other=0)
        return block * stride_blk + (row % BLOCK_SLOTS) * stride_n
    return row * stride_n


@triton.jit
def _load_pairs(
    K, V, KSC, VSC, row, ok, offs_d, d_ok, SLOTS, BLOCK_SLOTS, stride_blk, stride_n,
    scale_blk, scale_n, TABLE,
    RING: tl.constexpr, BLOCKED: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    SCALED: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_N, HEAD_DIM) keys and values of stored rows `row` (rows where `ok` is false
    read 0 when MASKED), in the store's type; int8 pairs (SCALED) come back as fp32, times the
    scale of their row (KSC, VSC: the scales, laid out as the pairs without hs)."""
    ptr = _row_offsets(row, SLOTS, BLOCK_SLOTS, stride_blk, stride_n, TABLE, RING, BLOCKED)
    ptr = ptr[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(K + ptr, mask=ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + ptr, mask=ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(K + ptr)
        v = tl.load(V + ptr)
    else:
        k = tl.load(K + ptr, mask=d_ok[None, :], other=0.0)
        v = tl.load(V + ptr, mask=d_ok[None, :], other=0.0)
    if SCALED:
        sptr = _row_offsets(row, SLOTS, BLOCK_SLOTS, scale_blk, scale_n, TABLE, RING, BLOCKED)
        k_scale = tl.load(KSC + sptr, mask=ok, other=0.0)
        v_scale = tl.load(VSC + sptr, mask=ok, other=0.0)
        k = k.to(tl.float32) * k_scale[:, None]
        v = v.to(tl.float32) * v_scale[:, None]
    return k, v


# Under the interpreter tl.dot multiplies bf16 bit patterns as integers (numpy has no bf16):
# there the half-precision products run on their (exact) fp32 values instead.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot_half(a, b, acc):
    """acc + a @ b on tensor cores, a and b fp16 or bf16, fp32 sums."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot_bf16x3(a, b, acc):
    """acc + a @ b for fp32 a and bf16 b on bf16 tensor cores: a = a1 + a2 + a3 in bf16 terms
    (8 bits each: a to 2^-24 of itself, as fp32 holds it), each product exact in fp32, the
    smallest terms summed first."""
    a1 = a.to(tl.bfloat16)
    rest = a - a1.to(tl.float32)
    a2 = rest.to(tl.bfloat16)
    a3 = (rest - a2.to(tl.float32)).to(tl.bfloat16)
    acc = _dot_half(a3, b, acc)
    acc = _dot_half(a2, b, acc)
    return _dot_half(a1, b, acc)


@triton.jit
def _attend(
    acc, l_i, m_i, q,
    K, V, KSC, VSC, stride_n, scale_n, offs_d, d_ok,
    first, last, row_shift, lo_t, hi_t, SLOTS, BLOCK_SLOTS, stride_blk, scale_blk, TABLE,
    RING: tl.constexpr, BLOCKED: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold pairs tau in [first, last] of one section into the running softmax of a query block.
    Row of pair tau: tau - row_shift (see _row_offsets). K, V (and the int8 scales KSC, VSC)
    point at (b, 0, h, 0)."""
    for start in range(first, last + 1, BLOCK_N):
        tau = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        ok = tau <= last
        k, v = _load_pairs(K, V, KSC, VSC, tau - row_shift, ok, offs_d, d_ok, SLOTS, BLOCK_SLOTS,
                           stride_blk, stride_n, scale_blk, scale_n, TABLE,
                           RING, BLOCKED, MASKED, EVEN_D, SCALED)  # fmt: skip
        if DOT == "half":  # tensor-core products of fp16/bf16 pairs, fp32 sums (flash style)
            s = _dot_half(q.to(k.dtype), tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32))
        elif DOT == "bf16x3":  # bf16 pairs against fp32 q split in three: fp32's accuracy
            s = _dot_bf16x3(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
        else:  # fp32 products ("ieee" exact, "tf32x3" near it on tensor cores): scores reach
            k = k.to(tl.float32)  # beta ~ 150, where half-precision products are coarse
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT)
        if MASKED:
            visible = (tau[None, :] >= lo_t[:, None]) & (tau[None, :] <= hi_t[:, None])
            visible = visible & ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = m_new
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT == "half":
            acc = _dot_half(p.to(v.dtype), v, acc * alpha[:, None])
        elif DOT == "bf16x3":
            acc = _dot_bf16x3(p, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _retrieval_kernel(
    Q, KS, VS, KSC, VSC, KN, VN, POS, LEN, Y, TABLE,
    stride_qb, stride_qc, stride_qh,
    stride_sb, stride_sn, stride_sh, stride_blk, stride_tb,
    scale_b, scale_n, scale_h, scale_blk,
    stride_nb, stride_nc, stride_nh,
    stride_yb, stride_yc, stride_yh,
    C, H, SLOTS, BLOCK_SLOTS, D,
    WINDOW: tl.constexpr, DELAY: tl.constexpr, RING: tl.constexpr, BLOCKED: tl.constexpr,
    DOT: tl.constexpr, NEW_DOT: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    pos = tl.load(POS + b).to(tl.int64)
    length = tl.load(LEN + b).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D  # HEAD_DIM is hs rounded up to a power of two
    q_mask = (offs_m[:, None] < C) & d_ok[None, :]
    q_ptr = Q + b * stride_qb + offs_m[:, None] * stride_qc + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=q_mask, other=0.0).to(tl.float32)
    q = q * 1.4426950408889634  # log2(e): the softmax runs on exp2

    t = pos + offs_m  # query positions (BLOCK_M,)
    hi_t = t - DELAY
    if WINDOW > 0:
        lo_t = tl.maximum(t - WINDOW + 1, 0)
    else:
        lo_t = tl.zeros([BLOCK_M], dtype=tl.int64)
    newest = pos + length - 2  # last pair that exists after this chunk
    t_first = pos + pid_m * BLOCK_M
    t_last = pos + tl.minimum((pid_m + 1) * BLOCK_M, C) - 1
    lo = tl.maximum(t_first - WINDOW + 1, 0) if WINDOW > 0 else 0
    hi = tl.minimum(t_last - DELAY, newest)
    store_last = tl.minimum(hi, pos - 2)
    chunk_first = tl.maximum(lo, pos - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    ks, vs = KS + b * stride_sb + h * stride_sh, VS + b * stride_sb + h * stride_sh
    ksc, vsc = KSC + b * scale_b + h * scale_h, VSC + b * scale_b + h * scale_h
    kn, vn = KN + b * stride_nb + h * stride_nh, VN + b * stride_nb + h * stride_nh
    table = TABLE + b * stride_tb  # the row's block table (paged stores)
    if WINDOW == 0:
        # Every query of the block sees tau <= full: whole tiles up to there need no mask.
        full = tl.minimum(t_first - DELAY, newest)
        store_split = lo + tl.maximum(tl.minimum(store_last, full) - lo + 1, 0) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, ks, vs, ksc, vsc, stride_sn, scale_n, offs_d,
            d_ok, lo, store_split - 1, 0, lo_t, hi_t, SLOTS, BLOCK_SLOTS, stride_blk, scale_blk,
            table, RING, BLOCKED, False, EVEN_D, DOT, SCALED, BLOCK_N)  # fmt: skip
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, ks, vs, ksc, vsc, stride_sn, scale_n, offs_d,
            d_ok, store_split, store_last, 0, lo_t, hi_t, SLOTS, BLOCK_SLOTS, stride_blk, scale_blk,
            table, RING, BLOCKED, True, EVEN_D, DOT, SCALED, BLOCK_N)  # fmt: skip
        chunk_split = chunk_first + (
            tl.maximum(tl.minimum(hi, full) - chunk_first + 1, 0) // BLOCK_N * BLOCK_N
        )
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, kn, vn, stride_nc, 0, offs_d, d_ok,
            chunk_first, chunk_split - 1, pos - 1, lo_t, hi_t, SLOTS, 1, 0, 0, table,
            False, False, False, EVEN_D, NEW_DOT, False, BLOCK_N)  # fmt: skip
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, kn, vn, stride_nc, 0, offs_d, d_ok,
            chunk_split, hi, pos - 1, lo_t, hi_t, SLOTS, 1, 0, 0, table,
            False, False, True, EVEN_D, NEW_DOT, False, BLOCK_N)  # fmt: skip
    else:  # a short window: every tile is an edge tile
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, ks, vs, ksc, vsc, stride_sn, scale_n, offs_d,
            d_ok, lo, store_last, 0, lo_t, hi_t, SLOTS, BLOCK_SLOTS, stride_blk, scale_blk, table,
            RING, BLOCKED, True, EVEN_D, DOT, SCALED, BLOCK_N)  # fmt: skip
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kn, vn, kn, vn, stride_nc, 0, offs_d, d_ok,
            chunk_first, hi, pos - 1, lo_t, hi_t, SLOTS, 1, 0, 0, table,
            False, False, True, EVEN_D, NEW_DOT, False, BLOCK_N)  # fmt: skip
    # A non-empty set has l >= 1 (its max term is exp2(0)); an empty one has acc = 0.
    y = acc / tl.maximum(l_i, 1.0)[:, None]
    y_ptr = Y + b * stride_yb + offs_m[:, None] * stride_yc + h * stride_yh + offs_d[None, :]
    tl.store(y_ptr, y, mask=q_mask)


def store_layout(store: torch.Tensor, blocks: torch.Tensor | None) -> dict:
    """Strides of a store: flat (B, N, H, hs) (blocks None), or a pool of blocks of S pairs
    (P, H, S, hs) with a block table (B, NB) (the ONNX artifact's layout): the row's slot n
    lives in pool block blocks[b, n // S] at slot n % S."""
    if blocks is not None:
        _, _, S, _ = store.shape
        return dict(b=0, n=store.stride(2), h=store.stride(1), blk=store.stride(0),
                    slots=blocks.shape[1] * S, block_slots=S, blocked=True,
                    table=blocks, table_b=blocks.stride(0))  # fmt: skip
    return dict(b=store.stride(0), n=store.stride(1), h=store.stride(2), blk=0,
                slots=store.shape[1], block_slots=store.shape[1], blocked=False,
                table=store, table_b=0)  # fmt: skip


def scale_layout(scales: tuple | None, store: torch.Tensor, blocks: torch.Tensor | None) -> dict:
    """The int8 scales' pointers and strides (laid out as the store without hs: (B, N, H) or a
    pool (P, H, S)); without scales (fp stores) the store's pointer stands in, never read."""
    if scales is None:
        return dict(k=store, v=store, b=0, n=0, h=0, blk=0, scaled=False)
    k_scale, v_scale = scales
    if k_scale.stride() != v_scale.stride() or k_scale.shape != store.shape[:-1]:
        raise ValueError(f"scales must be laid out as the store without hs, {store.shape[:-1]}")
    st = store_layout(k_scale.unsqueeze(-1), blocks)
    return dict(k=k_scale, v=v_scale, b=st["b"], n=st["n"], h=st["h"], blk=st["blk"],
                scaled=True)  # fmt: skip


PRECISIONS = ("auto", "ieee", "tf32x3", "bf16x3")
# block_m, block_n, warps, stages per products on a GPU: the fastest that fit an H200's shared
# memory for a prefill chunk (bench/results/kernels_prefill_h200.json; "half": from scratch vs
# SDPA flash, kernels_h200.json).
GPU_TILINGS = {
    "half": (64, 64, 4, 3),
    "bf16x3": (128, 32, 8, 2),
    "tf32x3": (32, 64, 4, 2),
    "ieee": (32, 32, 4, 2),
}


def products(precision: str, half_dot: bool, store: torch.Tensor, scaled: bool) -> tuple[str, str]:
    """The chunk kernel's products (DOT, NEW_DOT): for the stored pairs and for the chunk's own
    (fp32) pairs. "auto" is exact fp32 under the interpreter and, on tensor cores (sm80+), the
    split products that keep fp32's accuracy: bf16x3 against a bf16 store, tf32x3 otherwise
    (plain fp32 products, "ieee", run on the FMA units: 10x slower than bf16x3 on an H200,
    bench/results/kernels_prefill_h200.json)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if half_dot and store.dtype in (torch.float16, torch.bfloat16):
        return "half", "half"
    if precision == "auto":
        tensor_cores = store.is_cuda and torch.cuda.get_device_capability(store.device) >= (8, 0)
        if not tensor_cores:
            return "ieee", "ieee"
        precision = "bf16x3" if store.dtype == torch.bfloat16 and not scaled else "tf32x3"
    if precision == "bf16x3":
        if store.dtype != torch.bfloat16 or scaled:
            raise ValueError(f"bf16x3 products need a bf16 store, got {store.dtype}")
        return "bf16x3", "tf32x3"  # the chunk's pairs are fp32
    return precision, precision


def retrieve(
    q: torch.Tensor,
    store_k: torch.Tensor,
    store_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    pos: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    delay: int,
    ring: bool,
    blocks: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    half_dot: bool = False,
    precision: str = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Retrieval for a chunk.

    Args:
        q: (B, C, H, hs) queries, beta folded in.
        store_k, store_v: (B, N, H, hs) the store, or a pool (P, H, S, hs) of blocks of S.
        new_k, new_v: (B, C, H, hs) pairs completed by the chunk (pair j is tau = pos-1+j).
        pos: (B,) chunk start positions.   lengths: (B,) real tokens per row.
        window: h for the STM, 0 for none.   delay: 1 for the STM, m for the LTM.
        ring: the store is a ring of N slots (STM) rather than indexed by tau (LTM).
        blocks: (B, NB) int64, the block table of a pool: row b's slot n is in pool block
            blocks[b, n // S]; None for a flat store.
        scales: int8 stores' (k_scale, v_scale), the store's layout without hs: stored pair s
            stands for (store_k[s] * k_scale[s], store_v[s] * v_scale[s]); None for fp stores.
        half_dot: multiply fp16/bf16 stores on tensor cores (fast; scores lose ~beta * 2^-9
            absolute) instead of in fp32 (the default, matches the reference).
        precision: the fp32 products: "ieee" (exact fp32), "tf32x3" (each product split in
            three tf32 tensor-core products, sm80+), "bf16x3" (bf16 stores: q and the weights
            split in three bf16 terms, sm80+), or "auto" (the default; see `products`). The
            split products agree with fp32 to ~2^-22 of each product.
        block_m, block_n, num_warps, num_stages: tiling; the defaults are the measured best on
            a GPU (bench/results/kernels_*.json) and small tiles under the interpreter.
    Returns:
        (B, C, H, hs) fp32.
    """
    B, C, H, hs = q.shape
    for name, x in (
        ("q", q),
        ("store_k", store_k),
        ("store_v", store_v),
        ("new_k", new_k),
        ("new_v", new_v),
    ):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    st, sc = store_layout(store_k, blocks), scale_layout(scales, store_k, blocks)
    dot, new_dot = products(precision, half_dot, store_k, sc["scaled"])
    tiling = GPU_TILINGS[dot] if q.is_cuda else (16, 32, 4, 3)  # small tiles interpreted
    block_m, block_n = block_m or tiling[0], block_n or tiling[1]
    num_warps, num_stages = num_warps or tiling[2], num_stages or tiling[3]
    head_dim = max(16, triton.next_power_of_2(hs))
    y = torch.empty(B, C, H, hs, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(C, block_m), B * H)
    _retrieval_kernel[grid](
        q, store_k, store_v, sc["k"], sc["v"], new_k, new_v, pos, lengths, y, st["table"],
        q.stride(0), q.stride(1), q.stride(2),
        st["b"], st["n"], st["h"], st["blk"], st["table_b"],
        sc["b"], sc["n"], sc["h"], sc["blk"],
        new_k.stride(0), new_k.stride(1), new_k.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        C, H, st["slots"], st["block_slots"], hs,
        WINDOW=window, DELAY=delay, RING=ring, BLOCKED=st["blocked"],
        DOT=dot, NEW_DOT=new_dot, SCALED=sc["scaled"],
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, EVEN_D=head_dim == hs,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


@triton.jit
def _decode_split_kernel(
    Q, KS, VS, KSC, VSC, KN, VN, POS, LEN, M_PART, L_PART, ACC_PART, TABLE,
    stride_qb, stride_qh,
    stride_sb, stride_sn, stride_sh, stride_blk, stride_tb,
    scale_b, scale_n, scale_h, scale_blk,
    stride_nb, stride_nh,
    H, SLOTS, BLOCK_SLOTS, D, SPLIT_SIZE,
    WINDOW: tl.constexpr, DELAY: tl.constexpr, RING: tl.constexpr, BLOCKED: tl.constexpr,
    SCALED: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Decode (C = 1), flash-decoding style: program (b*H + h, split) reduces one slice of the
    visible range [lo, hi] to a partial (max, sum, weighted values). The slice's stored pairs
    stream through the loop; the one pair the step completes (tau = pos-1) is folded in after it
    by the slice that covers it."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    pos = tl.load(POS + b).to(tl.int64)
    length = tl.load(LEN + b).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    q = q * 1.4426950408889634  # log2(e): the softmax runs on exp2
    hi = tl.minimum(pos - DELAY, pos + length - 2)  # the single query's visible set is [lo, hi]
    lo = tl.maximum(pos - WINDOW + 1, 0) if WINDOW > 0 else 0
    first = lo + split * SPLIT_SIZE
    last = tl.minimum(first + SPLIT_SIZE - 1, hi)
    store_last = tl.minimum(last, pos - 2)

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    ks, vs = KS + b * stride_sb + h * stride_sh, VS + b * stride_sb + h * stride_sh
    ksc, vsc = KSC + b * scale_b + h * scale_h, VSC + b * scale_b + h * scale_h
    for start in range(first, store_last + 1, BLOCK_N):
        tau = start + tl.arange(0, BLOCK_N)
        ok = tau <= store_last
        k, v = _load_pairs(ks, vs, ksc, vsc, tau, ok, offs_d, d_ok, SLOTS, BLOCK_SLOTS,
                           stride_blk, stride_sn, scale_blk, scale_n, TABLE + b * stride_tb,
                           RING, BLOCKED, True, False, SCALED)  # fmt: skip
        k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift)
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    fresh = (pos - 1 >= first) & (pos - 1 <= last) & (pos >= 1)
    n_ptr = b * stride_nb + h * stride_nh + offs_d
    n_ok = d_ok & (tl.zeros([HEAD_DIM], dtype=tl.int32) + fresh.to(tl.int32) > 0)  # (HEAD_DIM,)
    k = tl.load(KN + n_ptr, mask=n_ok, other=0.0).to(tl.float32)
    v = tl.load(VN + n_ptr, mask=n_ok, other=0.0).to(tl.float32)
    s = tl.where(fresh, tl.sum(k * q, 0), float("-inf"))
    m_new = tl.maximum(m_i, s)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - shift)
    alpha = tl.math.exp2(m_i - shift)
    l_i = l_i * alpha + p
    acc = acc * alpha + p * v
    m_i = m_new

    part = pid_bh * NUM_SPLITS + split
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)
    tl.store(ACC_PART + part * HEAD_DIM + offs_d, acc)


@triton.jit
def _decode_reduce_kernel(
    M_PART, L_PART, ACC_PART, Y,
    stride_yb, stride_yh,
    H, D,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Merge the partials of one (sequence, head): rescale each to the global max and sum."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    parts = pid_bh * NUM_SPLITS + offs_s
    m = tl.load(M_PART + parts)
    m_all = tl.max(m, 0)
    scale = tl.math.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # empty splits: 0
    l_all = tl.sum(tl.load(L_PART + parts) * scale, 0)
    acc = tl.sum(
        tl.load(ACC_PART + parts[:, None] * HEAD_DIM + offs_d[None, :]) * scale[:, None], 0
    )
    y = acc / tl.maximum(l_all, 1.0)
    tl.store(Y + b * stride_yb + h * stride_yh + offs_d, y, mask=offs_d < D)


@torch.compiler.assume_constant_result  # torch.compile'd steps read it once
def gpu_programs(index: int) -> int:
    """Programs a decode step aims for on CUDA device `index`: 2 per multiprocessor (on an H200
    the best split or within 1 % of it at 1k and 4k pairs and batch 1, 8 and 64,
    bench/results/kernels_splits_h200.json)."""
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(
    reach: int, rows: int, split_size: int, max_splits: int, programs: int | None
) -> int:
    """Slices of one (sequence, head)'s range of `reach` pairs in a decode step: a power of two,
    at most max_splits, each slice at least split_size pairs, and no more than `rows` (B x H)
    programs need to come near `programs` (None: no such bound). Few long slices keep each
    program's loads pipelined; a batch of many rows fills the GPU without splitting."""
    splits = min(max_splits, max(1, reach // split_size))
    if programs is not None:
        splits = min(splits, max(1, -(-programs // rows)))
    return 1 << (splits.bit_length() - 1)


def retrieve_decode(
    q: torch.Tensor,
    store_k: torch.Tensor,
    store_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    pos: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    delay: int,
    ring: bool,
    blocks: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    split_size: int = 64,
    block_n: int = 128,
    max_splits: int = 16,
    num_warps: int = 8,
    num_stages: int = 4,
    programs: int | None = None,
) -> torch.Tensor:
    """Retrieval for one query per sequence (C = 1), split across the store and reduced.

    Same arguments as `retrieve` with C = 1, and the split: each (sequence, head) range is cut
    in `decode_splits` slices of at least split_size pairs, so that B x H x splits programs
    come near `programs` (default: `gpu_programs` on a GPU, no bound under the interpreter).
    The split follows the store's size, not the positions, so the launch shape is static
    (capturable in a CUDA graph). The tiling defaults are the measured best on an H100
    and an H200 (bench/results/kernels_*.json).
    """
    B, C, H, hs = q.shape
    if C != 1:
        raise ValueError(f"retrieve_decode takes one query per sequence, got a chunk of {C}")
    head_dim = max(16, triton.next_power_of_2(hs))
    st, sc = store_layout(store_k, blocks), scale_layout(scales, store_k, blocks)
    reach = st["slots"] + 1  # most pairs one query can see
    if programs is None and q.is_cuda:
        programs = gpu_programs(q.device.index)
    splits = decode_splits(reach, B * H, split_size, max_splits, programs)
    split_size = triton.cdiv(reach, splits)
    m_part = torch.empty(B * H * splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H * splits, head_dim, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B * H, splits)](
        q, store_k, store_v, sc["k"], sc["v"], new_k, new_v, pos, lengths, m_part, l_part, acc_part,
        st["table"],
        q.stride(0), q.stride(2),
        st["b"], st["n"], st["h"], st["blk"], st["table_b"],
        sc["b"], sc["n"], sc["h"], sc["blk"],
        new_k.stride(0), new_k.stride(2),
        H, st["slots"], st["block_slots"], hs, split_size,
        WINDOW=window, DELAY=delay, RING=ring, BLOCKED=st["blocked"], SCALED=sc["scaled"],
        NUM_SPLITS=splits, BLOCK_N=block_n, HEAD_DIM=head_dim,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    y = torch.empty(B, 1, H, hs, dtype=torch.float32, device=q.device)
    _decode_reduce_kernel[(B * H,)](
        m_part, l_part, acc_part, y,
        y.stride(0), y.stride(2),
        H, hs,
        NUM_SPLITS=splits, HEAD_DIM=head_dim,
    )  # fmt: skip
    return y


def retrieve_any(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`retrieve_decode` for one query per sequence (split across the store), else `retrieve`;
    same arguments (the decode kernel's own tiling keywords excepted)."""
    return (retrieve_decode if q.shape[1] == 1 else retrieve)(q, *args, **kwargs)

"""The gated key scan in Triton (eq. 8 in its log-space stabilised form), state in and out.

A program walks a segment of the chunk in blocks of BLOCK_T tokens for one (sequence, head).
Inside a block the recurrence is solved in parallel: with Lam(j, i) = sum_{j < l <= i} log_lam_l
(a masked cumulative sum: the same terms the sequential recurrence multiplies),
    k_bar_i = sum_{j <= i} exp(log_g_j + Lam(j, i)) k~_j + exp(Lam(-1, i)) k_bar_in,
shifted by the running max M_i so no exponent overflows (k_bar = exp(M) * s), and the state
(s, M) of the block's last token carries to the next block.

A long chunk is cut into segments scanned in parallel (a GPU has far more cores than a batch has
sequence-heads), in three launches: (1) each segment's end state from a zero start, with its
total log-decay; (2) per (sequence, head), the segments' incoming states, chained in order:
    k_bar_out = exp(Lam_seg) k_bar_in + k_bar_local;
(3) each segment again from its incoming state, writing the keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_segment_kernel(
    K, LOG_G, LOG_LAM, LEN, S_IN, MX_IN, S_OUT, MX_OUT, LAM_OUT, OUT,
    stride_kb, stride_kc, stride_kh,
    stride_gb, stride_gc,
    stride_sb, stride_sg, stride_sh,
    stride_mb, stride_mg,
    stride_ob, stride_oc, stride_oh,
    C, SEG, H, D, eps,
    FROM_ZERO: tl.constexpr, WRITE_KEYS: tl.constexpr, WRITE_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Program (b*H + h, segment): tokens [segment*SEG, segment*SEG + SEG) of the chunk.
    State buffers are (B, NSEG, H, hs) and (B, NSEG, H); with one segment, the state itself."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_T)
    in_d = offs_d < D  # HEAD_DIM is hs rounded up to a power of two
    length = tl.load(LEN + b)
    s_at = b * stride_sb + seg * stride_sg + h * stride_sh + offs_d
    mx_at = b * stride_mb + seg * stride_mg + h
    if FROM_ZERO:
        s = tl.zeros([HEAD_DIM], dtype=tl.float32)
        mx_in = tl.max(tl.full([BLOCK_T], float("-inf"), dtype=tl.float32), 0)
    else:
        s = tl.load(S_IN + s_at, mask=in_d, other=0.0)  # (HEAD_DIM,)
        mx_in = tl.load(MX_IN + mx_at)  # -inf before the first token
    mx = mx_in
    lam_total = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), 0)
    later = offs_t[None, :] > offs_t[:, None]  # [j, l]: l > j
    causal = offs_t[None, :] <= offs_t[:, None]  # [i, j]: j <= i
    last_row = offs_t == BLOCK_T - 1
    first = seg * SEG
    for start in range(first, tl.minimum(first + SEG, C), BLOCK_T):  # padding writes zeros
        t = start + offs_t
        real = t < length  # padding tokens are no-ops: no input, no decay
        g_ptr = b * stride_gb + t * stride_gc + h
        log_g = tl.load(LOG_G + g_ptr, mask=real, other=float("-inf"))
        lam = tl.load(LOG_LAM + g_ptr, mask=real, other=0.0)
        k = tl.load(K + b * stride_kb + t[:, None] * stride_kc + h * stride_kh + offs_d[None, :],
                    mask=real[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # fmt: skip
        # Lam[j, i] = sum_l lam_l [j < l <= i], then W[i, j] = log_g_j + Lam[j, i] for j <= i.
        lam_after = tl.cumsum(tl.where(later, lam[None, :], 0.0), axis=1)  # [j, i]
        w = tl.where(causal, tl.trans(lam_after) + log_g[None, :], float("-inf"))  # [i, j]
        w_state = mx + tl.cumsum(lam, axis=0)  # (BLOCK_T,) log-weight of the carried state
        m = tl.maximum(tl.maximum(tl.max(w, 1), w_state), -1e30)  # floor: no -inf - -inf
        e = tl.exp(w - m[:, None])
        s_all = tl.dot(e, k, input_precision="ieee") + tl.exp(w_state - m)[:, None] * s[None, :]
        if WRITE_KEYS:
            # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-m).
            norm = tl.maximum(tl.sqrt(tl.sum(s_all * s_all, 1)), eps * tl.exp(-m))
            k_bar = tl.where(real[:, None], s_all / norm[:, None], 0.0)
            tl.store(OUT + b * stride_ob + t[:, None] * stride_oc + h * stride_oh
                     + offs_d[None, :], k_bar, mask=(t < C)[:, None] & in_d[None, :])  # fmt: skip
        s = tl.sum(tl.where(last_row[:, None], s_all, 0.0), 0)  # padding rows change nothing
        mx = tl.sum(tl.where(last_row, m, 0.0), 0)
        lam_total += tl.sum(lam, 0)
    if WRITE_STATE:
        tl.store(S_OUT + s_at, s, mask=in_d)
        tl.store(MX_OUT + mx_at, tl.where(length > 0, mx, mx_in))  # an idle row keeps -inf
    if FROM_ZERO:
        tl.store(LAM_OUT + mx_at, lam_total)


@triton.jit
def _chain_segments_kernel(
    S, MX, LEN, S_LOC, MX_LOC, LAM_SEG, S_IN, MX_IN,
    stride_sb, stride_sh, stride_mb,
    stride_lb, stride_lg, stride_lh,
    stride_nb, stride_ng,
    NSEG, H, D,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Program b*H + h: each segment's incoming state in turn, then the chunk's final state."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, HEAD_DIM)
    in_d = offs_d < D
    s = tl.load(S + b * stride_sb + h * stride_sh + offs_d, mask=in_d, other=0.0)
    mx0 = tl.load(MX + b * stride_mb + h)
    mx = mx0
    for seg in range(0, NSEG):
        tl.store(S_IN + b * stride_lb + seg * stride_lg + h * stride_lh + offs_d, s, mask=in_d)
        tl.store(MX_IN + b * stride_nb + seg * stride_ng + h, mx)
        s_loc = tl.load(S_LOC + b * stride_lb + seg * stride_lg + h * stride_lh + offs_d,
                        mask=in_d, other=0.0)  # fmt: skip
        m_loc = tl.load(MX_LOC + b * stride_nb + seg * stride_ng + h)
        carried = mx + tl.load(LAM_SEG + b * stride_nb + seg * stride_ng + h)
        m = tl.maximum(tl.maximum(carried, m_loc), -1e30)
        s = tl.exp(carried - m) * s + tl.exp(m_loc - m) * s_loc
        mx = m
    tl.store(S + b * stride_sb + h * stride_sh + offs_d, s, mask=in_d)
    tl.store(MX + b * stride_mb + h, tl.where(tl.load(LEN + b) > 0, mx, mx0))


def gated_key_scan(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    lengths: torch.Tensor,
    s: torch.Tensor,
    mx: torch.Tensor,
    eps: float,
    block_t: int = 16,
    num_warps: int = 4,
    segment: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit keys of a chunk; s and mx are updated in place.

    Args:
        k_raw: (B, C, H, hs) key projections.   log_g, log_lam: (B, C, H) fp32.
        lengths: (B,) real tokens per row (the rest is padding and leaves the state alone).
        s: (B, H, hs) fp32 stabilised state.   mx: (B, H) fp32 running max.
        block_t: tokens solved in parallel per step of a program's loop.
        num_warps: warps per program.
        segment: tokens per program (a multiple of block_t); a chunk longer than that is scanned
            in parallel segments. Default: enough segments for about 1024 programs on a GPU,
            one segment under the interpreter.
        out: (B, C, H, hs) fp32 buffer for the keys (default: a new one).
    Returns:
        (B, C, H, hs) fp32 keys; padding positions are 0.
    """
    B, C, H, hs = k_raw.shape
    k_raw, log_g, log_lam = k_raw.contiguous(), log_g.contiguous(), log_lam.contiguous()
    if segment is None:
        wanted = triton.cdiv(1024, B * H) if k_raw.is_cuda else 1
        segment = max(256, triton.cdiv(triton.cdiv(C, wanted), block_t) * block_t)
    if segment % block_t:
        raise ValueError(f"segment ({segment}) must be a multiple of block_t ({block_t})")
    nseg = triton.cdiv(C, segment)
    if out is None:
        out = torch.empty(B, C, H, hs, dtype=torch.float32, device=k_raw.device)
    head_dim = max(16, triton.next_power_of_2(hs))

    def launch(s_in, mx_in, s_out, mx_out, lam_out, from_zero, write_keys, write_state):
        _scan_segment_kernel[(B * H, nseg)](
            k_raw, log_g, log_lam, lengths, s_in, mx_in, s_out, mx_out, lam_out, out,
            k_raw.stride(0), k_raw.stride(1), k_raw.stride(2),
            log_g.stride(0), log_g.stride(1),
            s_in.stride(0), s_in.stride(1) if s_in.dim() == 4 else 0, s_in.stride(-2),
            mx_in.stride(0), mx_in.stride(1) if mx_in.dim() == 3 else 0,
            out.stride(0), out.stride(1), out.stride(2),
            C, segment, H, hs, eps,
            FROM_ZERO=from_zero, WRITE_KEYS=write_keys, WRITE_STATE=write_state,
            BLOCK_T=block_t, HEAD_DIM=head_dim, num_warps=num_warps,
        )  # fmt: skip

    if nseg == 1:
        launch(s, mx, s, mx, mx, False, True, True)
        return out
    s_seg = torch.empty(B, nseg, H, hs, dtype=torch.float32, device=k_raw.device)
    mx_seg = torch.empty(B, nseg, H, dtype=torch.float32, device=k_raw.device)
    lam_seg = torch.empty_like(mx_seg)
    launch(s_seg, mx_seg, s_seg, mx_seg, lam_seg, True, False, True)  # local end states
    s_in, mx_in = torch.empty_like(s_seg), torch.empty_like(mx_seg)
    _chain_segments_kernel[(B * H,)](
        s, mx, lengths, s_seg, mx_seg, lam_seg, s_in, mx_in,
        s.stride(0), s.stride(1), mx.stride(0),
        s_seg.stride(0), s_seg.stride(1), s_seg.stride(2),
        mx_seg.stride(0), mx_seg.stride(1),
        nseg, H, hs,
        HEAD_DIM=head_dim,
    )  # fmt: skip
    launch(s_in, mx_in, s_in, mx_in, mx_in, False, True, False)  # keys from incoming states
    return out


def scan_bytes(B: int, C: int, H: int, hs: int, elem: int) -> int:
    """Bytes the scan must move: k~ in, keys out (fp32), gates; for benchmarks."""
    return B * C * H * (hs * (elem + 4) + 8)

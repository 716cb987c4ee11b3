"""The gated key scan in Triton (eq. 8 in its log-space stabilised form), state in and out.

A program walks a segment of the chunk token by token for one (sequence, head), exactly as eq. 8
reads (k_bar = exp(mx) * s, mx the running max of the log-weights, so no gate overflows):
    mx_t = max(mx_{t-1} + log_lam_t, log_g_t),
    s_t = exp(mx_{t-1} + log_lam_t - mx_t) s_{t-1} + exp(log_g_t - mx_t) k~_t,
    k_t = s_t / max(||s_t||, eps exp(-mx_t)).
The work per token is one fused multiply-add per channel and a norm, so the scan is bound by
reading k~ and writing keys, provided enough programs run at once: one warp per program, and a
long chunk is cut into segments scanned in parallel, in three launches: (1) each segment's end
state from a zero start, with its total log-decay; (2) per (sequence, head), the segments'
incoming states, chained in order:
    k_bar_out = exp(Lam_seg) k_bar_in + k_bar_local;
(3) each segment again from its incoming state, writing the keys.

(A block-parallel form, each block of 16-64 tokens solved by one (T x T) @ (T x hs) product of its
decay matrix, ran at a third of the bandwidth on an H200: the layout changes, barriers and
reductions per block cost more than the one multiply-add per channel they replace.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mosaicrt.ops.gated_key_scan import FLOOR as RUNNING_MAX_FLOOR

FLOOR = tl.constexpr(RUNNING_MAX_FLOOR)


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
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Program (b*H + h, segment): tokens [segment*SEG, segment*SEG + SEG) of the chunk, one by one.
    State buffers are (B, NSEG, H, hs) and (B, NSEG, H); with one segment, the state itself."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, HEAD_DIM)
    in_d = offs_d < D
    length = tl.load(LEN + b)
    s_at = b * stride_sb + seg * stride_sg + h * stride_sh + offs_d
    mx_at = b * stride_mb + seg * stride_mg + h
    if FROM_ZERO:
        s = tl.zeros([HEAD_DIM], dtype=tl.float32)
        mx = tl.max(tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32), 0)
    else:
        s = tl.load(S_IN + s_at, mask=in_d, other=0.0)  # (HEAD_DIM,)
        mx = tl.load(MX_IN + mx_at)  # -inf before the first token
    lam_total = tl.sum(tl.zeros([HEAD_DIM], dtype=tl.float32), 0)
    first = seg * SEG
    stop = tl.minimum(first + SEG, C)
    real_stop = tl.maximum(tl.minimum(stop, length), first)  # padding tokens are no-ops
    for t in range(first, real_stop):
        log_g = tl.load(LOG_G + b * stride_gb + t * stride_gc + h)
        lam = tl.load(LOG_LAM + b * stride_gb + t * stride_gc + h)
        k = tl.load(K + b * stride_kb + t * stride_kc + h * stride_kh + offs_d, mask=in_d,
                    other=0.0).to(tl.float32)  # fmt: skip
        carried = mx + lam
        mx_new = tl.maximum(carried, log_g)
        s = tl.exp(carried - mx_new) * s + tl.exp(log_g - mx_new) * k
        mx = mx_new
        lam_total += lam
        if WRITE_KEYS:
            # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-mx).
            norm = tl.maximum(tl.sqrt(tl.sum(s * s, 0)), eps * tl.exp(-mx))
            tl.store(OUT + b * stride_ob + t * stride_oc + h * stride_oh + offs_d, s / norm,
                     mask=in_d)  # fmt: skip
    if WRITE_KEYS:
        for t in range(real_stop, stop):
            tl.store(OUT + b * stride_ob + t * stride_oc + h * stride_oh + offs_d,
                     tl.zeros([HEAD_DIM], dtype=tl.float32), mask=in_d)  # fmt: skip
    if WRITE_STATE:
        tl.store(S_OUT + s_at, s, mask=in_d)
        tl.store(MX_OUT + mx_at, mx)
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
        m = tl.maximum(tl.maximum(carried, m_loc), FLOOR)
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
    num_warps: int = 1,
    num_stages: int = 3,
    segment: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit keys of a chunk; s and mx are updated in place.

    Args:
        k_raw: (B, C, H, hs) key projections.   log_g, log_lam: (B, C, H) fp32.
        lengths: (B,) real tokens per row (the rest is padding and leaves the state alone).
        s: (B, H, hs) fp32 stabilised state.   mx: (B, H) fp32 running max.
        num_warps, num_stages: warps per program, software-pipelining depth of its token loop.
        segment: tokens per program; a chunk longer than that is scanned in parallel segments.
            Default: enough segments for about 4096 programs on a GPU (at least 64 tokens
            each), one segment under the interpreter.
        out: (B, C, H, hs) fp32 buffer for the keys (default: a new one).
    Returns:
        (B, C, H, hs) fp32 keys; padding positions are 0.
    """
    B, C, H, hs = k_raw.shape
    k_raw, log_g, log_lam = k_raw.contiguous(), log_g.contiguous(), log_lam.contiguous()
    if segment is None:
        wanted = triton.cdiv(4096, B * H) if k_raw.is_cuda else 1
        segment = max(64, triton.cdiv(C, wanted))
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
            HEAD_DIM=head_dim, num_warps=num_warps, num_stages=num_stages,
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

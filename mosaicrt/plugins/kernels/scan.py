"""The gated key scan in Triton (eq. 8 in its log-space stabilised form), state in and out.

One program per (sequence, head) walks the chunk in blocks of BLOCK_T tokens. Inside a block the
recurrence is solved in parallel: with Lam(j, i) = sum_{j < l <= i} log_lam_l (a masked cumulative
sum: the same terms the sequential recurrence multiplies),
    k_bar_i = sum_{j <= i} exp(log_g_j + Lam(j, i)) k~_j + exp(Lam(-1, i)) k_bar_in,
shifted by the running max M_i so no exponent overflows (k_bar = exp(M) * s), and the state
(s, M) of the block's last token carries to the next block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_scan_kernel(
    K, LOG_G, LOG_LAM, LEN, S, MX, OUT,
    stride_kb, stride_kc, stride_kh,
    stride_gb, stride_gc,
    stride_sb, stride_sh,
    stride_mb,
    stride_ob, stride_oc, stride_oh,
    C, H, D, eps,
    BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_T)
    in_d = offs_d < D  # HEAD_DIM is hs rounded up to a power of two
    length = tl.load(LEN + b)
    s = tl.load(S + b * stride_sb + h * stride_sh + offs_d, mask=in_d, other=0.0)  # (HEAD_DIM,)
    mx_in = tl.load(MX + b * stride_mb + h)  # -inf before the first token
    mx = mx_in
    later = offs_t[None, :] > offs_t[:, None]  # [j, l]: l > j
    causal = offs_t[None, :] <= offs_t[:, None]  # [i, j]: j <= i
    last_row = offs_t == BLOCK_T - 1
    for start in range(0, C, BLOCK_T):  # padding blocks too: they write the zeros
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
        # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-m).
        norm = tl.maximum(tl.sqrt(tl.sum(s_all * s_all, 1)), eps * tl.exp(-m))
        k_bar = tl.where(real[:, None], s_all / norm[:, None], 0.0)
        tl.store(OUT + b * stride_ob + t[:, None] * stride_oc + h * stride_oh + offs_d[None, :],
                 k_bar, mask=(t < C)[:, None] & in_d[None, :])  # fmt: skip
        s = tl.sum(tl.where(last_row[:, None], s_all, 0.0), 0)  # padding rows change nothing
        mx = tl.sum(tl.where(last_row, m, 0.0), 0)
    tl.store(S + b * stride_sb + h * stride_sh + offs_d, s, mask=in_d)
    tl.store(MX + b * stride_mb + h, tl.where(length > 0, mx, mx_in))  # an idle row keeps -inf


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
) -> torch.Tensor:
    """Unit keys of a chunk; s and mx are updated in place.

    Args:
        k_raw: (B, C, H, hs) key projections.   log_g, log_lam: (B, C, H) fp32.
        lengths: (B,) real tokens per row (the rest is padding and leaves the state alone).
        s: (B, H, hs) fp32 stabilised state.   mx: (B, H) fp32 running max.
        block_t: tokens solved in parallel per step of the program's loop.
        num_warps: warps per program (one program per sequence and head).
    Returns:
        (B, C, H, hs) fp32 keys; padding positions are 0.
    """
    B, C, H, hs = k_raw.shape
    k_raw, log_g, log_lam = k_raw.contiguous(), log_g.contiguous(), log_lam.contiguous()
    out = torch.empty(B, C, H, hs, dtype=torch.float32, device=k_raw.device)
    _gated_scan_kernel[(B * H,)](
        k_raw, log_g, log_lam, lengths, s, mx, out,
        k_raw.stride(0), k_raw.stride(1), k_raw.stride(2),
        log_g.stride(0), log_g.stride(1),
        s.stride(0), s.stride(1),
        mx.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        C, H, hs, eps,
        BLOCK_T=block_t, HEAD_DIM=max(16, triton.next_power_of_2(hs)),
        num_warps=num_warps,
    )  # fmt: skip
    return out


def scan_bytes(B: int, C: int, H: int, hs: int, elem: int) -> int:
    """Bytes the scan must move: k~ in, keys out (fp32), gates; for benchmarks."""
    return B * C * H * (hs * (elem + 4) + 8)

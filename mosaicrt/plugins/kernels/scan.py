"""The gated key scan in Triton (eq. 8 in its log-space stabilised form), state in and out.

One program per (sequence, head) keeps the vector state s (hs,) and the running max in fp32
registers and walks the chunk: k_bar = exp(mx) * s, so no gate ever overflows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_scan_kernel(
    K,
    LOG_G,
    LOG_LAM,
    LEN,
    S,
    MX,
    OUT,
    stride_kb,
    stride_kc,
    stride_kh,
    stride_gb,
    stride_gc,
    stride_sb,
    stride_sh,
    stride_mb,
    stride_ob,
    stride_oc,
    stride_oh,
    H,
    D,
    eps,
    HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, HEAD_DIM)
    in_d = offs_d < D  # HEAD_DIM is hs rounded up to a power of two
    length = tl.load(LEN + b)
    s = tl.load(S + b * stride_sb + h * stride_sh + offs_d, mask=in_d, other=0.0)  # fp32
    mx = tl.load(MX + b * stride_mb + h)  # -inf before the first token
    for i in range(0, length):
        k = tl.load(
            K + b * stride_kb + i * stride_kc + h * stride_kh + offs_d, mask=in_d, other=0.0
        ).to(tl.float32)
        log_g = tl.load(LOG_G + b * stride_gb + i * stride_gc + h)
        carried = mx + tl.load(LOG_LAM + b * stride_gb + i * stride_gc + h)
        mx_new = tl.maximum(carried, log_g)
        s = tl.exp(carried - mx_new) * s + tl.exp(log_g - mx_new) * k
        mx = mx_new
        # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-mx).
        norm = tl.maximum(tl.sqrt(tl.sum(s * s, 0)), eps * tl.exp(-mx))
        tl.store(OUT + b * stride_ob + i * stride_oc + h * stride_oh + offs_d, s / norm, mask=in_d)
    tl.store(S + b * stride_sb + h * stride_sh + offs_d, s, mask=in_d)
    tl.store(MX + b * stride_mb + h, mx)


def gated_key_scan(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    lengths: torch.Tensor,
    s: torch.Tensor,
    mx: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Unit keys of a chunk; s and mx are updated in place.

    Args:
        k_raw: (B, C, H, hs) key projections.   log_g, log_lam: (B, C, H) fp32.
        lengths: (B,) real tokens per row (the rest is padding and leaves the state alone).
        s: (B, H, hs) fp32 stabilised state.   mx: (B, H) fp32 running max.
    Returns:
        (B, C, H, hs) fp32 keys; padding positions are 0.
    """
    B, C, H, hs = k_raw.shape
    k_raw, log_g, log_lam = k_raw.contiguous(), log_g.contiguous(), log_lam.contiguous()
    out = torch.zeros(B, C, H, hs, dtype=torch.float32, device=k_raw.device)
    _gated_scan_kernel[(B * H,)](
        k_raw,
        log_g,
        log_lam,
        lengths,
        s,
        mx,
        out,
        k_raw.stride(0),
        k_raw.stride(1),
        k_raw.stride(2),
        log_g.stride(0),
        log_g.stride(1),
        s.stride(0),
        s.stride(1),
        mx.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        hs,
        eps,
        HEAD_DIM=triton.next_power_of_2(hs),
    )
    return out


def scan_bytes(B: int, C: int, H: int, hs: int, elem: int) -> int:
    """Bytes the scan must move: k~ in, keys out (fp32), gates; for benchmarks."""
    return B * C * H * (hs * (elem + 4) + 8)

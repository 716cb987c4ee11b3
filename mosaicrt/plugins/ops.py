"""The `mosaic` ONNX ops (mosaicrt.export.ops) computed by the Triton kernels, on tensors in the
step graph's layouts: what a TensorRT plugin's enqueue runs once TensorRT's pointers are tensors.

The kernels derive visibility from each row's position and length instead of reading the graph's
tau tensors; the step graph's tensors determine both (t = pos + j; new_tau = t - 1 for real tokens
with t >= 1, else -1), so these functions take them from there.
"""

from __future__ import annotations

import torch

from mosaicrt.plugins.kernels.retrieval import retrieve_any
from mosaicrt.plugins.kernels.scan import gated_key_scan


def gated_key_scan_op(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    valid: torch.Tensor,
    s_in: torch.Tensor,
    mx_in: torch.Tensor,
    eps: float,
    keys: torch.Tensor,
    s_out: torch.Tensor,
    mx_out: torch.Tensor,
) -> None:
    """mosaic::GatedKeyScan into its output buffers.

    k_raw (B, C, H, hs), log_g / log_lam (B, C, H), valid (B, C) bool (a prefix of each row),
    s_in (B, H, hs), mx_in (B, H)  ->  keys (B, C, H, hs), s_out (B, H, hs), mx_out (B, H).
    """
    s_out.copy_(s_in)
    mx_out.copy_(mx_in)
    gated_key_scan(k_raw, log_g, log_lam, valid.sum(dim=1), s_out, mx_out, eps, out=keys)


def associative_memory_op(
    q: torch.Tensor,
    t: torch.Tensor,
    store_k: torch.Tensor,
    store_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_tau: torch.Tensor,
    beta0: torch.Tensor,
    beta1: torch.Tensor,
    alpha: torch.Tensor,
    kind: str,
    window: int,
    delay: int,
    y: torch.Tensor,
) -> None:
    """mosaic::AssociativeMemory into y (its store_tau input is implied by the positions).

    q (B, C, H, hs) unit query keys, t (B, C) positions, store_k / store_v (NB, B, H, S, hs),
    new_k / new_v (B, C, H, hs), new_tau (B, C), beta0 / beta1 / alpha (H,)  ->  y (B, C, H, hs).
    """
    pos = t[:, 0].contiguous()
    # Real tokens: those whose pair exists (new_tau >= 0), plus a sequence's first token, whose pair
    # (tau = -1) does not. A row of no tokens at position 0 counts one: it sees nothing either way.
    lengths = (new_tau >= 0).sum(dim=1) + (pos == 0)
    n = (t - delay + 1).clamp(min=0)  # visible pairs n_t (eq. 10); the STM's window caps them
    if kind == "stm":
        n = n.clamp(max=window - delay)
    beta = beta1 * n[..., None].float() ** alpha + beta0  # (B, C, H)
    qb = (q.float() * beta[..., None]).contiguous()
    y.copy_(
        retrieve_any(
            qb,
            store_k,
            store_v,
            new_k.contiguous(),
            new_v.contiguous(),
            pos,
            lengths,
            window=window if kind == "stm" else 0,
            delay=delay,
            ring=kind == "stm",
        )
    )

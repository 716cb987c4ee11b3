"""GatedKeyScan in torch: the streaming form the reference model runs, token by token, and a
chunked parallel form over whole sequences that autograd can go through (training)."""

from __future__ import annotations

import torch

PARALLEL_CHUNK = 64  # tokens per block of the parallel form


def l2_normalize(x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) over the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def gated_key_scan(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    valid: torch.Tensor,
    s: torch.Tensor,
    mx: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The op's contract with the state updated in place: s (B, H, hs) and mx (B, H) in, the
    chunk's end state out; returns the keys (B, C, H, hs)."""
    s_t, mx_t = s, mx
    keys = []
    for i in range(k_raw.shape[1]):
        carried = mx_t + log_lam[:, i]  # (B, H) log-weight of the old state
        mx_new = torch.maximum(carried, log_g[:, i])
        s_new = (
            torch.exp(carried - mx_new)[..., None] * s_t
            + torch.exp(log_g[:, i] - mx_new)[..., None] * k_raw[:, i]
        )
        ok = valid[:, i, None]  # (B, 1)
        s_t = torch.where(ok[..., None], s_new, s_t)
        mx_t = torch.where(ok, mx_new, mx_t)
        # ||k_bar|| vs eps  <=>  ||s|| vs eps * exp(-mx): the same max, without leaving log-space.
        keys.append(l2_normalize(s_t, eps * torch.exp(-mx_t)[..., None]))
    s.copy_(s_t)
    mx.copy_(mx_t)
    return torch.stack(keys, dim=1)  # (B, C, H, hs)


def parallel_key_scan(
    k_raw: torch.Tensor, log_g: torch.Tensor, log_lam: torch.Tensor, eps: float
) -> torch.Tensor:
    """The keys of whole sequences from a zero state (every token real), differentiable.

    In blocks of PARALLEL_CHUNK tokens: inside a block, k_bar_t = sum_{tau <= t} exp(log g_tau +
    Lam(tau, t)) k~_tau with a local cumulative sum of the log-decays (small, so exact in fp32),
    stabilised by its running max; between blocks, the carried state as in the streaming form.
    k_raw (B, T, H, hs), log_g / log_lam (B, T, H) -> keys (B, T, H, hs).
    """
    keys = []
    s = mx = None  # carried state: k_bar = exp(mx) * s, (B, H, hs) and (B, H)
    # split, not slices: its backward is one concatenation, not a full-size zero tensor per block.
    blocks = (x.split(PARALLEL_CHUNK, dim=1) for x in (k_raw, log_g, log_lam))
    for k, g, lam in zip(*blocks):
        k = k.transpose(1, 2)  # (B, H, Q, hs)
        g = g.transpose(1, 2)  # (B, H, Q)
        lam = lam.transpose(1, 2).cumsum(-1)  # (B, H, Q)
        Q = k.shape[2]
        # a[t, tau] = log g_tau + sum_{tau < i <= t} log lam_i, for tau <= t.
        a = g[..., None, :] + lam[..., :, None] - lam[..., None, :]  # (B, H, Q, Q)
        causal = torch.ones(Q, Q, dtype=torch.bool, device=k.device).tril()
        a = a.masked_fill(~causal, float("-inf"))
        m = a.amax(-1)  # (B, H, Q)
        if mx is not None:
            carried = mx[..., None] + lam  # (B, H, Q) log-weight of the incoming state
            m = torch.maximum(m, carried)
        s_t = torch.exp(a - m[..., None]) @ k  # (B, H, Q, hs)
        if mx is not None:
            s_t = s_t + torch.exp(carried - m)[..., None] * s[:, :, None]
        keys.append(l2_normalize(s_t, eps * torch.exp(-m)[..., None]).transpose(1, 2))
        s, mx = s_t[:, :, -1], m[..., -1]
    return torch.cat(keys, dim=1)  # (B, T, H, hs)

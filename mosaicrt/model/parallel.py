"""The differentiable full-sequence forward of MMv2, for training.

`MMv2.forward` runs the streaming `step` over a fresh state: it writes the stores in place, so
autograd cannot go through it. This path computes the same logits for whole sequences that start
at position 0, with no state and no in-place write: the key recurrence in its chunked parallel form
(mosaicrt.ops.gated_key_scan.reference), the look-ahead values by a shift, and each retrieval as
attention shifted by the memory's delay: causal for the LTM, banded to the window for the STM, with
the visible sets and the bandwidth of mosaicrt.ops.geometry. Tested equal to `MMv2.forward`
(tests/test_train.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mosaicrt.model.mmv2 import AssociativeMemory, MMv2
from mosaicrt.ops import geometry
from mosaicrt.ops.gated_key_scan.reference import l2_normalize, parallel_key_scan


def memory_forward(mem: AssociativeMemory, u: torch.Tensor) -> torch.Tensor:
    """One memory over whole sequences: u (B, T, d) -> y (B, T, H*hs)."""
    B, T, _ = u.shape
    H, hs = mem.H, mem.hs
    p = mem.transforms()
    k_raw = mem.key_proj(u).float().view(B, T, H, hs)
    log_g = mem.key_gate(u).float()
    log_lam = -mem.key_decay(u).float().abs()
    keys = parallel_key_scan(k_raw, log_g, log_lam, mem.eps)  # (B, T, H, hs)

    # Pair tau: key k_tau, value from v~_tau and v~_{tau+1} (v~_T = 0).
    v_raw = mem.value_proj(u).float().view(B, T, H, hs)
    v_next = F.pad(v_raw[:, 1:], (0, 0, 0, 0, 0, 1))
    gamma = p["gamma"][:, None]  # (H, 1)
    values = p["alpha_psi"][:, None] * l2_normalize(gamma * v_raw + (1 - gamma) * v_next, mem.eps)

    t = torch.arange(T, device=u.device)
    n = geometry.visible_count(t, mem.window, mem.delay)  # (T,)
    beta = geometry.bandwidth(n.float(), p["beta0"], p["beta1"], p["alpha"])  # (T, H)
    q = (keys * beta[None, :, :, None]).transpose(1, 2)  # (B, H, T, hs)
    y = shifted_retrieval(q, keys.transpose(1, 2), values.transpose(1, 2), mem.window, mem.delay)
    return y.transpose(1, 2).reshape(B, T, H * hs).to(u.dtype)


def shifted_retrieval(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int, delay: int
) -> torch.Tensor:
    """Query t over the pairs of its visible set [t - window + 1, t - delay] (the "shift trick" of
    the contract): shifted by the delay, query i = t - delay reads pairs j in [i - span + 1, i] with
    span = window - delay, plain causal attention when the span covers the sequence. Queries with
    nothing visible (t < delay) get 0. q (scaled), keys, values (B, H, T, hs) -> (B, H, T, hs)."""
    B, H, T, hs = q.shape
    L, span = T - delay, window - delay
    if L <= 0:
        return torch.zeros_like(q)
    q, keys, values = q[:, :, delay:], keys[:, :, :L], values[:, :, :L]
    if span >= L:
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0)
    else:
        y = banded_attention(q, keys, values, span)
    return torch.cat([q.new_zeros(B, H, delay, hs), y], dim=2)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int) -> torch.Tensor:
    """Query i reads keys j in [i - span + 1, i]. In blocks of `span` queries, each block reads its
    own block of keys and the one before (a zero block before the first, masked out), so the cost
    grows with L * span instead of L^2. q, k, v (B, H, L, hs) -> (B, H, L, hs)."""
    B, H, L, hs = q.shape
    nb = -(-L // span)  # query blocks
    pad = nb * span - L
    q_blocks = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, span, hs)
    k_blocks = F.pad(k, (0, 0, span, pad)).view(B, H, nb + 1, span, hs)
    v_blocks = F.pad(v, (0, 0, span, pad)).view(B, H, nb + 1, span, hs)
    k_pairs = torch.cat([k_blocks[:, :, :-1], k_blocks[:, :, 1:]], dim=3)  # (B, H, nb, 2span, hs)
    v_pairs = torch.cat([v_blocks[:, :, :-1], v_blocks[:, :, 1:]], dim=3)
    row = torch.arange(span, device=q.device)[:, None]  # query i = b * span + row
    col = torch.arange(2 * span, device=q.device)[None, :]  # key j = (b - 1) * span + col
    allowed = (col >= row + 1) & (col <= row + span)  # (span, 2span): i - span < j <= i
    first = torch.arange(nb, device=q.device)[:, None, None] == 0
    allowed = allowed & ~(first & (col < span))  # (nb, span, 2span)
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, float("-inf"))
    scores = q_blocks @ k_pairs.transpose(-1, -2) + bias  # (B, H, nb, span, 2span)
    y = torch.softmax(scores, dim=-1) @ v_pairs  # (B, H, nb, span, hs)
    return y.reshape(B, H, nb * span, hs)[:, :, :L]


def parallel_forward(model: MMv2, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of whole sequences ids (B, T) from position 0, differentiable."""
    x = model.embed_tokens(ids)  # (B, T, d)
    for layer in model.layers:
        u = layer.memory_norm(x)
        ys = [memory_forward(getattr(layer, mem), u) for mem in layer.memories]
        x = x + layer.out_proj(torch.cat(ys, dim=-1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.lm_head(model.norm(x))

"""The differentiable full-sequence forward of MMv2, for training.

`MMv2.forward` runs the streaming `step` over a fresh state: it writes the stores in place, so
autograd cannot go through it. This path computes the same logits for whole sequences that start
at position 0, with no state and no in-place write: the key recurrence in its chunked parallel form
(mosaicrt.ops.gated_key_scan.reference), the look-ahead values by a shift, and each retrieval as
masked attention of every query over every pair, with the visible sets and the bandwidth of
mosaicrt.ops.geometry. Tested equal to `MMv2.forward` (tests/test_train.py).
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
    visible = geometry.visible(t[:, None], t[None, :], mem.window, mem.delay)  # (T, T)
    # A row with nothing visible attends to pair 0 and is zeroed after: SDPA needs one key.
    allowed = visible | ((n == 0)[:, None] & (t == 0)[None, :])
    mask = torch.zeros(T, T, device=u.device).masked_fill(~allowed, float("-inf"))
    y = F.scaled_dot_product_attention(
        q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=1.0
    )  # (B, H, T, hs)
    y = y * (n > 0)[None, None, :, None]
    return y.transpose(1, 2).reshape(B, T, H * hs).to(u.dtype)


def parallel_forward(model: MMv2, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of whole sequences ids (B, T) from position 0, differentiable."""
    x = model.embed_tokens(ids)  # (B, T, d)
    for layer in model.layers:
        u = layer.memory_norm(x)
        ys = [memory_forward(getattr(layer, mem), u) for mem in layer.memories]
        x = x + layer.out_proj(torch.cat(ys, dim=-1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.lm_head(model.norm(x))

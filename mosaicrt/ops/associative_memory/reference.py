"""AssociativeMemory in torch, the reference model's retrieval: scores of the stored pairs and of
the chunk's new pairs side by side, one masked softmax over both."""

from __future__ import annotations

import torch

from mosaicrt.ops.associative_memory import SCALED_STORES
from mosaicrt.ops.geometry import bandwidth, visible, visible_count


def associative_memory(
    q: torch.Tensor,
    t: torch.Tensor,
    store_k: torch.Tensor,
    store_v: torch.Tensor,
    store_tau: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_tau: torch.Tensor,
    beta0: torch.Tensor,
    beta1: torch.Tensor,
    alpha: torch.Tensor,
    window: int,
    delay: int,
) -> torch.Tensor:
    """The op's contract with stores (B, N, H, hs) and store_tau (B, N); returns (B, C, H, hs)."""
    beta = bandwidth(visible_count(t, window, delay).float(), beta0, beta1, alpha)  # (B, C, H)
    qb = q * beta[..., None]  # (B, C, H, hs)
    scores = torch.cat(
        [
            torch.einsum("bchd,bnhd->bhcn", qb, store_k.float()),  # (B, H, C, N)
            torch.einsum("bchd,bjhd->bhcj", qb, new_k),  # (B, H, C, C)
        ],
        dim=-1,
    )
    tau = torch.cat([store_tau, new_tau], dim=1)  # (B, N + C)
    mask = visible(t[..., None], tau[:, None, :], window, delay)  # (B, C, N + C)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1)[:, None, :, None], probs, 0.0)  # empty S(t) -> y = 0
    n_old = store_k.shape[1]
    return torch.einsum("bhcn,bnhd->bchd", probs[..., :n_old], store_v.float()) + torch.einsum(
        "bhcj,bjhd->bchd", probs[..., n_old:], new_v
    )  # (B, C, H, hs)


def quantize_pairs(x: torch.Tensor, store: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (..., hs) -> `store` pairs (..., hs), int8 or float8_e4m3fn, and one fp32 scale per
    pair (...): max|x| / 127 (int8: x ~= q * scale within scale / 2) or max|x| / 448 (fp8: within
    2^-4 of each element, rounded to the nearest e4m3 value). An all-zero pair gets scale 0. The
    step graph emits the same arithmetic (export.builder) for the stores it writes."""
    scale = x.float().abs().amax(-1) / SCALED_STORES[store][1]  # (...)
    y = x.float() / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    if store == "int8":
        return torch.round(y).to(torch.int8), scale
    return y.to(torch.float8_e4m3fn), scale


def dequantize_pairs(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 pairs (..., hs) that int8 or fp8 pairs and their scales (...) stand for."""
    return q.float() * scale[..., None]

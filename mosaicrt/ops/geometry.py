"""The memory geometry of MMv2, written once from the contract (mmv2-model.md, eq. 6 and 10).

A memory is described by two numbers: its `window` and its `delay`. Pair tau is visible to the
query at position t when tau >= 0 and delay <= t - tau <= window - 1:
    STM: window h, delay 1   ->  S(t) = [t-h+1, t-1],  n_t = min(t, h-1)
    LTM: no window, delay m  ->  S(t) = [0, t-m],      n_t = max(0, t-m+1)
The STM keeps its pairs in a ring of h-1 slots (pair tau in slot tau mod (h-1)); the LTM keeps
every pair (slot tau), in blocks of a fixed number of pairs in the exported graph's state.

Every function takes torch tensors, numpy arrays or Python ints alike.
"""

from __future__ import annotations

import numpy as np
import torch

# "No window" as an int that survives TensorRT's int32 attributes (2**62 would read as 0).
NO_WINDOW = 2**31 - 1


def memory_window_delay(kind: str, stm_window: int, ltm_delay: int) -> tuple[int, int]:
    """(window, delay) of the STM or the LTM of a model with those config fields."""
    if kind == "stm":
        return stm_window, 1
    if kind == "ltm":
        return NO_WINDOW, ltm_delay
    raise ValueError(f"unknown memory {kind!r}: stm or ltm")


def has_window(window: int) -> bool:
    """A finite window: the memory keeps its pairs in a ring of window - 1 slots."""
    return window < NO_WINDOW


def visible(t, tau, window: int, delay: int):
    """Is pair tau in S(t)? (tau < 0 marks an empty slot and is never visible.)"""
    age = t - tau
    return (tau >= 0) & (age >= delay) & (age <= window - 1)


def visible_count(t, window: int, delay: int):
    """n_t = |S(t)| = max(0, min(t - delay + 1, window - delay))."""
    n = t - delay + 1
    if isinstance(n, torch.Tensor):
        return n.clamp(min=0, max=window - delay)
    return np.clip(n, 0, window - delay)


def bandwidth(n, beta0, beta1, alpha):
    """beta(n) = beta1 * n^alpha + beta0 (eq. 6); n (...,) counts, parameters (H,) -> (..., H)."""
    return beta1 * n[..., None] ** alpha + beta0


def ring_slot(tau, ring: int):
    """The slot of pair tau in a ring of `ring` slots."""
    return tau % ring


def ring_positions(last, ring: int, slots):
    """The pair each ring slot holds when `last` (...,) is the newest stored pair: the newest
    tau <= last with tau = slot mod ring, or -1 where there is none yet. slots: arange(ring)."""
    tau = last[..., None] - (last[..., None] - slots) % ring
    return (torch if isinstance(tau, torch.Tensor) else np).where(tau >= 0, tau, -1)


def readable_pairs(pos, chunk: int, delay: int) -> int:
    """How many leading LTM pairs some query of a chunk can read, over all rows: a row at
    position p has stored tau <= p-2, and its queries see tau <= p+C-1-delay. pos: (B,)
    positions, or the furthest of them as an int."""
    furthest = pos if isinstance(pos, int) else int(pos.max())
    return max(0, furthest + min(chunk - delay, -1))


def readable_blocks(pos, chunk: int, delay: int, block: int) -> int:
    """LTM blocks of `block` pairs that hold a pair some query of the chunk can read (>= 1)."""
    return max(1, -(-readable_pairs(pos, chunk, delay) // block))

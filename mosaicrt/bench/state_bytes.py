"""Bytes of a backend's decode state, read off the buffers it really allocates, by kind."""

from __future__ import annotations

from mosaicrt.model.state import memory_plan
from mosaicrt.runtime.backend import Backend

GROWTH = 1024  # tokens of capacity over which the LTM's growth is measured, at most


def weights_read_bytes(backend: Backend) -> int | None:
    """Bytes of weights a decode step reads (the embedding table aside), where the artifact
    recorded them (quantized weights); None: count parameters x the store dtype's size."""
    manifest = getattr(backend, "manifest", None)
    return manifest.get("weights_read_bytes") if manifest is not None else None


def measure_state(
    backend: Backend, batch: int, capacity: int, pool_blocks: int | None = None
) -> dict:
    """The state of `batch` x `capacity` tokens (its LTM pool of pool_blocks blocks, default
    static), and the LTM bytes per token it costs: measured on two real allocations a whole
    number of store blocks apart, and from the formula."""
    state = backend.state_bytes(backend.new_state(batch, capacity, pool_blocks))
    block = getattr(backend, "block", 1)  # the step graph's LTM grows in blocks of pairs
    low = 1 + block  # a state of c tokens holds c - 1 pairs
    span = block * max(1, GROWTH // block)
    limit = getattr(backend, "max_context", low + span)
    span = min(span, block * ((limit - low) // block))
    measured = None
    if span > 0:
        grown = backend.state_bytes(backend.new_state(1, low + span))["ltm"]
        measured = (grown - backend.state_bytes(backend.new_state(1, low))["ltm"]) / span
    formula = memory_plan(
        backend.config, capacity, batch, backend.store_dtype_name()
    ).ltm_bytes_per_token
    return {
        "ltm_store_bytes": state["ltm"],
        "stm_ring_bytes": state["stm"],
        "recurrence_bytes": state["recurrence"],
        "store_dtype": backend.store_dtype_name(),
        "ltm_bytes_per_token_measured": measured,
        "ltm_bytes_per_token_formula": formula,
        "ltm_bytes_per_token_ratio": measured / formula if formula and measured else None,
    }

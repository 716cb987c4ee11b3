"""Bytes of a backend's decode state, read off the buffers it really allocates, by kind."""

from __future__ import annotations

from mosaicrt.model.state import DecodeState, memory_plan
from mosaicrt.runtime.backend import Backend
from mosaicrt.runtime.graph_state import GraphState

GROWTH = 1024  # tokens of capacity over which the LTM's growth is measured, at most


def state_bytes(state) -> dict[str, int]:
    """{"ltm", "stm", "recurrence"} bytes of a DecodeState (torch) or GraphState (step graph)."""
    out = {"ltm": 0, "stm": 0, "recurrence": 0}
    if isinstance(state, DecodeState):
        for memories in state.memories:
            for kind, st in memories.items():
                out[kind] += st.keys.nbytes + st.vals.nbytes
                out["recurrence"] += sum(x.nbytes for x in (st.s, st.mx, st.k_pend, st.v_pend))
    elif isinstance(state, GraphState):
        for name, buffer in state.stores.items():
            out["ltm" if ".ltm." in name else "stm"] += buffer.nbytes
        out["recurrence"] = sum(buffer.nbytes for buffer in state.small.values())
    else:
        raise TypeError(f"no state layout known for {type(state).__name__}")
    return out


def store_dtype(backend: Backend) -> str:
    """The dtype the backend keeps its stores in."""
    manifest = getattr(backend, "manifest", None)
    if manifest is not None:
        return manifest["state_dtype"]["stores"]
    return str(backend.model.embed_tokens.weight.dtype).removeprefix("torch.")


def weights_read_bytes(backend: Backend) -> int | None:
    """Bytes of weights a decode step reads (the embedding table aside), where the artifact
    recorded them (quantized weights); None: count parameters x the store dtype's size."""
    manifest = getattr(backend, "manifest", None)
    return manifest.get("weights_read_bytes") if manifest is not None else None


def measure_state(backend: Backend, batch: int, capacity: int) -> dict:
    """The state of `batch` x `capacity` tokens, and the LTM bytes per token it costs: measured on
    two real allocations a whole number of store blocks apart, and from the formula."""
    state = state_bytes(backend.new_state(batch, capacity))
    block = getattr(backend, "block", 1)  # the step graph's LTM grows in blocks of pairs
    low = 1 + block  # a state of c tokens holds c - 1 pairs
    span = block * max(1, GROWTH // block)
    limit = getattr(backend, "max_context", low + span)
    span = min(span, block * ((limit - low) // block))
    measured = None
    if span > 0:
        grown = state_bytes(backend.new_state(1, low + span))["ltm"]
        measured = (grown - state_bytes(backend.new_state(1, low))["ltm"]) / span
    formula = memory_plan(backend.config, capacity, batch, store_dtype(backend)).ltm_bytes_per_token
    return {
        "ltm_store_bytes": state["ltm"],
        "stm_ring_bytes": state["stm"],
        "recurrence_bytes": state["recurrence"],
        "store_dtype": store_dtype(backend),
        "ltm_bytes_per_token_measured": measured,
        "ltm_bytes_per_token_formula": formula,
        "ltm_bytes_per_token_ratio": measured / formula if formula and measured else None,
    }

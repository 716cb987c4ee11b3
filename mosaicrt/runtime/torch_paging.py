"""Paging for the torch backend: its DecodeState keeps the LTM in a pool of blocks
(model.state, allocated with `block`), and the runtime's BlockTable (runtime.paging) says which
row holds which block. Before a step the rows get the blocks it fills, and the table is copied
to the state's device when it changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mosaicrt.model.config import ModelConfig
from mosaicrt.model.state import DecodeState
from mosaicrt.runtime.paging import BlockPool, BlockTable

SMALL = ("s", "mx", "k_pend", "v_pend")


def attach_pages(state: DecodeState, block: int) -> DecodeState:
    """Give a paged DecodeState its host bookkeeping, a BlockTable over its pool."""
    if state.blocks is not None:
        batch, per_row = state.blocks.shape
        pool = state.memories[0]["ltm"].keys.shape[0] - 1  # the last block is scratch
        state.pages = BlockTable(BlockPool(pool), batch, per_row, block)
        state.pages.mirror = state.blocks  # its copy on the state's device, every row
    return state


def release_pages(state: DecodeState, rows: torch.Tensor) -> None:
    """The LTM blocks of the rows in `rows` (B,) bool back to the pool."""
    if state.pages is not None:
        state.pages.release(np.flatnonzero(rows.numpy()))


def grow_pages(state: DecodeState, lengths: torch.Tensor) -> None:
    """Blocks for the pairs a step of `lengths` (B,) tokens completes, taken before it runs
    (OutOfBlocks leaves everything as it was); the device table follows, every row of it (the
    table may have changed in rows this step does not run, which later steps read)."""
    pages: BlockTable | None = state.pages
    if pages is None:
        return
    host = lengths.numpy()
    working = np.flatnonzero(host > 0)
    pages.grow(working, state.host_pos.numpy()[working] + host[working])
    root = pages.root  # a change may be in rows outside this step's: copy every row
    if root.take_changes():
        root.mirror.copy_(torch.from_numpy(root.table), non_blocking=True)


class TorchStatePaging:
    """The paging methods (runtime.backend.Backend) of a backend whose state is a paged
    DecodeState: it has `config` and `block`."""

    config: ModelConfig
    block: int

    def store_dtype_name(self) -> str:
        return str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")

    def block_table(self, state: DecodeState) -> BlockTable | None:
        return state.pages

    def state_bytes(self, state: DecodeState) -> dict[str, int]:
        out = {"ltm": 0, "stm": 0, "recurrence": 0}
        for memories in state.memories:
            for kind, st in memories.items():
                out[kind] += st.keys.nbytes + st.vals.nbytes
                out["recurrence"] += sum(x.nbytes for x in (st.s, st.mx, st.k_pend, st.v_pend))
        return out

    def snapshot(self, state: DecodeState, row: int) -> dict[str, Any]:
        """As graph_state.snapshot_row: of a ring (keys, vals (B, h-1, H, hs)) only the slots a
        pair has reached."""
        pos = int(state.host_pos[row])
        parts = {"pos": pos}
        for layer, memories in enumerate(state.memories):
            for memory, st in memories.items():
                fields = SMALL + (("keys", "vals") if st.blocks is None else ())
                for field in fields:
                    value = getattr(st, field)[row]
                    if field in ("keys", "vals"):
                        value = value[:pos]
                    parts[f"{layer}.{memory}.{field}"] = value.clone()
        return parts

    def restore(self, state: DecodeState, row: int, snapshot: dict[str, Any]) -> None:
        for name, value in snapshot.items():
            if name != "pos":
                layer, memory, field = name.split(".")
                target = getattr(state.memories[int(layer)][memory], field)[row]
                target[: len(value)] = value  # a ring's first slots; all of a recurrence
        state.pos[row] = snapshot["pos"]
        state.host_pos[row] = snapshot["pos"]

    def copy_block(
        self, state: DecodeState, source: int, target: int, pairs: int | None = None
    ) -> None:
        for memories in state.memories:  # the pool: (P + 1, S, H, hs)
            ltm = memories["ltm"]
            ltm.keys[target, :pairs] = ltm.keys[source, :pairs]
            ltm.vals[target, :pairs] = ltm.vals[source, :pairs]

"""The step graph's decode state and its bookkeeping, shared by the backends that run the exported
graph: numpy arrays for ONNX Runtime, torch CUDA tensors for TensorRT (the code below is written in
the operations both libraries share).

Per layer and memory, allocated once:
    s, mx, k_pend, v_pend   (B, nM*H, hs) / (B, nM*H): fed in, replaced by the present.* outputs
    STM ring                (B, H, h-1, hs): fed whole (constant size)
    LTM pool                (P, H, S, hs), blocks of S pairs shared by all rows (runtime.paging):
                            fed whole, with the block table's leading columns that hold
                            readable pairs (ltm_blocks, one table for every layer)
    int8/fp8 stores' scales the stores' shapes without hs, fp32, fed and written beside them
                            (fp8 pairs are held as their bits, in int8, as the graph has them)
The constant-size state of every layer is views of one buffer, so that a runner that writes the
present.* outputs into one buffer of the same layout (small_layout) hands them over in one copy.
Every layer's rings (keys and values) are views of one buffer, and so are the stores, so that
`write_new_pairs` puts the pairs a step completes (graph outputs) into all layers at once, in
place: two scatters per step instead of four per layer. (A run whose native retrieval writes them
itself, pairs_in_run, leaves nothing to write.) Each view starts on a 256-byte boundary
(TensorRT's alignment for bound addresses).

The positions live twice: `pos` in the state's library (fed to the graph) and `host_pos` in
numpy, kept in step with it, so that the bookkeeping (capacity, readable blocks, where the new
pairs go) reads no device memory: a decode step on the GPU makes no device-to-host copy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from mosaicrt.errors import BackendError, CapacityError
from mosaicrt.export import io_spec
from mosaicrt.model.config import DTYPE_BYTES, ModelConfig
from mosaicrt.ops import geometry
from mosaicrt.ops.associative_memory import SCALED_STORES
from mosaicrt.runtime.paging import BlockPool, BlockTable, blocks_for

ALIGN = 256  # bytes: TensorRT wants every bound address aligned to this
# A runner's output holding every new.{l}.{keys,values} already stacked, (L*2, B, C, nM*H, hs),
# and for scaled stores every new.{l}.{keys,values}_scale, (L*2, B, C, nM*H).
STACKED_NEW_PAIRS = "new.stacked"
STACKED_NEW_SCALES = "new.stacked_scale"
# A runner's output holding every present.* in one buffer laid out as GraphState.small_block.
STACKED_PRESENT = "present.stacked"
# A decode step on device tensors with at most this many pairs writes them row by row (beyond,
# one scatter kernel beats a copy per row); numpy states always do (write_new_pairs).
FEW_ROWS = 4
KEPT_VIEWS = 4  # views of row ranges a state keeps (GraphState.view)


@dataclass
class GraphState:
    pos: Any  # (B,) int64, tokens consumed per row
    small: dict[str, Any]  # past.{l}.{s,mx,k_pend,v_pend}
    stores: dict[str, Any]  # past.{l}.{M}.{keys,values}[_scale]: views of `pairs` and `scales`
    # per memory, layer-major, keys then values: "stm" (L*2, B, H, h-1, hs), "ltm" (L*2, P, H,
    # S, hs) the pool
    pairs: dict[str, Any]
    capacity: int
    host_pos: np.ndarray  # (B,) int64, pos on the host (pos itself for a numpy state)
    scales: dict[str, Any] = dataclasses.field(default_factory=dict)  # int8/fp8: pairs w/o hs
    small_block: Any = None  # the one buffer `small` views (None for a view of some rows)
    blocks: BlockTable | None = None  # the LTM block table (None without an LTM)
    # The last few views of row ranges, by range: a step on the same rows gets the same buffers
    # (a runner keeps them bound).
    views: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def buffers(self) -> dict[str, Any]:
        """The state's own buffers by input name, as every step feeds them: recurrences, pending
        pairs, rings and pools whole (the same mapping of the same arrays, step after step)."""
        return self.small | self.stores

    @functools.cached_property
    def stores_in_place(self) -> bool:
        """Every store is contiguous, so a runner binds it by address, not as a copy: what a
        kernel writes into it lands in the state."""
        return all(
            x.is_contiguous() if isinstance(x, torch.Tensor) else x.flags.c_contiguous
            for x in self.stores.values()
        )

    def store_feeds(self, blocks: int, to_state: Callable[[np.ndarray], Any]) -> dict[str, Any]:
        """The stores as a step feeds them: rings and pools whole, and the block table's
        leading `blocks` columns (to_state: into the state's library)."""
        return self.stores | self.table_feed(blocks, to_state)

    def table_feed(self, blocks: int, to_state: Callable[[np.ndarray], Any]) -> dict[str, Any]:
        """The block table's leading `blocks` columns by input name (none without an LTM)."""
        if self.blocks is None:
            return {}
        return {io_spec.LTM_BLOCKS: to_state(self.blocks.feed(blocks))}

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def view(self, rows: slice) -> GraphState:
        """The state of a range of rows, as views: a step on it updates this state in place
        (the LTM pool is shared whole; the rings and the block table are sliced). The same
        range gives the same view while it is among the last KEPT_VIEWS asked for."""
        key = (rows.start, rows.stop, rows.step)
        found = self.views.pop(key, None) or self.rows_view(rows)
        self.views[key] = found  # the newest last
        if len(self.views) > KEPT_VIEWS:
            self.views.pop(next(iter(self.views)))
        return found

    def rows_view(self, rows: slice) -> GraphState:
        pos = self.pos[rows]

        def rows_of(mem: str, x: Any, axis: int) -> Any:
            return x[(slice(None),) * axis + (rows,)] if mem == "stm" else x

        return GraphState(
            pos=pos,
            small={k: v[rows] for k, v in self.small.items()},
            stores={
                k: rows_of("stm" if ".stm." in k else "ltm", v, 0) for k, v in self.stores.items()
            },
            pairs={k: rows_of(k, v, 1) for k, v in self.pairs.items()},
            capacity=self.capacity,
            host_pos=pos if self.host_pos is self.pos else self.host_pos[rows],
            scales={k: rows_of(k, v, 1) for k, v in self.scales.items()},
            blocks=self.blocks.view(rows) if self.blocks is not None else None,
        )


def allocate(
    config: ModelConfig,
    batch: int,
    capacity: int,
    block: int,
    full: Callable[[tuple, float, bool], Any],
    pos: Any,
    store_dtype: str = "float32",
    pool_blocks: int | None = None,
) -> GraphState:
    """A fresh state; full(shape, value, is_store) makes a buffer (fp32 unless a store). int8
    and fp8 stores get their fp32 scales beside them. The LTM pool holds pool_blocks blocks
    (default: enough for every row at `capacity`, a static allocation)."""
    H, hs = config.num_heads, config.head_dim
    max_blocks = blocks_for(capacity, block)
    total = pool_blocks if pool_blocks is not None else batch * max_blocks
    stores, pairs, scales = {}, {}, {}
    small_block, small = carve(full, small_layout(config, batch, "past"))
    for name, buffer in small.items():
        buffer[...] = float("-inf") if name.endswith(".mx") else 0.0
    fields = io_spec.STORE_FIELDS
    for memory in config.memories:
        rows, slots = (batch, config.stm_window - 1) if memory == "stm" else (max(total, 1), block)
        shape = (config.num_layers * len(fields), rows, H, slots, hs)
        pairs[memory] = aligned_views(full, shape, DTYPE_BYTES[store_dtype])
        if store_dtype in SCALED_STORES:
            scales[memory] = aligned_views(full, shape[:-1], 4, is_store=False)
        for layer in range(config.num_layers):
            for i, field in enumerate(fields):
                name = io_spec.store_name(layer, memory, field)
                stores[name] = pairs[memory][layer * len(fields) + i]
                if memory in scales:
                    stores[name + io_spec.SCALE_SUFFIX] = scales[memory][layer * len(fields) + i]
    host_pos = pos if isinstance(pos, np.ndarray) else np.zeros(batch, np.int64)
    table = BlockTable(BlockPool(total), batch, max_blocks, block) if config.use_ltm else None
    return GraphState(pos, small, stores, pairs, capacity, host_pos, scales, small_block, table)


def small_layout(config: ModelConfig, batch: int, kind: str) -> list[tuple[str, tuple]]:
    """(name, shape) of every past.* (kind "past") or present.* tensor, in one fixed order."""
    heads, hs = config.num_heads * len(config.memories), config.head_dim
    return [
        (
            io_spec.small_name(kind, layer, field),
            (batch, heads) if field == "mx" else (batch, heads, hs),
        )
        for layer in range(config.num_layers)
        for field in io_spec.SMALL_FIELDS
    ]


def carve(full: Callable, layout: list[tuple[str, tuple]]) -> tuple[Any, dict[str, Any]]:
    """One fp32 buffer and views of it of the layout's shapes, each starting on an ALIGN-byte
    boundary: the same layout in two buffers makes the same offsets."""
    unit = ALIGN // 4
    sizes = [-(-int(np.prod(shape)) // unit) * unit for _, shape in layout]
    raw = full((sum(sizes) + unit,), 0.0, False)
    start = (-address(raw) % ALIGN) // 4
    block = raw[start : start + sum(sizes)]
    views, offset = {}, 0
    for (name, shape), size in zip(layout, sizes):
        views[name] = block[offset : offset + int(np.prod(shape))].reshape(shape)
        offset += size
    return block, views


def address(x: Any) -> int:
    return x.data_ptr() if isinstance(x, torch.Tensor) else x.ctypes.data


def aligned_views(
    full: Callable, shape: tuple, elem: int, value: float = 0.0, is_store: bool = True
) -> Any:
    """A (K, ...) array filled with `value` whose K sub-arrays each start on an ALIGN-byte
    boundary: one flat buffer, the first sub-array at an aligned address, the others a padded
    stride apart."""
    rows, numel = shape[0], int(np.prod(shape[1:]))
    unit = ALIGN // elem
    stride = -(-numel // unit) * unit
    flat = full((rows * stride + unit,), value, is_store)
    start = (-address(flat) % ALIGN) // elem
    strides = (stride,) + tuple(int(np.prod(shape[i + 1 :])) for i in range(1, len(shape)))
    if isinstance(flat, torch.Tensor):
        return flat[start:].as_strided(shape, strides)
    return np.lib.stride_tricks.as_strided(flat[start:], shape, [s * elem for s in strides])


def first_nonfinite_layer(state: GraphState, row: int) -> int | None:
    """The first layer whose constant-size state in `row` holds NaN or inf (present.* of the
    last step; mx is -inf by design before a sequence's first token)."""
    layers = sorted({int(name.split(".")[1]) for name in state.small})
    for layer in layers:
        for field in ("s", "k_pend", "v_pend"):
            values = state.small[f"past.{layer}.{field}"][row]
            finite = values.isfinite() if isinstance(values, torch.Tensor) else np.isfinite(values)
            if not bool(finite.all()):
                return layer
    return None


def reset_rows(state: GraphState, rows: Any, host_rows: np.ndarray) -> None:
    """Forget the sequences in `rows` (B,) bool (host_rows: the same mask in numpy): their LTM
    blocks go back to the pool; rings stay (positions guard them)."""
    if state.blocks is not None:
        state.blocks.release(np.flatnonzero(host_rows))
    state.pos[rows] = 0
    state.host_pos[host_rows] = 0
    for name, array in state.small.items():
        array[rows] = float("-inf") if name.endswith(".mx") else 0.0


def snapshot_row(state: GraphState, row: int) -> dict[str, Any]:
    """Copies of one row's constant-size state (recurrences, pending pairs, STM rings and their
    scales) and its position. Of a ring only the slots a pair has reached: min(pos, ring) (a
    short prefix's are a few of its h-1; the others hold no pair of this row, and its position
    keeps them unread, geometry.ring_positions)."""
    pos = int(state.host_pos[row])
    parts = {name: array[row] for name, array in state.small.items()}
    for kind, buffers in (("pairs", state.pairs), ("scales", state.scales)):
        if "stm" in buffers:  # (L*2, B, H, ring[, hs]); scales: int8, fp8 stores
            ring = buffers["stm"].shape[3]
            parts[f"{kind}.stm"] = buffers["stm"][:, row, :, : min(pos, ring)]
    copies = {k: v.clone() if isinstance(v, torch.Tensor) else v.copy() for k, v in parts.items()}
    return copies | {"pos": pos}


def restore_row(state: GraphState, row: int, snapshot: dict[str, Any]) -> None:
    """Put a snapshot_row back into `row` (its LTM blocks are the block table's business)."""
    for name, array in state.small.items():
        array[row] = snapshot[name]
    for kind, buffers in (("pairs", state.pairs), ("scales", state.scales)):
        if f"{kind}.stm" in snapshot:
            slots = snapshot[f"{kind}.stm"].shape[2]  # (L*2, H, slots[, hs])
            buffers["stm"][:, row, :, :slots] = snapshot[f"{kind}.stm"]
    state.pos[row] = snapshot["pos"]
    state.host_pos[row] = snapshot["pos"]


def copy_block(state: GraphState, source: int, target: int, pairs: int | None = None) -> None:
    """LTM pool block `source` into block `target`, every layer, keys, values (and scales):
    its first `pairs` slots (None: all)."""
    for buffers in (state.pairs, state.scales):
        if "ltm" in buffers:  # (L*2, P, H, S[, hs])
            buffers["ltm"][:, target, :, :pairs] = buffers["ltm"][:, source, :, :pairs]


class GraphStatePaging:
    """The paging methods (runtime.backend.Backend) of a backend whose state is a GraphState:
    it has `config`, `block` (pairs per LTM block) and `manifest` (the artifact's)."""

    config: ModelConfig
    block: int
    manifest: dict

    def store_dtype_name(self) -> str:
        return self.manifest["state_dtype"]["stores"]

    def block_table(self, state: GraphState) -> BlockTable | None:
        return state.blocks

    def state_bytes(self, state: GraphState) -> dict[str, int]:
        out = {"ltm": 0, "stm": 0}
        for name, buffer in state.stores.items():
            out["ltm" if ".ltm." in name else "stm"] += buffer.nbytes
        return out | {"recurrence": sum(buffer.nbytes for buffer in state.small.values())}

    def snapshot(self, state: GraphState, row: int) -> dict[str, Any]:
        return snapshot_row(state, row)

    def restore(self, state: GraphState, row: int, snapshot: dict[str, Any]) -> None:
        restore_row(state, row, snapshot)

    def copy_block(
        self, state: GraphState, source: int, target: int, pairs: int | None = None
    ) -> None:
        copy_block(state, source, target, pairs)


def reference_rows(store: torch.Tensor, table: np.ndarray | None, memory: str) -> torch.Tensor:
    """A store as the graph is fed it, in the reference model's layout (B, N, H, hs): an STM
    ring (B, H, h-1, hs), or an LTM pool (P, H, S, hs) read through the block table (B, NB)."""
    if memory == "stm":
        return store.permute(0, 2, 1, 3)
    blocks = store[torch.from_numpy(table)]  # (B, NB, H, S, hs)
    return blocks.permute(0, 1, 3, 2, 4).flatten(1, 2)  # (B, NB*S, H, hs)


def write_new_pairs(
    config: ModelConfig,
    block: int,
    state: GraphState,
    new_pairs: Callable[[int, str], Any],
    host_lengths: np.ndarray,
    chunk: int,
    to_state: Callable[[np.ndarray], Any],
    stacked: Any = None,
    stacked_scales: Any = None,
) -> None:
    """Store the pairs a step completed (before the positions advance): pair j of row b is
    tau = pos_b - 1 + j. new_pairs(layer, field) is the graph's (B, C, nM*H, hs) output, or
    `stacked` holds them all already, (L*2, B, C, nM*H, hs) in the order of GraphState.pairs;
    scaled stores' scales likewise (field keys_scale / values_scale, or `stacked_scales`).
    Where each pair goes is worked out on the host; to_state moves those indices to the state."""
    S, H, ring = block, config.num_heads, config.stm_window - 1
    if chunk == 1:  # decode: pair pos-1 of every row with a token past its first
        rows = np.flatnonzero((host_lengths > 0) & (state.host_pos >= 1))
        if len(rows) == 0:
            return
        # numpy copies a row's pairs faster than it scatters them: 1.6x at batch 8 and at 64.
        if len(rows) <= FEW_ROWS or state.pos is state.host_pos:
            sources = new_pair_sources(config, state, new_pairs, stacked, stacked_scales)
            write_decode_pairs(config, S, state, rows, sources)
            return
    j = np.arange(chunk)[None, :]
    tau = state.host_pos[:, None] - 1 + j  # (B, C)
    ok = (j < host_lengths[:, None]) & (tau >= 0)
    newest = (state.host_pos + host_lengths - 2)[:, None]
    rows = {"ltm": np.nonzero(ok), "stm": np.nonzero(ok & (tau > newest - ring))}  # ring: h-1
    if not any(len(b) for b, _ in rows.values()):
        return  # no pair completed (rows of length 0, or the first token)
    sources = new_pair_sources(config, state, new_pairs, stacked, stacked_scales)
    table = state.blocks.table if state.blocks is not None else None
    for i, memory in enumerate(config.memories):
        b, c = rows[memory]
        t = tau[b, c]  # (n,)
        if memory == "stm":
            where, slot = b, geometry.ring_slot(t, ring)  # the row's ring
        else:
            where, slot = table[b, t // S], t % S  # the pool block holding pair t
        c, where, slot = map(to_state, (c, where, slot))
        b = to_state(b)
        for destination, new in sources:
            # Advanced indices split by a slice go first: both sides are (n, L*2, H[, hs]).
            pairs = new[:, b, c, i * H : (i + 1) * H]  # (L*2, n, H[, hs])
            destination[memory][:, where, :, slot] = pairs.swapaxes(0, 1)


def new_pair_sources(config, state, new_pairs, stacked, stacked_scales) -> list[tuple]:
    """(destination buffers by memory, the stacked new pairs) for the pairs and, with int8 or
    fp8 stores, their scales."""
    if stacked is None:
        stacked = stack_new(config, new_pairs, "")
    sources = [(state.pairs, stacked)]
    if state.scales:
        if stacked_scales is None:
            stacked_scales = stack_new(config, new_pairs, io_spec.SCALE_SUFFIX)
        sources.append((state.scales, stacked_scales))
    return sources


def write_decode_pairs(
    config: ModelConfig, block: int, state: GraphState, rows: np.ndarray, sources: list[tuple]
) -> None:
    """A decode step's pair (tau = pos-1) of each of a few rows, written with plain slices."""
    H, ring = config.num_heads, config.stm_window - 1
    table = state.blocks.table if state.blocks is not None else None
    for b in rows.tolist():
        t = int(state.host_pos[b]) - 1
        for i, memory in enumerate(config.memories):
            if memory == "stm":
                where = b, geometry.ring_slot(t, ring)
            else:
                where = int(table[b, t // block]), t % block
            for destination, new in sources:
                destination[memory][:, where[0], :, where[1]] = new[:, b, 0, i * H : (i + 1) * H]


def stack_new(config: ModelConfig, new_pairs: Callable[[int, str], Any], suffix: str) -> Any:
    """Every layer's new pairs (or their scales, suffix _scale) as one (L*2, B, C, nM*H[, hs])
    array, in the order of GraphState.pairs."""
    parts = [
        new_pairs(layer, field + suffix)
        for layer in range(config.num_layers)
        for field in io_spec.STORE_FIELDS
    ]
    return (torch if isinstance(parts[0], torch.Tensor) else np).stack(parts)


def keep_present(state: GraphState, outputs: Mapping[str, Any]) -> None:
    """A run's present state (its present.* outputs) into the state's past buffers."""
    present = outputs.get(STACKED_PRESENT)
    if state.small_block is not None and present is not None:
        state.small_block[...] = present  # every present.* at once (the same layout)
        return
    for name, buffer in state.small.items():
        buffer[...] = outputs["present" + name[len("past") :]]  # (B, nM*H, hs)


def graph_step(
    config: ModelConfig,
    block: int,
    state: GraphState,
    ids: Any,
    host_lengths: np.ndarray,
    last_only: bool,
    last_only_graph: bool,
    run: Callable[[dict[str, Any]], dict[str, Any]],
    to_state: Callable[[np.ndarray], Any],
    pairs_in_run: bool = False,
    present_in_run: bool = False,
) -> Any:
    """One step of the exported graph over `state`, in place: feed the state (the LTM store's
    readable blocks only, as a view), run, keep the present state and store the new pairs.
    ids (B, C) int64 in the state's library, host_lengths (B,) int64 numpy; to_state moves a
    numpy array to the state's library (and device); run(feeds) -> outputs by name, where
    feeds.maps is (this step's inputs, the state's `buffers`: the same mapping every step).
    pairs_in_run: the run writes the new pairs into the stores itself (the native ONNX Runtime
    retrieval, ort_library.APPEND_PAIRS); it is then fed the block table's columns up to the
    newest pair's block. present_in_run: the run writes the present state over the past
    itself (the fused native layers, bound in place). Returns (B, V) logits with last_only,
    else (B, C, V). Reads nothing back from the state's device."""
    lengths = to_state(host_lengths)
    # The rows' numbers as plain ints: right after a step has read the weights through the
    # caches, each numpy call on these few numbers costs tens of microseconds.
    starts, counts = state.host_pos.tolist(), host_lengths.tolist()  # (B,) each
    ends = [start + n for start, n in zip(starts, counts)]  # tokens each row will have seen
    if max(ends) > state.capacity:
        raise CapacityError(
            f"a sequence would reach {max(ends)} tokens but the state holds {state.capacity}: "
            "raise --max-context"
        )
    if not last_only and last_only_graph:
        raise BackendError(
            "this model returns last-position logits only (exported with --last-only): "
            "re-export it without --last-only to score every position"
        )
    if state.blocks is not None and not state.blocks.holds(ends):  # blocks for the new pairs
        working = [row for row, n in enumerate(counts) if n > 0]
        state.blocks.grow(working, [ends[row] for row in working])
    nb = geometry.readable_blocks(max(starts), ids.shape[1], config.ltm_delay, block)
    if pairs_in_run and state.blocks is not None:  # the blocks the new pairs go to, too
        nb = max(nb, *state.blocks.count.tolist())
    step_feeds = {io_spec.INPUT_IDS: ids, io_spec.LENGTHS: lengths, io_spec.POSITIONS: state.pos}
    step_feeds |= state.table_feed(nb, to_state)
    # This step's inputs in front of the state's buffers: a runner may bind those once a state.
    outputs = run(ChainMap(step_feeds, state.buffers))
    if not present_in_run:
        keep_present(state, outputs)
    if not pairs_in_run:
        write_new_pairs(
            config,
            block,
            state,
            lambda layer, field: outputs[io_spec.new_pairs_name(layer, field)],
            host_lengths,
            ids.shape[1],
            to_state,
            outputs.get(STACKED_NEW_PAIRS),
            outputs.get(STACKED_NEW_SCALES),
        )
    state.host_pos[...] = ends  # (a list: cheaper than a numpy add here)
    if state.pos is not state.host_pos:  # the device's copy
        state.pos += lengths
    logits = outputs[io_spec.LOGITS]
    if last_only and not last_only_graph:
        logits = logits[
            to_state(np.arange(len(host_lengths))), to_state((host_lengths - 1).clip(0))
        ]
    return logits

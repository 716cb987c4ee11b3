"""Streaming decode state: every buffer a sequence needs between steps, allocated once.

Per layer and memory (STM, LTM), per sequence (contract, "Decoding state"):
  s, mx      the key recurrence, log-space stabilised: k_bar = exp(mx) * s  (H, hs) + (H,) fp32
  k_pend     the unit key k_{t-1}, whose value is not known yet                       (H, hs) fp32
  v_pend     the raw value projection v~_{t-1}, needed to finish v_{t-1}              (H, hs) fp32
  keys/vals  completed pairs: STM a ring of h-1 slots (pair tau in slot tau mod (h-1)),
             LTM a store of `capacity` slots (pair tau in slot tau)                   (N, H, hs)
Plus one position per sequence: the number of tokens it has consumed.
Stores are written in place by the step; nothing here is reallocated after `allocate`.

A paged state (allocate with `block`) keeps every sequence's LTM in one pool of blocks of S
pairs instead, keys/vals (P + 1, S, H, hs), read and written through a block table (B, NB):
pair tau of row b is in slot tau mod S of block blocks[b, tau // S]. Block P is scratch, where
rows with no pair to store write, so that a decode step writes without a host sync. Who holds
which block is the runtime's business (mosaicrt.runtime.paging); the model only follows the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaicrt.model.config import (
    DTYPE_BYTES,
    STORE_DTYPE_ALIASES,
    ModelConfig,
    normalize_dtype,
    parameter_count,
)
from mosaicrt.ops.associative_memory import SCALED_STORES


@dataclass
class MemoryState:
    """State of one memory (STM or LTM) of one layer, for a batch of B sequences."""

    s: torch.Tensor  # (B, H, hs) fp32, stabilised key recurrence
    mx: torch.Tensor  # (B, H) fp32, running max of the log-weights (-inf before the first token)
    k_pend: torch.Tensor  # (B, H, hs) fp32
    v_pend: torch.Tensor  # (B, H, hs) fp32
    keys: torch.Tensor  # (B, N, H, hs) store dtype; paged: the pool (P + 1, S, H, hs)
    vals: torch.Tensor
    blocks: torch.Tensor | None = None  # paged: (B, NB) int64 block table, else None

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> MemoryState:
        H, hs = config.num_heads, config.head_dim
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            s=torch.zeros(batch, H, hs, **f32),
            mx=torch.full((batch, H), float("-inf"), **f32),
            k_pend=torch.zeros(batch, H, hs, **f32),
            v_pend=torch.zeros(batch, H, hs, **f32),
            keys=torch.zeros(batch, slots, H, hs, dtype=dtype, device=device),
            vals=torch.zeros(batch, slots, H, hs, dtype=dtype, device=device),
        )

    def view(self, rows: slice) -> MemoryState:
        """The state of a range of rows, as views (a pool is shared whole)."""
        fields = [getattr(self, f)[rows] for f in ("s", "mx", "k_pend", "v_pend")]
        if self.blocks is not None:
            return MemoryState(*fields, self.keys, self.vals, self.blocks[rows])
        return MemoryState(*fields, self.keys[rows], self.vals[rows])

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the sequences in `rows` (B,) bool; stores stay (positions guard them)."""
        self.s[rows] = 0.0
        self.mx[rows] = float("-inf")
        self.k_pend[rows] = 0.0
        self.v_pend[rows] = 0.0


@dataclass
class DecodeState:
    """The streaming state of a batch: a position per sequence and a MemoryState per memory."""

    pos: torch.Tensor  # (B,) int64, tokens consumed so far
    memories: list[dict[str, MemoryState]]  # per layer: {"stm": ..., "ltm": ...}
    capacity: int  # most tokens one sequence may consume
    host_pos: torch.Tensor  # (B,) int64 on the CPU: pos, kept in step by whoever advances it
    blocks: torch.Tensor | None = None  # paged: the LTM block table (B, NB), every layer's
    pages: object | None = None  # paged: the runtime's bookkeeping of that table

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block: int | None = None,
        pool_blocks: int | None = None,
    ) -> DecodeState:
        """Flat stores (block None), or the LTM paged in blocks of `block` pairs: a pool of
        pool_blocks blocks (default: every row at capacity) and a scratch block."""
        slots = {"stm": config.stm_window - 1, "ltm": max(capacity - 1, 1)}
        memories = [
            {
                mem: MemoryState.allocate(config, batch, slots[mem], dtype, device)
                for mem in config.memories
                if mem == "stm" or block is None
            }
            for _ in range(config.num_layers)
        ]
        table = None
        if block is not None and config.use_ltm:
            per_row = -(-max(capacity - 1, 1) // block)
            pool = (batch * per_row if pool_blocks is None else pool_blocks) + 1  # + scratch
            table = torch.zeros(batch, per_row, dtype=torch.int64, device=device)
            H, hs = config.num_heads, config.head_dim
            for layer in memories:
                ltm = MemoryState.allocate(config, batch, 1, dtype, device)
                ltm.keys = torch.zeros(pool, block, H, hs, dtype=dtype, device=device)
                ltm.vals = torch.zeros(pool, block, H, hs, dtype=dtype, device=device)
                ltm.blocks = table
                layer["ltm"] = ltm
        return cls(
            pos=torch.zeros(batch, dtype=torch.int64, device=device),
            memories=memories,
            capacity=capacity,
            host_pos=torch.zeros(batch, dtype=torch.int64),
            blocks=table,
        )

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def view(self, rows: slice) -> DecodeState:
        """The state of a range of rows, as views: a step on it updates this state in place."""
        memories = [{m: st.view(rows) for m, st in layer.items()} for layer in self.memories]
        blocks = self.blocks[rows] if self.blocks is not None else None
        pages = self.pages.view(rows) if self.pages is not None else None
        return DecodeState(
            self.pos[rows], memories, self.capacity, self.host_pos[rows], blocks, pages
        )

    def reset(self, rows: torch.Tensor) -> None:
        """Free the sequences in `rows` (B,) bool (on the CPU) so new requests can use them."""
        self.host_pos[rows.cpu()] = 0
        rows = rows.to(self.pos.device)
        self.pos[rows] = 0
        for layer in self.memories:
            for mem in layer.values():
                mem.reset(rows)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of decode state, by the contract's formulas."""

    ltm_bytes_per_token: int  # per sequence, grows with context
    stm_bytes_per_sequence: int  # the h-1 pair rings, constant
    recurrence_bytes_per_sequence: int  # s, mx, k_pend, v_pend (fp32), constant
    max_context: int
    max_batch: int

    @property
    def bytes_per_sequence(self) -> int:
        # The LTM store has max_context - 1 slots: the newest token's pair is still pending.
        return (
            self.ltm_bytes_per_token * max(self.max_context - 1, 1)
            + self.stm_bytes_per_sequence
            + self.recurrence_bytes_per_sequence
        )

    @property
    def state_bytes(self) -> int:
        return self.bytes_per_sequence * self.max_batch


def pair_bytes(config: ModelConfig, store_dtype: str) -> int:
    """Bytes of one stored (key, value) pair of one memory, every head: int8 and fp8 stores keep
    an fp32 scale per head beside each key and each value."""
    width = config.memory_width
    if store_dtype in SCALED_STORES:
        return 2 * (width + 4 * config.num_heads)
    return 2 * width * DTYPE_BYTES[store_dtype]


def memory_plan(
    config: ModelConfig, max_context: int, max_batch: int, store_dtype: str | None = None
) -> MemoryPlan:
    """State sizes of `max_batch` sequences of up to `max_context` tokens, stores in store_dtype."""
    layers = config.num_layers
    pair = pair_bytes(config, store_dtype or config.torch_dtype)  # one pair of one memory
    recurrence = len(config.memories) * layers * (3 * config.memory_width + config.num_heads) * 4
    return MemoryPlan(
        ltm_bytes_per_token=pair * layers if config.use_ltm else 0,
        stm_bytes_per_sequence=pair * layers * (config.stm_window - 1),
        recurrence_bytes_per_sequence=recurrence,
        max_context=max_context,
        max_batch=max_batch,
    )


def inspect_report(
    config: ModelConfig, max_context: int, max_batch: int, store_dtype: str | None = None
) -> dict:
    """What `mosaicrt inspect` shows: the config, the parameter count and the memory plan."""
    store_dtype = STORE_DTYPE_ALIASES.get(store_dtype, store_dtype) if store_dtype else None
    if store_dtype not in SCALED_STORES:  # int8, fp8: stores of ONNX artifacts, with scales
        store_dtype = normalize_dtype(store_dtype) if store_dtype else config.torch_dtype
    plan = memory_plan(config, max_context, max_batch, store_dtype)
    return {
        "config": config.to_dict(),
        "parameters": parameter_count(config),
        "memory_plan": {
            "store_dtype": store_dtype,
            "max_context": max_context,
            "max_batch": max_batch,
            "ltm_bytes_per_token": plan.ltm_bytes_per_token,
            "stm_bytes_per_sequence": plan.stm_bytes_per_sequence,
            "recurrence_bytes_per_sequence": plan.recurrence_bytes_per_sequence,
            "bytes_per_sequence": plan.bytes_per_sequence,
            "state_bytes": plan.state_bytes,
        },
    }


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""

"""Streaming decode state: every buffer a sequence needs between steps, allocated once.

Per layer and memory (STM, LTM), per sequence (contract, "Decoding state"):
  s, mx      the key recurrence, log-space stabilised: k_bar = exp(mx) * s  (H, hs) + (H,) fp32
  k_pend     the unit key k_{t-1}, whose value is not known yet                       (H, hs) fp32
  v_pend     the raw value projection v~_{t-1}, needed to finish v_{t-1}              (H, hs) fp32
  keys/vals  completed pairs: STM a ring of h-1 slots (pair tau in slot tau mod (h-1)),
             LTM a store of `capacity` slots (pair tau in slot tau)                   (N, H, hs)
Plus one position per sequence: the number of tokens it has consumed.
Stores are written in place by the step; nothing here is reallocated after `allocate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaicrt.model.config import DTYPE_BYTES, ModelConfig, normalize_dtype, parameter_count


@dataclass
class MemoryState:
    """State of one memory (STM or LTM) of one layer, for a batch of B sequences."""

    s: torch.Tensor  # (B, H, hs) fp32, stabilised key recurrence
    mx: torch.Tensor  # (B, H) fp32, running max of the log-weights (-inf before the first token)
    k_pend: torch.Tensor  # (B, H, hs) fp32
    v_pend: torch.Tensor  # (B, H, hs) fp32
    keys: torch.Tensor  # (B, N, H, hs) store dtype
    vals: torch.Tensor  # (B, N, H, hs) store dtype

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

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the sequences in `rows` (B,) bool; stores stay (positions guard them)."""
        self.s[rows] = 0.0
        self.mx[rows] = float("-inf")
        self.k_pend[rows] = 0.0
        self.v_pend[rows] = 0.0


MEMORY_FIELDS = ("s", "mx", "k_pend", "v_pend", "keys", "vals")


@dataclass
class DecodeState:
    """The streaming state of a batch: a position per sequence and a MemoryState per memory."""

    pos: torch.Tensor  # (B,) int64, tokens consumed so far
    memories: list[dict[str, MemoryState]]  # per layer: {"stm": ..., "ltm": ...}
    capacity: int  # most tokens one sequence may consume
    host_pos: torch.Tensor  # (B,) int64 on the CPU: pos, kept in step by whoever advances it

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> DecodeState:
        slots = {"stm": config.stm_window - 1, "ltm": max(capacity - 1, 1)}
        memories = [
            {
                mem: MemoryState.allocate(config, batch, slots[mem], dtype, device)
                for mem in config.memories
            }
            for _ in range(config.num_layers)
        ]
        return cls(
            pos=torch.zeros(batch, dtype=torch.int64, device=device),
            memories=memories,
            capacity=capacity,
            host_pos=torch.zeros(batch, dtype=torch.int64),
        )

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def view(self, rows: slice) -> DecodeState:
        """The state of a range of rows, as views: a step on it updates this state in place."""
        memories = [
            {
                m: MemoryState(*(getattr(st, f)[rows] for f in MEMORY_FIELDS))
                for m, st in layer.items()
            }
            for layer in self.memories
        ]
        return DecodeState(self.pos[rows], memories, self.capacity, self.host_pos[rows])

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
    """Bytes of one stored (key, value) pair of one memory, every head: int8 stores keep an fp32
    scale per head beside each key and each value."""
    width = config.memory_width
    if store_dtype == "int8":
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
    if store_dtype != "int8":  # int8: stores of ONNX artifacts, a scale per pair and head
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


def plan_line(config: ModelConfig, max_batch: int, max_context: int) -> str:
    """One line on the state a run allocates (fp32 stores), printed before generation."""
    plan = memory_plan(config, max_context, max_batch, "float32")
    return (
        f"memory plan: {max_batch} x {max_context} tokens -> "
        f"{human_bytes(plan.state_bytes)} of state (LTM {human_bytes(plan.ltm_bytes_per_token)}"
        f"/token, STM {human_bytes(plan.stm_bytes_per_sequence)}/sequence)"
    )

"""What every backend offers the runtime: a state, a step over it, and the model's config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mosaicrt.errors import BackendError
from mosaicrt.model.config import ModelConfig
from mosaicrt.runtime.paging import BlockTable, StateSizes

# Token ids and lengths as a step takes them: host integers, as numpy arrays (what the batcher
# builds: a decode step's torch calls cost more than its bookkeeping) or CPU torch tensors.
HostInts = np.ndarray | torch.Tensor
# A step's logits as a backend holds them (device_logits): numpy on the host, a device tensor.
Logits = np.ndarray | torch.Tensor


class Backend(ABC):
    """A model that consumes token chunks against a per-sequence decode state it allocates once."""

    name: str
    config: ModelConfig
    # torch intra-op threads while this backend runs (None: torch's default). A backend that
    # computes in its own thread pool asks for 1: between its steps the runtime's small torch ops
    # would otherwise wake torch's workers, whose spinning takes the cores from it.
    torch_threads: int | None = None

    @abstractmethod
    def new_state(self, batch: int, capacity: int, pool_blocks: int | None = None) -> Any:
        """Preallocate the state of `batch` sequences of up to `capacity` tokens each, their LTM
        in a pool of `pool_blocks` blocks (runtime.paging; default: every row at capacity)."""

    @abstractmethod
    def reset(self, state: Any, rows: torch.Tensor) -> None:
        """Free the sequences in `rows` (B,) bool so new requests can take them (their LTM
        blocks go back to the pool)."""

    # Paging (runtime.paging): a backend whose state keeps its LTM in a pool of blocks says so
    # with block_table; the batcher then admits by free blocks, preempts, and caches prefixes.

    def block_table(self, state: Any) -> BlockTable | None:
        """The state's LTM block table; None: no pool (a model without an LTM, or a backend
        that keeps one store per row)."""
        return None

    def state_bytes(self, state: Any) -> dict[str, int]:
        """{"ltm", "stm", "recurrence"}: bytes of the buffers `state` really holds, by kind."""
        raise BackendError(f"the {self.name} backend does not report its state's size")

    def state_sizes(self) -> StateSizes:
        """Bytes of the state this backend allocates: per row, per LTM block."""
        stores = self.store_dtype_name()  # first: a backend without a state says so
        return StateSizes.of(self.config, self.block, stores)

    def store_dtype_name(self) -> str:
        """The dtype this backend keeps its stores in: float32, float16, bfloat16 or int8 (the
        backends that page their state say; `block` is then their LTM block's pairs)."""
        raise BackendError(f"the {self.name} backend does not report its state's size")

    def snapshot(self, state: Any, row: int) -> dict[str, Any]:
        """Copies of one row's constant-size state, and its position under "pos" (the prefix
        cache keeps it)."""
        raise BackendError(f"the {self.name} backend has no prefix cache")

    def restore(self, state: Any, row: int, snapshot: dict[str, Any]) -> None:
        """Put a snapshot back into a row (its LTM blocks are set through the block table)."""
        raise BackendError(f"the {self.name} backend has no prefix cache")

    def copy_block(self, state: Any, source: int, target: int, pairs: int | None = None) -> None:
        """Copy LTM pool block `source` into block `target`, every layer: its first `pairs`
        slots (None: all of them; the others hold no pair yet, and positions keep them unread)."""
        raise BackendError(f"the {self.name} backend has no prefix cache")

    def first_nonfinite_layer(self, state: Any, row: int) -> int | None:
        """The first layer whose state in `row` holds NaN or inf, if the backend can tell."""
        return None

    @abstractmethod
    def step(
        self,
        ids: HostInts,
        lengths: HostInts,
        state: Any,
        last_only: bool,
        rows: slice | None = None,
        device_logits: bool = False,
    ) -> Logits:
        """Consume ids (R, C) int64, lengths (R,) real tokens per row (numpy arrays or CPU
        tensors), for the rows `rows` of the state (default all B); return (R, V) or (R, C, V)
        fp32 CPU logits, updating those rows in place. The others are not read or written (their
        cost is not paid). device_logits: the logits may stay where and as the backend computed
        them (Logits), valid until its next step: a GPU backend then copies none to the host
        (the batcher reduces them there), and a host backend may return its output buffer."""

    def scan_rows(self, logits: Logits) -> tuple[list[bool], list[int]]:
        """(does each row hold no NaN or inf, each row's greedy token) of `logits`, this
        backend's last step's: sampling.scan_rows of them, or what the step's graph computed
        of them already."""
        from mosaicrt.runtime.sampling import scan_rows  # (sampling imports this module)

        return scan_rows(logits)


@contextmanager
def torch_threads_for(backend: Backend) -> Iterator[None]:
    """Run a block with the torch thread count the backend asks for, then restore it."""
    wanted, before = getattr(backend, "torch_threads", None), torch.get_num_threads()
    if wanted is not None and wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted is not None and wanted != before:
            torch.set_num_threads(before)


def nonfinite_error(backend: Backend, state: Any, row: int) -> BackendError:
    """The error for a row whose logits are NaN or inf, naming the first layer where it shows."""
    layer = backend.first_nonfinite_layer(state, row)
    where = (
        f"from layer {layer} on (its memory state went non-finite first)"
        if layer is not None
        else "after the last layer's memories (FFN, final norm or LM head)"
    )
    return BackendError(
        f"the model produced non-finite logits (NaN or inf) {where}: the weights or the "
        "computation overflow (weights are scanned at load unless --no-weight-check)"
    )


def whole_batch(
    ids: HostInts, lengths: HostInts, rows: slice | None, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (R, C) and lengths (R,) of the rows `rows`, as (batch, C) and (batch,) tensors with
    the other rows at length 0: for a backend that steps every row."""
    ids, lengths = torch.as_tensor(ids), torch.as_tensor(lengths)
    if rows is None or (rows.start, rows.stop) == (0, batch):
        return ids, lengths
    full_ids = torch.zeros(batch, ids.shape[1], dtype=ids.dtype)
    full_lengths = torch.zeros(batch, dtype=lengths.dtype)
    full_ids[rows], full_lengths[rows] = ids, lengths
    return full_ids, full_lengths

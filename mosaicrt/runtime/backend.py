"""What every backend offers the runtime: a state, a step over it, and the model's config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mosaicrt.errors import BackendError
from mosaicrt.model.config import ModelConfig


class Backend(ABC):
    """A model that consumes token chunks against a per-sequence decode state it allocates once."""

    name: str
    config: ModelConfig
    # torch intra-op threads while this backend runs (None: torch's default). A backend that
    # computes in its own thread pool asks for 1: between its steps the runtime's small torch ops
    # would otherwise wake torch's workers, whose spinning takes the cores from it.
    torch_threads: int | None = None

    @abstractmethod
    def new_state(self, batch: int, capacity: int) -> Any:
        """Preallocate the state of `batch` sequences of up to `capacity` tokens each."""

    @abstractmethod
    def reset(self, state: Any, rows: torch.Tensor) -> None:
        """Free the sequences in `rows` (B,) bool so new requests can take them."""

    def first_nonfinite_layer(self, state: Any, row: int) -> int | None:
        """The first layer whose state in `row` holds NaN or inf, if the backend can tell."""
        return None

    @abstractmethod
    def step(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        state: Any,
        last_only: bool,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Consume ids (R, C) int64, lengths (R,) real tokens per row, for the rows `rows` of the
        state (default all B); return (R, V) or (R, C, V) fp32 CPU logits, updating those rows
        in place. The others are not read or written (their cost is not paid)."""


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
    ids: torch.Tensor, lengths: torch.Tensor, rows: slice | None, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (R, C) and lengths (R,) of the rows `rows`, as (batch, C) and (batch,) with the other
    rows at length 0: for a backend that steps every row."""
    if rows is None or (rows.start, rows.stop) == (0, batch):
        return ids, lengths
    full_ids = torch.zeros(batch, ids.shape[1], dtype=ids.dtype)
    full_lengths = torch.zeros(batch, dtype=lengths.dtype)
    full_ids[rows], full_lengths[rows] = ids, lengths
    return full_ids, full_lengths

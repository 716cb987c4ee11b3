"""The limits of one run: how many sequences decode together, how long each may grow, and how
many prompt tokens one step consumes."""

from __future__ import annotations

from dataclasses import dataclass

from mosaicrt.errors import InputError


@dataclass(frozen=True)
class RunLimits:
    max_batch: int = 8  # sequences decoded together
    max_context: int = 4096  # tokens one sequence may hold (prompt + generated)
    prefill_chunk: int = 512  # prompt tokens consumed per step
    state_memory: int | None = None  # bytes of decode state (None: every row at max_context)
    prefix_cache: bool = True  # start requests from the state after a prefix already prefilled

    def __post_init__(self) -> None:
        if self.state_memory is not None and self.state_memory < 1:
            raise InputError(f"--state-memory must be more than 0 bytes, got {self.state_memory}")
        for name in ("max_batch", "max_context", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )

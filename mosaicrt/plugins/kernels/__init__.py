"""Triton kernels for the two associative-memory hot spots, and their adapter for the reference.

On a CPU they run under the Triton interpreter (TRITON_INTERPRET=1): slow, for tests.
"""

from __future__ import annotations

import torch

from mosaicrt.model.mmv2 import AssociativeMemory
from mosaicrt.model.state import MemoryState


class TritonKernels:
    """Implements mosaicrt.model.mmv2.MemoryKernels with the kernels of this package."""

    def gated_key_scan(
        self,
        k_raw: torch.Tensor,
        log_g: torch.Tensor,
        log_lam: torch.Tensor,
        valid: torch.Tensor,
        st: MemoryState,
        eps: float,
    ) -> torch.Tensor:
        from mosaicrt.plugins.kernels.scan import gated_key_scan

        return gated_key_scan(k_raw, log_g, log_lam, valid.sum(dim=1), st.s, st.mx, eps)

    def retrieve(
        self,
        mem: AssociativeMemory,
        q: torch.Tensor,
        pos: torch.Tensor,
        lengths: torch.Tensor,
        st: MemoryState,
        k_pairs: torch.Tensor,
        v_pairs: torch.Tensor,
    ) -> torch.Tensor:
        from mosaicrt.plugins.kernels.retrieval import retrieve_any

        stm = mem.kind == "stm"
        return retrieve_any(
            q.contiguous(),
            st.keys,
            st.vals,
            k_pairs.contiguous(),
            v_pairs.contiguous(),
            pos,
            lengths,
            window=mem.window if stm else 0,
            delay=1 if stm else mem.delay,
            ring=stm,
        )

"""The Triton kernels as the torch model's ops (`--kernels triton`): mosaicrt.model.MemoryKernels
through the ops' plugin_op functions, which read whole stores (a ring for a memory with a
window, a pool through its block table for a paged LTM) and so make no host synchronisation in
a decode step.

On a CPU they run under the Triton interpreter (TRITON_INTERPRET=1): slow, for tests.
"""

from __future__ import annotations

import torch

from mosaicrt.model.mmv2 import AssociativeMemory
from mosaicrt.model.state import MemoryState


class TritonKernels:
    """Implements mosaicrt.model.mmv2.MemoryKernels with the ops' Triton kernels."""

    def gated_key_scan(
        self,
        k_raw: torch.Tensor,
        log_g: torch.Tensor,
        log_lam: torch.Tensor,
        valid: torch.Tensor,
        s: torch.Tensor,
        mx: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        from mosaicrt.ops.gated_key_scan.plugin_op import gated_key_scan

        return gated_key_scan(k_raw, log_g, log_lam, valid, s, mx, eps)

    def retrieve(
        self,
        mem: AssociativeMemory,
        st: MemoryState,
        q: torch.Tensor,
        t: torch.Tensor,
        pos: torch.Tensor,
        new_k: torch.Tensor,
        new_v: torch.Tensor,
        new_tau: torch.Tensor,
        params: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        from mosaicrt.ops.associative_memory.plugin_op import associative_memory

        keys, vals = st.keys, st.vals
        if st.blocks is not None:  # a pool (P, S, H, hs), seen as the op's (P, H, S, hs)
            keys, vals = keys.transpose(1, 2), vals.transpose(1, 2)
        return associative_memory(q, t, keys, vals, st.blocks, new_k, new_v, new_tau,
                                  params["beta0"], params["beta1"], params["alpha"], mem.window,
                                  mem.delay)  # fmt: skip

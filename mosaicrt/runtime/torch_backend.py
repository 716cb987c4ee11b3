"""The torch backend: the reference model, eager, on CPU or CUDA."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Callable

import torch

from mosaicrt.errors import BackendError
from mosaicrt.export.artifact import DEFAULT_LTM_BLOCK
from mosaicrt.model.checkpoint import TORCH_DTYPES, load_model
from mosaicrt.model.mmv2 import MMv2, check_capacity
from mosaicrt.model.quantize import quantize_linears
from mosaicrt.model.state import DecodeState
from mosaicrt.runtime.backend import Backend, HostInts, whole_batch
from mosaicrt.runtime.torch_paging import (
    TorchStatePaging,
    attach_pages,
    grow_pages,
    release_pages,
)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(
            "--device cuda was asked for but torch sees no CUDA GPU: "
            "use --device cpu or install a CUDA build of torch"
        )
    return torch.device(device)


def triton_kernels(device: torch.device):
    """The Triton kernels, or a clear error when they cannot run here."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "Triton kernels need a CUDA GPU; to run them (slowly) on the CPU, set "
            "TRITON_INTERPRET=1"
        )
    try:
        from mosaicrt.runtime.torch_kernels import TritonKernels
    except ImportError:
        raise BackendError(
            "the Triton kernels need triton: pip install 'mosaicrt[triton]'"
        ) from None
    return TritonKernels()


class DecodeGraph:
    """One decode step (C = 1, last-token logits) of one state, captured as a CUDA graph over
    static input buffers; replaying it runs every kernel of the step with one launch.
    advance: the model's `advance`, or a torch.compile of it (fewer, fused kernels)."""

    def __init__(self, advance: Callable, state: DecodeState) -> None:
        B, device = state.pos.shape[0], state.pos.device
        self.ids = torch.zeros(B, 1, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(B, dtype=torch.int64, device=device)  # 0: rows stay as they are
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Compile kernels, create handles: rows of length 0 change nothing they read (their
        # pairs go to the pool's scratch block).
        with torch.cuda.stream(side):
            for _ in range(2):
                advance(self.ids, state, self.lengths, last_only=True)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = advance(self.ids, state, self.lengths, last_only=True)  # (B, V)

    @torch.inference_mode()  # the static buffers are inference tensors
    def __call__(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids, non_blocking=True)
        self.lengths.copy_(lengths, non_blocking=True)
        self.graph.replay()
        return self.logits


class TorchBackend(TorchStatePaging, Backend):
    name = "torch"

    def __init__(
        self,
        model: str | Path | MMv2,
        device: str = "auto",
        dtype: str | None = None,
        kernels: str = "torch",
        cuda_graphs: bool = True,
        compile: bool = False,
        check_weights: bool = True,
        quantize: str | None = None,
        ltm_block: int = DEFAULT_LTM_BLOCK,
    ) -> None:
        """model: a checkpoint directory, or an MMv2 (moved to the device and dtype, and frozen in
        place: MMv2.freeze).
        dtype: compute dtype; default fp32 on CPU and the checkpoint's dtype on a GPU.
        kernels: "torch" (the reference ops) or "triton" (the ops' Triton kernels).
        cuda_graphs: with Triton kernels on a GPU, run decode steps as CUDA graphs (one per
        state, that is per batch size).
        compile: run decode steps through torch.compile (dynamic shapes; the first steps
        compile; inside the CUDA graph when there is one); prefill chunks stay eager.
        check_weights: refuse a checkpoint whose weights hold NaN or inf.
        quantize: weight-only "int8" (CPU) or "int4" (CUDA), or "fp8" (CUDA) Linear layers
        (model.quantize).
        ltm_block: pairs per block of the paged LTM (runtime.paging)."""
        self.device, self.block = pick_device(device), ltm_block
        if dtype is None and self.device.type == "cpu":
            dtype = "float32"
        torch_dtype = TORCH_DTYPES[dtype] if dtype else None
        if isinstance(model, MMv2):
            self.model = model.to(device=self.device, dtype=torch_dtype).eval()
        else:
            self.model = load_model(model, torch_dtype, self.device, check_weights)
        self.config = self.model.config
        if quantize is not None:
            quantize_linears(self.model, quantize)
        if kernels == "triton":
            self.model.use_kernels(triton_kernels(self.device))
        elif kernels != "torch":
            raise BackendError(f"unknown --kernels {kernels!r}: choose torch or triton")
        self.model.freeze()  # parameter transforms once, fused products (MMv2.freeze)
        # The reference code sizes its LTM reads on the host, so only the kernels are capturable.
        self.cuda_graphs = cuda_graphs and kernels == "triton" and self.device.type == "cuda"
        self.graphs: dict[int, DecodeGraph] = {}
        self.decode_fn, self.graph_fn = self.model.advance, self.model.advance
        if compile:
            self.decode_fn = torch.compile(self.model.advance, dynamic=True)
            self.graph_fn = torch.compile(self.model.advance)

    def new_state(self, batch: int, capacity: int, pool_blocks: int | None = None) -> DecodeState:
        state = self.model.new_state(batch, capacity, self.block, pool_blocks)
        return attach_pages(state, self.block)

    def reset(self, state: DecodeState, rows: torch.Tensor) -> None:
        release_pages(state, rows)
        state.reset(rows)

    def first_nonfinite_layer(self, state: DecodeState, row: int) -> int | None:
        for layer, memories in enumerate(state.memories):
            for st in memories.values():
                if not all(bool(x[row].isfinite().all()) for x in (st.s, st.k_pend, st.v_pend)):
                    return layer
        return None

    @torch.inference_mode()
    def step(
        self,
        ids: HostInts,
        lengths: HostInts,
        state: DecodeState,
        last_only: bool,
        rows: slice | None = None,
        device_logits: bool = False,
    ) -> torch.Tensor:
        ids, lengths = torch.as_tensor(ids), torch.as_tensor(lengths)
        if self.cuda_graphs and ids.shape[1] == 1 and last_only:  # the graph runs every row
            full_ids, full_lengths = whole_batch(ids, lengths, rows, state.batch_size)
            logits = self._step(full_ids, full_lengths, state, last_only)
            logits = logits[rows] if rows is not None else logits
            if device_logits:  # a copy: the graph's output buffer is rewritten by the next step
                return logits.to(torch.float32, copy=True)
        else:
            logits = self._step(ids, lengths, state.view(rows) if rows else state, last_only)
        return logits.float() if device_logits else logits.float().cpu()

    def _step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: DecodeState, last_only: bool
    ) -> torch.Tensor:
        check_capacity(state, lengths)  # host positions: no device read
        grow_pages(state, lengths)  # LTM blocks for this step's pairs, before anything runs
        if self.cuda_graphs and ids.shape[1] == 1 and last_only:
            graph = self.graphs.get(id(state))
            if graph is None:  # captured once per state, dropped with it
                graph = self.graphs[id(state)] = DecodeGraph(self.graph_fn, state)
                weakref.finalize(state, self.graphs.pop, id(state), None)
            logits = graph(ids, lengths)
        else:
            advance = self.decode_fn if ids.shape[1] == 1 else self.model.advance
            logits = advance(ids.to(self.device), state, lengths.to(self.device), last_only)
        state.host_pos += lengths
        return logits

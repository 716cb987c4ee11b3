"""The torch backend: the reference model, eager, on CPU or CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mosaicrt.errors import BackendError
from mosaicrt.model.checkpoint import TORCH_DTYPES, load_model
from mosaicrt.model.state import DecodeState
from mosaicrt.runtime.backend import Backend


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
        from mosaicrt.plugins.kernels import TritonKernels
    except ImportError:
        raise BackendError(
            "the Triton kernels need triton: pip install 'mosaicrt[triton]'"
        ) from None
    return TritonKernels()


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str | None = None,
        kernels: str = "torch",
    ) -> None:
        """dtype: compute dtype; default fp32 on CPU and the checkpoint's dtype on a GPU.
        kernels: "torch" (the reference code) or "triton" (the kernels in mosaicrt.plugins)."""
        self.device = pick_device(device)
        if dtype is None and self.device.type == "cpu":
            dtype = "float32"
        self.model = load_model(model_dir, TORCH_DTYPES[dtype] if dtype else None, self.device)
        self.config = self.model.config
        if kernels == "triton":
            self.model.use_kernels(triton_kernels(self.device))
        elif kernels != "torch":
            raise BackendError(f"unknown --kernels {kernels!r}: choose torch or triton")

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        return self.model.new_state(batch, capacity)

    def reset(self, state: DecodeState, rows: torch.Tensor) -> None:
        state.reset(rows.to(self.device))

    @torch.inference_mode()
    def step(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: DecodeState, last_only: bool
    ) -> torch.Tensor:
        logits = self.model.step(ids.to(self.device), state, lengths.to(self.device), last_only)
        return logits.float().cpu()

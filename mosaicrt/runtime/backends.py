"""Pick a backend by name for a model directory."""

from __future__ import annotations

from pathlib import Path

from mosaicrt.errors import BackendError
from mosaicrt.runtime.backend import Backend

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PLANNED = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def open_backend(name: str, model_dir: str | Path, device: str = "auto",
                 dtype: str | None = None) -> Backend:
    """The backend `name` for model_dir ('auto': torch for a checkpoint directory)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name in PLANNED:
        raise BackendError(f"the {PLANNED[name]} backend is not part of mosaicrt yet: "
                           "use --backend torch")
    from mosaicrt.runtime.torch_backend import TorchBackend

    return TorchBackend(model_dir, device=device, dtype=dtype)

"""Pick a backend by name for a model directory."""

from __future__ import annotations

from pathlib import Path

from mosaicrt.errors import BackendError
from mosaicrt.runtime.backend import Backend

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def is_artifact(model_dir: str | Path) -> bool:
    return (Path(model_dir) / "manifest.json").is_file()


def open_backend(
    name: str,
    model_dir: str | Path,
    device: str = "auto",
    dtype: str | None = None,
    kernels: str = "torch",
    compile: bool = False,
) -> Backend:
    """The backend `name` for model_dir. 'auto': TensorRT for an engine directory, ONNX Runtime
    for an exported artifact, torch for a checkpoint directory."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    from mosaicrt.runtime.trt_backend import is_engine_dir

    if name == "auto":
        if is_engine_dir(model_dir):
            name = "tensorrt"
        else:
            name = "onnxruntime" if is_artifact(model_dir) else "torch"
    if kernels != "torch" and name != "torch":
        raise BackendError(f"--kernels {kernels} applies to the torch backend only")
    if compile and name != "torch":
        raise BackendError(f"--compile applies to the torch backend only, not {name}")
    if name == "tensorrt":
        from mosaicrt.runtime.trt_backend import TrtBackend

        if is_artifact(model_dir):
            raise BackendError(
                f"{model_dir} is an ONNX artifact: build an engine from it with `mosaicrt build "
                f"{model_dir} -o ENGINE_DIR`, or use --backend onnxruntime"
            )
        return TrtBackend(model_dir, device=device)
    if name == "onnxruntime":
        if not is_artifact(model_dir) and (Path(model_dir) / "model.safetensors").exists():
            raise BackendError(
                f"{model_dir} is a checkpoint, not an ONNX artifact: run "
                f"`mosaicrt export {model_dir} -o ARTIFACT_DIR` first, or use "
                "--backend torch"
            )
        from mosaicrt.runtime.ort_backend import OrtBackend

        return OrtBackend(model_dir, device=device)
    from mosaicrt.runtime.torch_backend import TorchBackend

    if is_artifact(model_dir):
        raise BackendError(
            f"{model_dir} is an ONNX artifact: use --backend onnxruntime, or give "
            "the torch backend the checkpoint it was exported from"
        )
    return TorchBackend(model_dir, device=device, dtype=dtype, kernels=kernels, compile=compile)

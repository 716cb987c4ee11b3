"""Pick a backend by name for a model directory; the command-line options that name one."""

from __future__ import annotations

import argparse
from pathlib import Path

from mosaicrt.errors import BackendError, CheckpointError
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
    check_weights: bool = True,
    ort_ops: str = "auto",
    quantize: str | None = None,
) -> Backend:
    """The backend `name` for model_dir. 'auto': TensorRT for an engine directory, ONNX Runtime
    for an exported artifact, torch for a checkpoint directory."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    from mosaicrt.plugins.engine import is_engine_dir

    if (Path(model_dir) / "model.onnx").is_file() and not is_artifact(model_dir):
        raise CheckpointError(
            f"{model_dir} has model.onnx but no manifest.json: it is not a complete mosaicrt "
            "artifact; re-export it with `mosaicrt export`"
        )
    if name == "auto":
        if is_engine_dir(model_dir):
            name = "tensorrt"
        else:
            name = "onnxruntime" if is_artifact(model_dir) else "torch"
    if kernels != "torch" and name != "torch":
        raise BackendError(f"--kernels {kernels} applies to the torch backend only")
    if ort_ops != "auto" and name != "onnxruntime":
        raise BackendError(f"--ort-ops {ort_ops} applies to the onnxruntime backend only")
    if compile and name != "torch":
        raise BackendError(f"--compile applies to the torch backend only, not {name}")
    if quantize is not None and name != "torch":
        raise BackendError(
            "--quantize applies to the torch backend only: an ONNX artifact is quantized when "
            "it is exported (`mosaicrt export --quantize int4|int8`)"
        )
    if dtype is not None and name != "torch":
        raise BackendError(
            f"--dtype applies to the torch backend only: the {name} backend runs the precision "
            f"{model_dir} was exported or built with (re-export with `mosaicrt export --dtype`)"
        )
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

        return OrtBackend(model_dir, device=device, check_weights=check_weights, ort_ops=ort_ops)
    from mosaicrt.runtime.torch_backend import TorchBackend

    if is_artifact(model_dir):
        raise BackendError(
            f"{model_dir} is an ONNX artifact: use --backend onnxruntime, or give "
            "the torch backend the checkpoint it was exported from"
        )
    return TorchBackend(model_dir, device=device, dtype=dtype, kernels=kernels, compile=compile,
                        check_weights=check_weights, quantize=quantize)  # fmt: skip


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run a model: score, generate, bench, eval."""
    from mosaicrt.argtypes import add_weight_check_arg, positive_int

    p.add_argument("model", help="checkpoint directory (torch) or ONNX artifact (onnxruntime)")
    add_state_args(p)
    p.add_argument(
        "--backend",
        default="auto",
        help=f"one of {', '.join(BACKENDS)} (default auto: tensorrt for an engine directory, "
        "onnxruntime for an artifact, torch for a checkpoint)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--dtype",
        help="compute dtype fp32|fp16|bf16 (default fp32 on CPU, the checkpoint's on GPU)",
    )
    p.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per step")
    p.add_argument(
        "--kernels",
        default="torch",
        help="torch backend: torch (reference code) or triton (needs a GPU, or "
        "TRITON_INTERPRET=1 on a CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend: decode steps through torch.compile (the first steps compile; with "
        "--kernels triton on a GPU, the compiled step is what the CUDA graph replays)",
    )
    p.add_argument(
        "--ort-ops",
        default="auto",
        help="onnxruntime backend: the mosaic ops as native kernels (built with `mosaicrt "
        "ort-ops build`) with each layer's memory nodes one native node (fused), the ops' "
        "native kernels alone (native), their ONNX function bodies (functions), or the first of "
        "these that the build, the provider (the CPU) and the artifact allow (auto, default)",
    )
    p.add_argument(
        "--quantize",
        help="torch backend: weight-only int8 Linear layers on the CPU, int4 on a CUDA GPU "
        "(sm80+), or fp8 weights and activations on one (sm89+) (ONNX artifacts are quantized "
        "at export: `mosaicrt export --quantize`)",
    )
    add_weight_check_arg(p)


def add_state_args(p: argparse.ArgumentParser) -> None:
    """The decode state's budget and prefix cache (runtime.paging, runtime.prefix_cache)."""
    from mosaicrt.argtypes import size

    p.add_argument(
        "--state-memory",
        type=size,
        metavar="SIZE",
        help="bytes of decode state (e.g. 2GiB): rows take LTM blocks from one pool of this "
        "size as they grow, so --max-batch and --max-context are limits, not allocations "
        "(default: every row sized for --max-context)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not start requests from the state of a prompt prefix already prefilled",
    )


def state_limits(args: argparse.Namespace) -> dict:
    """The RunLimits fields add_state_args' options set."""
    return {"state_memory": args.state_memory, "prefix_cache": not args.no_prefix_cache}


def open_run_backend(args: argparse.Namespace):
    """The backend that add_run_args' options name."""
    from mosaicrt.model.config import normalize_dtype

    dtype = normalize_dtype(args.dtype) if args.dtype else None
    return open_backend(args.backend, args.model, args.device, dtype, args.kernels,
                        compile=args.compile, check_weights=not args.no_weight_check,
                        ort_ops=args.ort_ops, quantize=args.quantize)  # fmt: skip

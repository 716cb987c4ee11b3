"""`mosaicrt triton-export`: a Triton Inference Server model repository serving one mosaicrt model.

REPO/mosaicrt/config.pbtxt          Python backend, decoupled: streaming and HTTP generate
REPO/mosaicrt/1/model.py            mosaicrt.runtime.serving.triton_model
REPO/mosaicrt/1/mosaicrt.json       backend, device and limits the model opens
REPO/mosaicrt/1/model/              the artifact, engine or checkpoint (a copy)
REPO/mosaicrt_unary/config.pbtxt    Python backend, not decoupled: unary infer, forwarded
REPO/mosaicrt_unary/1/model.py      mosaicrt.runtime.serving.triton_unary
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mosaicrt.errors import InputError
from mosaicrt.outputs import atomic_dir, check_output_dir
from mosaicrt.runtime.batcher import pool_blocks
from mosaicrt.runtime.limits import RunLimits

MODEL_NAME, UNARY_NAME = "mosaicrt", "mosaicrt_unary"
SETTINGS = "mosaicrt.json"
MODEL_PY = Path(__file__).with_name("triton_model.py")  # imports Triton's Python-backend utils
UNARY_PY = Path(__file__).with_name("triton_unary.py")
DRAIN_FILE_ENV = "MOSAICRT_DRAIN_FILE"  # while this file exists, the model refuses and ends work

INPUTS = """input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }},
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }},
  {{ name: "stop" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "stop_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "session_id" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "session_start" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "session_end" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }}
]
"""

CONFIG = (
    """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: {decoupled} }}
"""
    + INPUTS
    + """instance_group [ {{ count: {instances} kind: {kind} }} ]
"""
)


def model_kind(model_dir: Path) -> str:
    """Which backend a model directory is for."""
    if (model_dir / "build_manifest.json").is_file():
        return "tensorrt"
    if (model_dir / "manifest.json").is_file():
        return "onnxruntime"
    if (model_dir / "config.json").is_file():
        return "torch"
    raise InputError(
        f"{model_dir} is neither an ONNX artifact, a TensorRT engine nor a checkpoint: give "
        "`mosaicrt triton-export` the output of `mosaicrt export`, `mosaicrt build` or `init`"
    )


def model_max_context(model_dir: Path) -> int | None:
    """The context an artifact or engine was made for (None for a checkpoint)."""
    from mosaicrt.export.artifact import MANIFEST_FILE, read_manifest
    from mosaicrt.plugins.engine import BUILD_MANIFEST, read_build_manifest

    if (model_dir / BUILD_MANIFEST).is_file():
        return int(read_build_manifest(model_dir)["max_context"])
    if (model_dir / MANIFEST_FILE).is_file():
        return int(read_manifest(model_dir)[0]["max_context"])
    return None


def check_model(model_dir: Path, backend: str, check_weights: bool):
    """What `score` would check, before anything is written: an artifact or checkpoint is
    loaded by its backend on the CPU (manifest, graph, config, weights), which is returned; an
    engine's manifest is read and its engine file checked (running it needs its GPU): None."""
    if backend == "tensorrt":
        from mosaicrt.plugins.engine import ENGINE_FILE, read_build_manifest

        manifest = read_build_manifest(model_dir)
        engine = model_dir / manifest.get("engine_file", ENGINE_FILE)
        if not engine.is_file() or engine.stat().st_size != manifest.get("engine_bytes"):
            raise InputError(
                f"{engine} is missing or not the size its build manifest records: rebuild the "
                "engine with `mosaicrt build`"
            )
        return None
    from mosaicrt.runtime.backends import open_backend

    return open_backend(backend, model_dir, device="cpu", check_weights=check_weights)


def export_repository(
    model_dir: str | Path,
    repo: str | Path,
    backend: str | None = None,
    max_batch: int = 8,
    max_context: int | None = None,
    instances: int = 1,
    prefill_chunk: int = 512,
    idle_timeout_s: float = 600.0,
    device: str = "auto",
    force: bool = False,
    check_weights: bool = True,
    state_memory: int | None = None,
    prefix_cache: bool = True,
) -> Path:
    """Write the repository, whole or not at all, after checking the model; returns the
    model's directory in it. An existing repository is replaced only with force."""
    model_dir, repo = Path(model_dir), Path(repo)
    check_output_dir(repo, inputs=[model_dir], force=force, what="model repository")
    found = model_kind(model_dir)
    backend = backend or found
    if backend != found:
        raise InputError(
            f"{model_dir} is for the {found} backend, not {backend}: drop --backend or give "
            f"the matching model directory"
        )
    limit = model_max_context(model_dir)
    max_context = max_context or limit or 4096
    if limit and max_context > limit:
        raise InputError(
            f"--max-context {max_context} exceeds the {limit} tokens {model_dir} was built for: "
            f"lower it, or re-export / rebuild with a larger --max-context"
        )
    for flag, value in (("max-batch", max_batch), ("max-context", max_context),
                        ("instances", instances), ("prefill-chunk", prefill_chunk)):  # fmt: skip
        if value < 1:
            raise InputError(f"--{flag} must be >= 1, got {value}")
    served = check_model(model_dir, backend, check_weights)
    if served is not None and state_memory is not None:  # a budget too small is refused now
        limits = RunLimits(max_batch, max_context, prefill_chunk, state_memory=state_memory)
        pool_blocks(served, limits)
    with atomic_dir(repo) as tmp:
        write_repository(tmp, model_dir, backend, max_batch, max_context, instances,
                         prefill_chunk, idle_timeout_s, device, state_memory,
                         prefix_cache)  # fmt: skip
    return repo / MODEL_NAME


def write_repository(
    repo: Path, model_dir: Path, backend: str, max_batch: int, max_context: int,
    instances: int, prefill_chunk: int, idle_timeout_s: float, device: str,
    state_memory: int | None = None, prefix_cache: bool = True,
) -> None:  # fmt: skip
    home = repo / MODEL_NAME
    version = home / "1"
    version.mkdir(parents=True)
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    config = CONFIG.format(name=MODEL_NAME, decoupled="true", instances=instances, kind=kind)
    (home / "config.pbtxt").write_text(config)
    unary = repo / UNARY_NAME / "1"
    unary.mkdir(parents=True)
    (unary.parent / "config.pbtxt").write_text(
        CONFIG.format(name=UNARY_NAME, decoupled="false", instances=1, kind="KIND_CPU")
    )
    shutil.copy(UNARY_PY, unary / "model.py")
    shutil.copy(MODEL_PY, version / "model.py")
    shutil.copytree(model_dir, version / "model")
    settings = {
        "backend": backend,
        "device": device,
        "max_batch": max_batch,
        "max_context": max_context,
        "prefill_chunk": prefill_chunk,
        "idle_timeout_s": idle_timeout_s,
        "state_memory": state_memory,
        "prefix_cache": prefix_cache,
    }
    (version / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")

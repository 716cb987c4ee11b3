"""The ONNX artifact directory: model.onnx (+ external data), config.json, manifest.json, tokenizer.

The manifest is what the runtime trusts: versions, opsets, the state layout and the capacities the
artifact was exported for. `read_manifest` refuses artifacts it cannot run, with the fix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from mosaicrt import __version__
from mosaicrt.errors import CheckpointError, InputError
from mosaicrt.export import io_spec
from mosaicrt.export.builder import EMBEDDING, STORE_TYPES, build_step_model
from mosaicrt.export.quantize import WeightQuantization
from mosaicrt.model.checkpoint import load_model
from mosaicrt.model.config import (
    DTYPE_BYTES,
    DTYPE_SHORT,
    DTYPES,
    ModelConfig,
    load_config,
    save_config,
)
from mosaicrt.onnx_graph import OPSET, ExternalData
from mosaicrt.ops import DOMAIN, DOMAIN_VERSION
from mosaicrt.ops.associative_memory import SCALED_STORES
from mosaicrt.outputs import atomic_dir, check_output_dir

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
FORMAT = "mosaicrt-onnx-artifact"
FORMAT_VERSION = 1
EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to model.onnx.data
STORE_DTYPES = tuple(STORE_TYPES)  # float32, float16, bfloat16, int8, float8_e4m3fn
DEFAULT_LTM_BLOCK = 128  # pairs per LTM store block: the granularity of "read only what is valid"


def export_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    max_context: int = 4096,
    last_only: bool = False,
    ltm_block: int = DEFAULT_LTM_BLOCK,
    progress: bool = False,
    force: bool = False,
    check_weights: bool = True,
    quantize: WeightQuantization | None = None,
    store_dtype: str | None = None,
) -> Path:
    """Export a checkpoint to an ONNX artifact directory and check it with onnx.checker. The
    directory is written whole or not at all; an existing one is replaced only with force.
    With `quantize`, the weight MatMuls are block-quantized; the stores hold `store_dtype`
    (default: `dtype`; int8 and fp8 keep a scale per pair and head)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown export dtype {dtype!r}: use fp32, fp16 or bf16")
    store_dtype = store_dtype or dtype
    if store_dtype not in STORE_DTYPES:
        raise InputError(
            f"--store-dtype must be fp32, fp16, bf16, int8 or fp8, got {store_dtype!r}"
        )
    if max_context < 2:
        raise InputError(f"--max-context must be >= 2, got {max_context}")
    out = check_output_dir(out_dir, inputs=[checkpoint], force=force, what="artifact")
    steps = tqdm(total=4, desc="export", disable=not progress)
    model = load_model(checkpoint, dtype=None, check_finite=check_weights)
    config = model.config
    steps.update(1)
    with atomic_dir(out) as tmp:
        weights_read = write_graph(model, tmp, dtype, last_only, steps, quantize, store_dtype)
        save_config(config.replace(torch_dtype=dtype), tmp)
        tokenizer = Path(checkpoint) / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copy(tokenizer, tmp / "tokenizer.json")
        manifest = make_manifest(
            config, dtype, max_context, last_only, ltm_block, sha256(tmp / MODEL_FILE), store_dtype
        )
        manifest["quantization"] = quantize.manifest() if quantize else None
        manifest["weights_read_bytes"] = weights_read
        manifest["source_checkpoint"] = str(Path(checkpoint).resolve())
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    steps.close()
    return out


def write_graph(
    model,
    out: Path,
    dtype: str,
    last_only: bool,
    steps,
    quantize: WeightQuantization | None,
    store_dtype: str,
) -> int:
    """model.onnx (and model.onnx.data above the protobuf limit) into out, checked; returns the
    bytes of weights a decode step reads (every initializer but the embedding table)."""
    size = sum(t.numel() * DTYPE_BYTES[dtype] for t in model.state_dict().values())
    # Above the protobuf limit, weights stream into model.onnx.data as the graph is built.
    external = ExternalData(out / (MODEL_FILE + ".data")) if size > EXTERNAL_DATA_BYTES else None
    try:
        proto = build_step_model(
            model, last_only, dtype, external, quantize=quantize, store_dtype=store_dtype
        )
    finally:
        if external is not None:
            external.close()
    steps.update(1)
    weights_read = sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in proto.graph.initializer
        if t.name != EMBEDDING
    )
    (out / MODEL_FILE).write_bytes(proto.SerializeToString())  # external tensors: written
    del proto
    steps.update(1)
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    steps.update(1)
    return weights_read


def sha256(*paths: Path) -> str:
    """SHA-256 of the files' bytes in turn, read in 1 MiB blocks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def make_manifest(
    config: ModelConfig,
    dtype: str,
    max_context: int,
    last_only: bool,
    ltm_block: int,
    onnx_sha256: str,
    store_dtype: str | None = None,
) -> dict:
    store_dtype = store_dtype or dtype
    store_type = STORE_TYPES[store_dtype]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mosaicrt_version": __version__,
        "onnx_opset": OPSET,
        "custom_domain": DOMAIN,
        "custom_domain_version": DOMAIN_VERSION,
        "dtype": dtype,
        "state_dtype": {"small": "float32", "stores": store_dtype}
        | (
            {"store_scales": "float32, one per pair and head"} if io_spec.scaled(store_type) else {}
        ),
        "last_only": last_only,
        "max_context": max_context,
        "ltm_block": ltm_block,
        "inputs": [io_spec.INPUT_IDS, io_spec.LENGTHS, io_spec.POSITIONS],
        "state_layout": io_spec.layout(config, store_type),
        "onnx_sha256": onnx_sha256,
    }


def quantization_label(manifest: dict) -> str | None:
    """'int4 weights + int8 stores' style (or fp8 stores), or None for an artifact of fp
    weights and stores."""
    parts = []
    if manifest.get("quantization"):
        parts.append(f"{manifest['quantization']['weights']} weights")
    stores = manifest["state_dtype"]["stores"]
    if stores in SCALED_STORES:
        parts.append(f"{DTYPE_SHORT.get(stores, stores)} stores")
    return " + ".join(parts) or None


def read_manifest(artifact: str | Path) -> tuple[dict, ModelConfig]:
    """The manifest and config of an artifact, refused with a fix when this runtime can't run it."""
    artifact = Path(artifact)
    path = artifact / MANIFEST_FILE
    if not (artifact / MODEL_FILE).is_file() or not path.is_file():
        raise CheckpointError(
            f"{artifact} is not an ONNX artifact (no {MODEL_FILE} or "
            f"{MANIFEST_FILE}): create one with `mosaicrt export CKPT -o "
            f"{artifact}`, or use --backend torch for a checkpoint"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): re-export the artifact") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a mosaicrt ONNX artifact of format version "
            f"{FORMAT_VERSION}: re-export it with mosaicrt {__version__}"
        )
    found = (
        manifest.get("mosaicrt_version"),
        manifest.get("onnx_opset"),
        manifest.get("custom_domain_version"),
    )
    if found != (__version__, OPSET, DOMAIN_VERSION):
        raise CheckpointError(
            f"{artifact} was exported by mosaicrt {found[0]} (opset {found[1]}, {DOMAIN} "
            f"v{found[2]}); this is mosaicrt {__version__} (opset {OPSET}, {DOMAIN} "
            f"v{DOMAIN_VERSION}): re-export it with `mosaicrt export`"
        )
    return manifest, load_config(artifact)

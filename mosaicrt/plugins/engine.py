"""Build a TensorRT engine from an ONNX artifact: `mosaicrt build` and the repository's build.py.

    python build.py ARTIFACT_DIR -o ENGINE_DIR [--target sm86] [--max-batch 8] [--max-context N]

The mosaic nodes become plugin layers (mosaicrt.plugins.tensorrt), never their inlined ONNX
functions: the build checks it and stops otherwise. Two optimization profiles: 0 decodes (chunk 1),
1 prefills (chunk 2 .. max-chunk). Precision comes from the ONNX types (a strongly typed network).
A quantized artifact's MatMulNBits weights are parsed from its Q/DQ view (export.quantize.qdq_model:
INT4/INT8 constants, blocked DequantizeLinear, MatMul); int8 stores go to the plugins as they are.
TensorRT-RTX builds ahead of time for the --target GPU architecture on any machine, a CPU-only one
included; full TensorRT builds for the local GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import onnx

from mosaicrt import __version__
from mosaicrt.argtypes import positive_int
from mosaicrt.errors import BackendError, CheckpointError, InputError
from mosaicrt.export.artifact import MODEL_FILE, quantization_label, read_manifest, sha256
from mosaicrt.export.io_spec import INPUT_IDS, LTM_BLOCKS
from mosaicrt.export.quantize import MS_DOMAIN, qdq_model
from mosaicrt.ops import DOMAIN, PLUGIN_VERSION, source_files
from mosaicrt.outputs import atomic_dir, check_output_dir

ENGINE_FILE = "model.engine"
BUILD_MANIFEST = "build_manifest.json"
ENGINE_FORMAT = "mosaicrt-tensorrt-engine"
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120")


def plugin_sources() -> list[Path]:
    """The code a plugin runs: the generic plugin class and every op's kernel and plugin op."""
    return [Path(__file__).with_name("tensorrt.py")] + source_files()


def add_build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="ONNX artifact directory (mosaicrt export)")
    parser.add_argument("-o", "--output", required=True, help="engine directory to write")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="most sequences per step")
    parser.add_argument(
        "--max-context",
        type=positive_int,
        help="most tokens per sequence (default: the artifact's)",
    )
    parser.add_argument(
        "--max-chunk", type=positive_int, default=512, help="most prefill tokens per step"
    )
    parser.add_argument(
        "--target",
        help=f"TensorRT-RTX: GPU architecture to build for ({', '.join(RTX_TARGETS)}); "
        "full TensorRT builds for the local GPU",
    )
    parser.add_argument(
        "--weights",
        choices=["fp8"],
        help="fp8: the engine's weight MatMuls as FP8 constants with a scale per output feature "
        "(Q/DQ; for GPUs with fp8, sm89+), from an artifact of fp weights",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing engine")
    parser.add_argument(
        "--timing-cache", help="full TensorRT: timing cache file (default ENGINE_DIR/timing.cache)"
    )


class Phases:
    """Numbered build phases with their elapsed time: `with phases("parsing"):`."""

    def __init__(self, total: int, log=print) -> None:
        self.total, self.done, self.log, self.start = total, 0, log, time.perf_counter()

    @contextmanager
    def __call__(self, what: str):
        self.done += 1
        t0 = time.perf_counter()
        self.log(f"[{self.done}/{self.total}] {what} ...")
        yield
        self.log(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - t0:.2f} s")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def read_graph(path: Path) -> onnx.ModelProto:
    """The artifact's graph without its weights, refused with the fix if it is not ONNX."""
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BackendError(
            f"TensorRT cannot parse {path}: not an ONNX model ({exc}); re-export it with "
            "`mosaicrt export`"
        ) from None


def onnx_files(artifact: Path, graph: onnx.ModelProto) -> list[Path]:
    """model.onnx and its external data files, in a stable order."""
    data = {
        entry.value
        for tensor in graph.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [artifact / MODEL_FILE] + [artifact / name for name in sorted(data)]


def profile_shape(name: str, shape, batch: int, chunk: int, blocks: int) -> tuple[int, ...]:
    """An input's shape with its dynamic dimensions set: the chunk (input_ids' second), the LTM
    pool (an LTM pool's first: `blocks` per row), the blocks a row reads (the block table's
    second), the batch (every other)."""
    dims = []
    for axis, dim in enumerate(shape):
        if dim != -1:
            dims.append(dim)
        elif name == INPUT_IDS and axis == 1:
            dims.append(chunk)
        elif ".ltm." in name and axis == 0:
            dims.append(batch * blocks)
        elif name == LTM_BLOCKS and axis == 1:
            dims.append(blocks)
        else:
            dims.append(batch)
    return tuple(dims)


def build_engine(
    artifact: str | Path,
    output: str | Path,
    max_batch: int = 8,
    max_context: int | None = None,
    max_chunk: int = 512,
    target: str | None = None,
    timing_cache: str | Path | None = None,
    log=print,
    force: bool = False,
    weights: str | None = None,
) -> dict:
    """Build ENGINE_DIR/model.engine and its build_manifest.json; returns the manifest.
    weights: "fp8" to quantize the weight MatMuls of an fp artifact to FP8 in the engine.
    The phases are numbered and timed on `log`. The directory is written whole at the end, or
    not at all; an existing one is replaced only with force."""
    artifact, output = Path(artifact), Path(output)
    phases = Phases(6, log)
    with phases("reading the artifact"):
        check_output_dir(output, inputs=[artifact], force=force, flag="-o", what="engine")
        manifest, model_config = read_manifest(artifact)
        max_context = max_context or manifest["max_context"]
        check_limits(max_batch, max_context, max_chunk, target)
        graph = read_graph(artifact / MODEL_FILE)
        mosaic_nodes = [node.name for node in graph.graph.node if node.domain == DOMAIN]
        used_ops = sorted({node.op_type for node in graph.graph.node if node.domain == DOMAIN})
        nbits = check_weights_option(weights, manifest, graph)
    with phases("loading TensorRT and registering the mosaic plugins"):
        from mosaicrt.plugins.tensorrt import load_tensorrt, register

        tensorrt = load_tensorrt()
        trt = tensorrt.module
        if target and tensorrt.flavour != "tensorrt_rtx":
            raise InputError(
                "--target is for TensorRT-RTX ahead-of-time builds; full TensorRT builds for the "
                "local GPU: drop --target"
            )
        register(log)
        plugins = used_ops  # the plugins this engine's layers are made of
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
    view = tempfile.TemporaryDirectory(prefix="mosaicrt-qdq-")
    with phases("parsing the ONNX model"), view:
        model = model_to_parse(artifact, Path(view.name), nbits, weights, log)
        network, _parser, plugin_layers = parse(trt, builder, logger, model, mosaic_nodes)
    with phases("configuring profiles and targets"):
        config = builder.create_builder_config()  # the builder's, not the model's
        blocks = max(1, math.ceil(max_context / manifest["ltm_block"]))
        shapes = add_profiles(builder, network, config, max_batch, max_chunk, blocks)
        precision = set_precision(trt, config, manifest["dtype"])
        targets, cache_path = set_targets(tensorrt, config, target, timing_cache, output)
    with phases(f"building the engine ({', '.join(targets)})"):
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise BackendError("TensorRT could not build the engine: see its log above")
        engine = bytes(engine)
        missing = [name for name in plugins if name.encode() not in engine]
        if missing:
            raise BackendError(f"the engine lacks the plugins {missing}: rebuild with --debug")
    with phases("writing the engine and its manifest"), atomic_dir(output) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine)
        if cache_path is not None:  # the default cache lives in the engine directory
            in_output = cache_path.resolve().parent == output.resolve()
            target_cache = tmp / cache_path.name if in_output else cache_path
            target_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
        result = engine_manifest(
            tensorrt=tensorrt, targets=targets, plugins=plugins, artifact=artifact, graph=graph,
            manifest=manifest | ({"quantization": {"weights": "fp8"}} if weights else {}),
            model_config=model_config, precision=precision,
            limits=dict(max_batch=max_batch, max_context=max_context, max_chunk=max_chunk),
            shapes=shapes, plugin_layers=len(plugin_layers), engine_bytes=len(engine),
            cache_path=cache_path, elapsed=phases.elapsed,
        )  # fmt: skip
        (tmp / BUILD_MANIFEST).write_text(json.dumps(result, indent=2) + "\n")
    log(f"engine: {output / ENGINE_FILE} ({len(engine) / 2**20:.1f} MiB, {phases.elapsed:.1f} s)")
    return result


def check_weights_option(weights: str | None, manifest: dict, graph: onnx.ModelProto) -> int:
    """--weights fp8 takes an artifact of fp weights. Returns the graph's MatMulNBits count."""
    nbits = sum(node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN
                for node in graph.graph.node)  # fmt: skip
    if weights not in (None, "fp8"):
        raise InputError(f"--weights {weights}: the engine quantizes weights to fp8 only")
    if weights and nbits:
        raise InputError(
            f"--weights {weights}: the artifact's weights are already quantized "
            f"({manifest['quantization']['weights']}): build from an artifact of fp weights"
        )
    return nbits


def model_to_parse(artifact: Path, view_dir: Path, nbits: int, weights: str | None, log) -> Path:
    """The ONNX file TensorRT parses: the artifact's, or its Q/DQ view in view_dir (opset 21)
    where its weights are quantized (MatMulNBits) or are to be (--weights fp8)."""
    model = artifact / MODEL_FILE
    if nbits:
        log(f"{nbits} MatMulNBits weights parsed as Q/DQ (opset 21 view of the artifact)")
        return qdq_model(model, view_dir)
    if weights == "fp8":
        log("weight MatMuls quantized to FP8 and parsed as Q/DQ (opset 21 view)")
        return qdq_model(model, view_dir, fp8_weights=True)
    return model


def engine_manifest(
    *, tensorrt, targets, plugins, artifact, graph, manifest, model_config, precision, limits,
    shapes, plugin_layers, engine_bytes, cache_path, elapsed,
) -> dict:  # fmt: skip
    """What build_manifest.json records: how, from what and for what the engine was built."""
    return {
        "format": ENGINE_FORMAT,
        "mosaicrt_version": __version__,
        "tensorrt_flavour": tensorrt.flavour,
        "tensorrt_version": tensorrt.version,
        "cuda": cuda_version(tensorrt.flavour),
        "targets": targets,
        "plugins": [
            {"name": name, "namespace": DOMAIN, "version": PLUGIN_VERSION} for name in plugins
        ],
        "plugin_source_sha256": sha256(*plugin_sources()),
        "onnx_sha256": sha256(*onnx_files(artifact, graph)),
        "artifact": str(artifact.resolve()),
        "source_checkpoint": manifest.get("source_checkpoint"),
        "dtype": manifest["dtype"],
        "state_dtype": manifest["state_dtype"],
        "quantization": quantization_label(manifest),
        "precision_flags": precision,
        "last_only": manifest["last_only"],
        "ltm_block": manifest["ltm_block"],
        **limits,
        "profiles": shapes,
        "plugin_layers": plugin_layers,
        "engine_file": ENGINE_FILE,
        "engine_bytes": engine_bytes,
        "timing_cache": str(cache_path) if cache_path else None,
        "build_time_s": round(elapsed, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": model_config.to_dict(),
    }


def check_limits(max_batch: int, max_context: int, max_chunk: int, target: str | None) -> None:
    for flag, value in (("max-batch", max_batch), ("max-context", max_context),
                        ("max-chunk", max_chunk)):  # fmt: skip
        if value < 1:
            raise InputError(f"--{flag} must be >= 1, got {value}")
    if max_chunk < 2:
        raise InputError("--max-chunk must be >= 2: profile 1 prefills chunks of 2 or more")
    if target and target.lower() not in RTX_TARGETS:
        raise InputError(
            f"unknown --target {target!r}: TensorRT-RTX builds for {', '.join(RTX_TARGETS)} "
            "(no Hopper: on an H100/H200 build with full TensorRT, without --target)"
        )


def parse(trt, builder, logger, model: Path, mosaic_nodes: list[str]) -> tuple:
    """A strongly typed network from the ONNX file, every mosaic node a plugin layer: (network,
    its parser, which must outlive it, plugin layer names)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise BackendError(
            f"TensorRT cannot parse {model}: {errors}. Re-export it with `mosaicrt export`"
        )
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugin_layers = [layer.name for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    if len(plugin_layers) != len(mosaic_nodes):
        raise BackendError(
            f"{len(mosaic_nodes)} mosaic nodes but {len(plugin_layers)} plugin layers: this "
            "TensorRT parser inlined the ops' ONNX functions instead of using the plugins; "
            "use TensorRT >= 10.15 or TensorRT-RTX >= 1.0"
        )
    return network, parser, plugin_layers  # the network refers to the parser's weights


def add_profiles(builder, network, config, max_batch: int, max_chunk: int, blocks: int) -> dict:
    """Profile 0 decodes (chunk 1), profile 1 prefills (chunks 2..max_chunk); returns the
    smallest and largest shape of every input per profile."""
    shapes: dict[str, dict] = {}
    for label, (lo, hi) in {"decode": (1, 1), "prefill": (2, max_chunk)}.items():
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            smallest = profile_shape(tensor.name, tensor.shape, 1, lo, 1)
            largest = profile_shape(tensor.name, tensor.shape, max_batch, hi, blocks)
            profile.set_shape(tensor.name, smallest, largest, largest)
            shapes.setdefault(label, {})[tensor.name] = [list(smallest), list(largest)]
        config.add_optimization_profile(profile)
    return shapes


def set_precision(trt, config, dtype: str) -> dict:
    """Precision comes from the ONNX types; TF32 (on by default) would round an fp32 artifact's
    products to 10-bit mantissas, so it is cleared for fp32. TensorRT-RTX engines require
    application-provided memory, which its stream capture needs (the backend captures decode
    steps). Returns the flags as built."""
    if dtype == "float32":
        config.clear_flag(trt.BuilderFlag.TF32)
    flags = {"strongly_typed": True, "tf32": bool(config.get_flag(trt.BuilderFlag.TF32))}
    if hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
        flags["require_user_allocation"] = True
    return flags


def set_targets(tensorrt, config, target: str | None, timing_cache, output: Path) -> tuple:
    """TensorRT-RTX: the --target architecture (ahead of time, no timing cache, which would
    query a GPU); full TensorRT: the local GPU, with a timing cache. Returns (targets, cache)."""
    trt = tensorrt.module
    if tensorrt.flavour == "tensorrt_rtx":
        if not target:
            return ["TensorRT-RTX default targets"], None
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
        return [target.lower()], None
    cache_path = Path(timing_cache) if timing_cache else output / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return ["local GPU"], cache_path


def read_build_manifest(engine_dir: str | Path) -> dict:
    """An engine directory's build manifest, refused with the fix if it is not one."""
    path = Path(engine_dir) / BUILD_MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{engine_dir} is not a TensorRT engine directory (no {BUILD_MANIFEST}): build one "
            f"with `mosaicrt build ARTIFACT_DIR -o {engine_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): rebuild the engine") from None
    if manifest.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path} is not a mosaicrt engine manifest: rebuild the engine")
    return manifest


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / BUILD_MANIFEST).is_file()


def cuda_version(flavour: str) -> str | None:
    """The CUDA major version the TensorRT wheels were built for (from the package names)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if name.startswith(f"{flavour}_cu") and name[len(flavour) + 3 :].split("_")[0].isdigit():
            return name[len(flavour) + 3 :].split("_")[0]
    return None

"""TensorRT plugins and engine builds. TensorRT-RTX builds engines ahead of time on this CPU, so the
whole build path runs here; running an engine needs a GPU and is tested where there is one."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime", reason="needs the [onnx] extra to export artifacts")
from helpers import mosaicrt  # noqa: E402

import mosaicrt.plugins.tensorrt as P  # noqa: E402
from mosaicrt.errors import BackendError  # noqa: E402
from mosaicrt.export.artifact import export_artifact  # noqa: E402
from mosaicrt.model import preset, random_model, save_checkpoint  # noqa: E402
from mosaicrt.ops import DOMAIN, plugin_specs  # noqa: E402
from mosaicrt.ops.geometry import NO_WINDOW  # noqa: E402
from mosaicrt.runtime.generator import RunLimits, generate  # noqa: E402
from mosaicrt.runtime.sampling import SamplingParams  # noqa: E402

try:
    TENSORRT = P.load_tensorrt()
except BackendError:
    pytest.skip("needs TensorRT-RTX ([tensorrt] extra) or full TensorRT", allow_module_level=True)
trt, FLAVOUR = TENSORRT.module, TENSORRT.flavour
MosaicPlugin, MosaicPluginCreator = P.plugin_classes()
SPECS = plugin_specs()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny checkpoint exported in fp32 and fp16."""
    root = tmp_path_factory.mktemp("trt")
    save_checkpoint(random_model(preset("tiny")), root / "ckpt")
    for dtype in ("float32", "float16"):
        export_artifact(root / "ckpt", root / dtype, dtype=dtype, max_context=512)
    return root


@pytest.fixture(scope="module")
def engine(artifacts, tmp_path_factory):
    """The fp32 artifact's sm86 engine, built once for the module (by build.py, as a user does:
    the build test reads its output)."""
    out = tmp_path_factory.mktemp("engine") / "sm86"
    proc = build(artifacts / "float32", "-o", out, "--target", "sm86", "--max-batch", "4",
                 "--max-chunk", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def build(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_build_py_makes_an_engine_with_both_plugins(cli, artifacts, engine, tmp_path, dtype):
    if dtype == "float32":
        out, stdout = engine
    else:
        out = tmp_path / "engine"
        result = cli("build", artifacts / dtype, "-o", out, "--target", "sm86",
                     "--max-batch", "4", "--max-chunk", "64")  # fmt: skip
        assert result.returncode == 0, result.stderr
        stdout = result.stdout
    for phase in range(1, 7):
        assert f"[{phase}/6]" in stdout
    engine_bytes = (out / "model.engine").read_bytes()
    assert b"GatedKeyScan" in engine_bytes and b"AssociativeMemory" in engine_bytes
    manifest = json.loads((out / "build_manifest.json").read_text())
    nodes = [
        n for n in onnx.load(artifacts / dtype / "model.onnx").graph.node if n.domain == DOMAIN
    ]
    assert manifest["plugin_layers"] == len(nodes) == 6  # 2 layers x (scan + STM + LTM)
    assert manifest["tensorrt_flavour"] == FLAVOUR
    assert manifest["targets"] == ["sm86"]
    assert {p["name"] for p in manifest["plugins"]} == {"GatedKeyScan", "AssociativeMemory"}
    assert manifest["dtype"] == dtype
    # TF32 (on by default) is cleared for fp32 artifacts; the manifest says how it was built.
    assert manifest["precision_flags"]["tf32"] is (dtype != "float32")
    assert manifest["precision_flags"]["strongly_typed"] is True
    assert len(manifest["onnx_sha256"]) == len(manifest["plugin_source_sha256"]) == 64
    assert manifest["profiles"]["decode"]["input_ids"] == [[1, 1], [4, 1]]
    assert manifest["profiles"]["prefill"]["input_ids"] == [[1, 2], [4, 64]]
    ltm = manifest["profiles"]["decode"]["past.0.ltm.keys"]
    assert ltm[1][0] == 4 * 4  # a pool for 4 rows of 512 tokens in blocks of 128
    assert manifest["profiles"]["decode"]["ltm_blocks"] == [[1, 1], [4, 4]]


@pytest.mark.parametrize(
    "store, op",
    [("int8", "AssociativeMemoryInt8"), ("float8_e4m3fn", "AssociativeMemoryFp8")],
)
def test_quantized_artifact_builds_with_qdq_weights_and_scaled_store_plugins(
    cli, artifacts, tmp_path, store, op
):
    """int4 weights + int8 or fp8 stores: the MatMulNBits weights are parsed from the artifact's
    Q/DQ view (INT4 constants into DequantizeLinear), the stores reach AssociativeMemoryInt8 /
    -Fp8 plugins as int8 tensors (fp8: the bits of e4m3 values) with fp32 scales, and
    TensorRT-RTX builds the engine."""
    from mosaicrt.export.quantize import WeightQuantization, qdq_model

    quant = WeightQuantization("int4", 32)
    artifact = export_artifact(artifacts / "ckpt", tmp_path / "q", max_context=512,
                               quantize=quant, store_dtype=store)  # fmt: skip
    out = tmp_path / "engine"
    result = cli("build", artifact, "-o", out, "--target", "sm86", "--max-batch", "4",
                 "--max-chunk", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MatMulNBits weights parsed as Q/DQ" in result.stdout
    manifest = json.loads((out / "build_manifest.json").read_text())
    label = "int8" if store == "int8" else "fp8"
    assert manifest["quantization"] == f"int4 weights + {label} stores"
    assert {p["name"] for p in manifest["plugins"]} == {"GatedKeyScan", op}
    assert manifest["plugin_layers"] == 6
    assert op.encode() in (out / "model.engine").read_bytes()

    P.register()
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    )
    parser = trt.OnnxParser(network, logger)
    view = tmp_path / "view"
    view.mkdir()
    assert parser.parse_from_file(str(qdq_model(artifact / "model.onnx", view)))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dequantize = [layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE]
    assert len(dequantize) == 2 * 4 + 1  # per layer: qkv, output, gate-up, down; then lm_head
    assert all(layer.get_input(0).dtype == trt.DataType.INT4 for layer in dequantize)
    memory = next(layer for layer in layers if layer.name.endswith(f"ltm/{op}"))
    assert memory.type == trt.LayerType.PLUGIN_V3
    types = [memory.get_input(i).dtype for i in range(memory.num_inputs)]
    assert types[2:4] == [trt.DataType.INT8] * 2
    assert types[12:] == [trt.DataType.FLOAT] * 2


def test_fp8_weights_build_as_fp8_qdq(cli, artifacts, tmp_path):
    """--weights fp8 on an fp32 artifact: every weight MatMul reaches TensorRT as an FP8 constant
    into a DEQUANTIZE layer, TensorRT-RTX builds the engine for sm89 (fp8), the manifest says
    so; an artifact whose weights are quantized already is refused in one line, exit 2."""
    from mosaicrt.export.quantize import WeightQuantization, qdq_model

    out = tmp_path / "engine"
    result = cli("build", artifacts / "float32", "-o", out, "--target", "sm89", "--weights",
                 "fp8", "--max-batch", "2", "--max-chunk", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "quantized to FP8" in result.stdout
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert manifest["quantization"] == "fp8 weights" and manifest["targets"] == ["sm89"]
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    )
    view = tmp_path / "view"
    view.mkdir()
    model = qdq_model(artifacts / "float32" / "model.onnx", view, fp8_weights=True)
    assert trt.OnnxParser(network, logger).parse_from_file(str(model))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dequantize = [layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE]
    assert len(dequantize) == 2 * 4 + 1  # per layer: qkv, output, gate-up, down; then lm_head
    assert all(layer.get_input(0).dtype == trt.DataType.FP8 for layer in dequantize)

    quantized = export_artifact(artifacts / "ckpt", tmp_path / "q", max_context=512,
                                quantize=WeightQuantization("int8", 32))  # fmt: skip
    result = cli("build", quantized, "-o", tmp_path / "no", "--weights", "fp8")
    assert result.returncode == 2 and "already quantized (int8)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_mosaic_nodes_parse_as_plugin_layers(artifacts):
    """Every mosaic node is a PLUGIN_V3 layer of the parsed network, with the shapes of the op."""
    P.register()
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    )
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(artifacts / "float32" / "model.onnx"))
    layers = {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}
    for layer in range(2):
        scan = layers[f"/model/layers.{layer}/GatedKeyScan"]
        assert scan.type == trt.LayerType.PLUGIN_V3
        assert tuple(scan.get_output(0).shape) == (-1, -1, 8, 16)  # keys of both memories
        assert tuple(scan.get_output(2).shape) == (-1, 8)  # running max
        for kind in ("stm", "ltm"):
            memory = layers[f"/model/layers.{layer}/{kind}/AssociativeMemory"]
            assert memory.type == trt.LayerType.PLUGIN_V3
            assert tuple(memory.get_output(0).shape) == (-1, -1, 4, 16)
            assert memory.get_output(0).dtype == trt.DataType.FLOAT


def test_plugin_fields_survive_serialization():
    """What the engine stores (get_fields_to_serialize) rebuilds the same plugin at runtime."""
    creator = MosaicPluginCreator(SPECS["AssociativeMemory"])
    fields = {"window": NO_WINDOW, "delay": 256}
    collection, _arrays = P.encode_fields(creator.spec, fields)
    plugin = creator.create_plugin("m", collection, None)
    again = creator.create_plugin("m", plugin.get_fields_to_serialize(), None)
    assert again.fields == fields
    assert (again.plugin_name, again.plugin_namespace, again.plugin_version) == (
        "AssociativeMemory",
        "mosaic",
        "1",
    )
    scan = MosaicPluginCreator(SPECS["GatedKeyScan"])
    collection, _arrays = P.encode_fields(scan.spec, {"eps": 1e-6})
    eps = scan.create_plugin("s", collection, None).fields["eps"]
    assert eps == pytest.approx(1e-6, rel=1e-7)
    # The parser hands ONNX INT attributes over as int32.
    parsed = trt.PluginFieldCollection(
        [
            trt.PluginField("window", np.array([6], np.int32), trt.PluginFieldType.INT32),
            trt.PluginField("delay", np.array([1], np.int32), trt.PluginFieldType.INT32),
        ]
    )
    assert creator.create_plugin("m", parsed, None).fields == {"window": 6, "delay": 1}
    with pytest.raises(BackendError, match="missing attributes"):
        creator.create_plugin("m", trt.PluginFieldCollection([]), None)


def descs(*types):
    out = []
    for t in types:
        d = trt.DynamicPluginTensorDesc()
        d.desc.type, d.desc.format = t, trt.TensorFormat.LINEAR
        out.append(d)
    return out


def test_plugin_formats():
    """Linear fp32 everywhere but the stores (fp32/fp16/bf16, keys and values alike), int64
    positions and a bool mask; outputs fp32."""
    F32, F16, BF16, I64 = (
        trt.DataType.FLOAT,
        trt.DataType.HALF,
        trt.DataType.BF16,
        trt.DataType.INT64,
    )
    memory = MosaicPlugin(SPECS["AssociativeMemory"], {"window": NO_WINDOW, "delay": 4})
    # q, t, store_k, store_v, store_blocks, store_tau, new_k, new_v, new_tau, beta0, beta1,
    # alpha -> y
    for store in (F32, F16, BF16):
        io = descs(F32, I64, store, store, I64, I64, F32, F32, I64, F32, F32, F32, F32)
        assert all(memory.supports_format_combination(pos, io, 12) for pos in range(13))
    io = descs(F32, I64, F16, BF16, I64, I64, F32, F32, I64, F32, F32, F32, F32)
    assert not memory.supports_format_combination(3, io, 12)  # values must match keys
    io = descs(F32, I64, F32, F32, F32, I64, F32, F32, I64, F32, F32, F32, F32)
    assert not memory.supports_format_combination(4, io, 12)  # the block table is int64
    io = descs(F16, I64, F32, F32, I64, I64, F32, F32, I64, F32, F32, F32, F32)
    assert not memory.supports_format_combination(0, io, 12)  # queries are fp32
    io = descs(F32, I64, F32, F32, I64, I64, F32, F32, I64, F32, F32, F32, F16)
    assert not memory.supports_format_combination(12, io, 12)  # output fp32
    # AssociativeMemoryInt8: int8 stores, then their fp32 scales.
    int8 = MosaicPlugin(SPECS["AssociativeMemoryInt8"], {"window": NO_WINDOW, "delay": 4})
    I8 = trt.DataType.INT8
    io = descs(F32, I64, I8, I8, I64, I64, F32, F32, I64, F32, F32, F32, F32, F32, F32)
    assert all(int8.supports_format_combination(pos, io, 14) for pos in range(15))
    io = descs(F32, I64, F32, F32, I64, I64, F32, F32, I64, F32, F32, F32, F32, F32, F32)
    assert not int8.supports_format_combination(2, io, 14)  # its stores are int8
    io = descs(F32, I64, I8, I8, I64, I64, F32, F32, I64, F32, F32, F32, F16, F32, F32)
    assert not int8.supports_format_combination(12, io, 14)  # scales fp32
    scan = MosaicPlugin(SPECS["GatedKeyScan"], {"eps": 1e-6})
    io = descs(F32, F32, F32, trt.DataType.BOOL, F32, F32, F32, F32, F32)
    assert all(scan.supports_format_combination(pos, io, 6) for pos in range(9))
    io[0].desc.format = trt.TensorFormat.HWC8
    assert not scan.supports_format_combination(0, io, 6)
    assert scan.get_output_data_types([F32] * 6) == [F32] * 3


def test_build_errors_are_one_line_with_a_fix(cli, artifacts, tmp_path):
    proc = cli("build", artifacts / "float32", "-o", tmp_path / "e", "--target", "sm90")
    assert proc.returncode == 2 and "unknown --target 'sm90'" in proc.stderr
    assert "full TensorRT" in proc.stderr
    proc = cli("build", artifacts / "ckpt", "-o", tmp_path / "e")
    assert proc.returncode == 2 and "not an ONNX artifact" in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (artifacts / "float32").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"not a protobuf")
    proc = cli("build", broken, "-o", tmp_path / "e")
    assert proc.returncode == 2 and "cannot parse" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_tensorrt_is_a_clear_error(artifacts, tmp_path):
    """With neither TensorRT nor TensorRT-RTX importable (shadowed by modules that fail)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("tensorrt", "tensorrt_rtx"):
        (shadow / f"{name}.py").write_text(f"raise ImportError('no {name} here')\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), str(artifacts / "float32"), "-o",
         str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": f"{shadow}:{ROOT}"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "TensorRT is not installed" in proc.stderr and "mosaicrt[tensorrt]" in proc.stderr


def built_engine(artifact: Path, output: Path, target: str | None = "sm86") -> Path:
    args = [artifact, "-o", output, "--max-batch", "4", "--max-chunk", "64"]
    proc = build(*args, *(["--target", target] if target else []))
    assert proc.returncode == 0, proc.stderr
    return output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_engine_without_a_gpu_is_a_clear_error(cli, engine):
    proc = cli("generate", engine[0], "--prompt", "hi")  # auto: an engine dir -> tensorrt
    assert proc.returncode == 2
    assert f"built with {FLAVOUR} {trt.__version__} for sm86" in proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--backend onnxruntime" in proc.stderr


def test_engine_from_another_tensorrt_is_refused(cli, artifacts, engine, tmp_path):
    import shutil

    other = shutil.copytree(engine[0], tmp_path / "engine")
    manifest = json.loads((other / "build_manifest.json").read_text())
    manifest["tensorrt_version"] = "0.9.0"
    (other / "build_manifest.json").write_text(json.dumps(manifest))
    proc = cli("generate", other, "--backend", "tensorrt", "--prompt", "hi")
    assert proc.returncode == 2
    assert f"built with {FLAVOUR} 0.9.0 for sm86; this process has {FLAVOUR}" in proc.stderr
    assert "rebuild it here: `mosaicrt build" in proc.stderr
    proc = cli("generate", artifacts / "float32", "--backend", "tensorrt", "--prompt", "x")
    assert proc.returncode == 2 and "build an engine from it" in proc.stderr


def local_target() -> str | None:
    """The --target for this GPU, or a reason why no engine can run here."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if FLAVOUR == "tensorrt":
        return ""  # full TensorRT builds for the local GPU
    here = f"sm{major}{minor}"
    return here if here in ("sm75", "sm80", "sm86", "sm89", "sm120") else None


@pytest.fixture(scope="module")
def local_engine(artifacts, tmp_path_factory):
    """local_engine(dtype): the artifact's engine for this GPU, built once per dtype."""
    built = {}

    def get(dtype: str) -> Path:
        if dtype not in built:
            out = tmp_path_factory.mktemp("local") / dtype
            built[dtype] = built_engine(artifacts / dtype, out, local_target() or None)
        return built[dtype]

    return get


RUNS_ENGINES = pytest.mark.skipif(
    local_target() is None,
    reason="running an engine needs a CUDA GPU with a TensorRT that targets it (full TensorRT, "
    "or TensorRT-RTX on sm75/80/86/89/120, no Hopper); this machine has none",
)


@pytest.mark.gpu
@RUNS_ENGINES
def test_fp16_engine_matches_onnxruntime_through_polygraphy(artifacts, local_engine):
    """mosaicrt check: ONNX Runtime, the torch reference and the engine on the same real decode
    states, compared by Polygraphy's Comparator within 1e-3 (fp16 weights and stores)."""
    engine = local_engine("float16")
    proc = mosaicrt("check", artifacts / "float16", "--engine", engine, "--atol", "1e-3",
                        "--rtol", "1e-2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout and "tensorrt" in proc.stdout


@pytest.mark.gpu
@RUNS_ENGINES
def test_engine_greedy_generation_equals_the_reference(artifacts, local_engine, tmp_path):
    engine = local_engine("float32")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [5, 8, 13, 21, 34, 55, 89]}\n')
    outputs = []
    for model, backend in ((engine, "tensorrt"), (artifacts / "ckpt", "torch")):
        proc = mosaicrt("generate", model, "--backend", backend, "--input", prompts,
                            "--max-new-tokens", "20", "--max-context", "256")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]


@pytest.mark.gpu
@RUNS_ENGINES
def test_cuda_graph_decode_equals_eager_engine_runs(local_engine):
    """Decode steps replayed from the captured graph give the eager engine's logits, with rows
    joining and leaving a running batch (continuous batching resets rows of the same state)."""
    from mosaicrt.runtime.trt_backend import TrtBackend

    engine = local_engine("float32")
    prompts = [[1 + i] * (2 + 3 * i) for i in range(5)]
    limits = RunLimits(max_batch=2, max_context=64, prefill_chunk=4)
    runs = [
        generate(TrtBackend(engine, cuda_graphs=graphs), prompts, 12, SamplingParams(), limits)
        for graphs in (True, False)
    ]
    assert runs[0] == runs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_device_pointers_become_tensors_without_a_copy():
    """What enqueue does with TensorRT's pointers: a view of the same memory, bf16 included."""
    import torch

    types = [(torch.float32, trt.DataType.FLOAT), (torch.bfloat16, trt.DataType.BF16),
             (torch.int64, trt.DataType.INT64)]  # fmt: skip
    for dtype, trt_type in types:
        x = torch.arange(24, device="cuda").reshape(2, 3, 4).to(dtype)
        desc = trt.PluginTensorDesc()
        desc.type, desc.dims = trt_type, trt.Dims(list(x.shape))
        view = P.device_tensor(x.data_ptr(), desc)
        assert view.dtype == dtype and view.data_ptr() == x.data_ptr() and torch.equal(view, x)


def test_plugin_fields_round_trip_through_a_build(artifacts, tmp_path, monkeypatch):
    """The attributes the parser hands to the plugins of a real TensorRT-RTX build, and what
    they serialize into the engine: the LTM's "no window" survives the parser's int32."""
    from mosaicrt.plugins.engine import build_engine

    made = []
    create = MosaicPluginCreator.create_plugin

    def recording(self, name, fields, phase):
        plugin = create(self, name, fields, phase)
        made.append(plugin)
        return plugin

    monkeypatch.setattr(MosaicPluginCreator, "create_plugin", recording)
    build_engine(artifacts / "float32", tmp_path / "e", max_batch=2, max_chunk=8, target="sm86",
                 log=lambda *_: None)  # fmt: skip
    config = preset("tiny")
    memories = sorted(
        (p.fields["window"], p.fields["delay"]) for p in made if p.spec.name == "AssociativeMemory"
    )
    assert memories == [(config.stm_window, 1)] * 2 + [(NO_WINDOW, config.ltm_delay)] * 2
    for plugin in made:
        assert plugin.phase == trt.TensorRTPhase.BUILD
        assert P.decode_fields(plugin.spec, plugin.get_fields_to_serialize()) == plugin.fields


def test_plugins_made_for_the_build_write_zeros(artifacts):
    """While the builder times tactics it runs the plugins on made-up inputs: a BUILD-phase
    plugin writes zeros and returns; a RUNTIME-phase one runs the op (the kernels, interpreted
    on a CPU), on the same tensors."""
    import torch

    rng = torch.Generator().manual_seed(0)
    B, C, H, hs = 2, 3, 2, 16
    valid = torch.ones(B, C, dtype=torch.bool)
    inputs = [torch.randn(B, C, H, hs, generator=rng), torch.randn(B, C, H, generator=rng),
              -torch.rand(B, C, H, generator=rng), valid, torch.randn(B, H, hs, generator=rng),
              torch.zeros(B, H)]  # fmt: skip
    spec = SPECS["GatedKeyScan"]
    for phase in (trt.TensorRTPhase.BUILD, trt.TensorRTPhase.RUNTIME):
        outputs = [torch.full(inputs[i].shape, float("nan")) for i in spec.outputs]
        MosaicPlugin(spec, {"eps": 1e-6}, phase).run(inputs, outputs)
        if phase == trt.TensorRTPhase.BUILD:
            assert all(bool((out == 0).all()) for out in outputs)
        else:
            assert all(bool(out.isfinite().all()) for out in outputs)
            assert outputs[0].abs().sum() > 0

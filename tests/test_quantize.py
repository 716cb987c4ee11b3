"""Quantized artifacts: weight-only int4/int8 MatMulNBits and int8 stores, each against a reference
that dequantizes first and computes in fp32, and the demo model's agreement with its fp32 self."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

ort = pytest.importorskip("onnxruntime", reason="quantized artifacts run in ONNX Runtime")

from mosaicrt.errors import BackendError  # noqa: E402
from mosaicrt.export import io_spec  # noqa: E402
from mosaicrt.export.artifact import export_artifact  # noqa: E402
from mosaicrt.export.quantize import (  # noqa: E402
    WeightQuantization,
    dequantize_weight,
    pack_int4,
    qdq_model,
    quantize_weight,
)
from mosaicrt.model.checkpoint import load_model  # noqa: E402
from mosaicrt.model.state import DecodeState  # noqa: E402
from mosaicrt.ops.associative_memory.reference import dequantize_pairs, quantize_pairs  # noqa: E402
from mosaicrt.runtime.ort_backend import OrtBackend, session_options  # noqa: E402

# int8 / fp8 stores vs the reference reading the pairs they stand for: the same retrieval up to
# fp32 rounding.
ATOL_SCALED_STORES = 1e-4
# MatMulNBits vs MatMul of the dequantized weights, relative to the largest logit: at accuracy
# level 0 the same fp32 products (measured: equal); at level 4 (the default) the activations are
# rounded to int8 per block too, 1/254 of each block's largest value (measured: 0.027-0.039).
RTOL = {0: 1e-5, 4: 0.05}


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("block", [32, 128])
def test_weight_quantization_round_trips_within_half_a_scale(scheme, block):
    """Half a scale, except at the top of the range: the block's largest magnitude maps to
    -2^(bits-1), so a value of the other sign beyond (2^(bits-1) - 1) scales is clipped."""
    weight_t = np.random.default_rng(0).standard_normal((200, 48)).astype(np.float32)  # (K, N)
    quant = WeightQuantization(scheme, block)
    q = quantize_weight(weight_t, quant)
    back = dequantize_weight(q["packed"], q["scales"], 200, quant.bits, block)
    scale = np.repeat(q["scales"].T, block, axis=0)[:200]  # (K, N): each weight's block scale
    assert back.shape == weight_t.shape
    error, step = np.abs(back - weight_t), np.abs(scale) * (1 + 1e-5)
    top = 2 ** (quant.bits - 1) - 1
    inside = weight_t / scale <= top + 0.5  # not clipped (the scale carries the sign)
    assert (error[inside] <= step[inside] / 2).all() and (error <= step).all()
    assert inside.mean() > 0.9


def dequantized_graph(artifact) -> onnx.ModelProto:
    """The artifact's graph with every MatMulNBits replaced by a MatMul of its weights
    dequantized in numpy: the dequantize-then-compute reference."""
    model = onnx.load(str(artifact / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        packed, scales = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
        weight = dequantize_weight(packed, scales, attrs["K"], attrs["bits"], attrs["block_size"])
        name = node.input[1] + ".dequantized"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        matmul = onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output))
        model.graph.node.remove(node)
        model.graph.node.insert(i, matmul)
    return model


def first_step_feeds(backend: OrtBackend, lengths: list[int], seed: int) -> dict:
    """The step graph's feeds for a first chunk of 40 random tokens on len(lengths) fresh rows."""
    state = backend.new_state(len(lengths), 40)
    ids = torch.randint(0, backend.config.vocab_size, (len(lengths), 40),
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    feeds = {"input_ids": ids.numpy(), "lengths": np.array(lengths), "positions": state.pos.copy()}
    return (
        feeds | state.small | state.store_feeds(backend.readable_blocks(state.pos, 40), np.asarray)
    )


def logits_of(sources: list, feeds: dict, options=None) -> list[np.ndarray]:
    """The logits of each graph (a path or serialized bytes) on the same feeds, ONNX Runtime CPU."""
    options = options or session_options()
    return [
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(
            ["logits"], feeds
        )[0]
        for source in sources
    ]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_step_graph_equals_dequantize_then_compute(tiny_ckpt, tmp_path, scheme, level):
    quant = WeightQuantization(scheme, 32, accuracy_level=level)
    artifact = export_artifact(tiny_ckpt, tmp_path / scheme, max_context=64, quantize=quant)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["quantization"]["weights"] == scheme
    model = onnx.load(str(artifact / "model.onnx"))
    assert {n.op_type for n in model.graph.node if n.domain == "com.microsoft"} == {"MatMulNBits"}
    assert "MatMul" not in {n.op_type for n in model.graph.node}  # every weight MatMul
    backend = OrtBackend(artifact, device="cpu", ort_ops="functions")
    feeds = first_step_feeds(backend, [40, 33], seed=0)
    [want] = logits_of([dequantized_graph(artifact).SerializeToString()], feeds)
    got = backend.session.run(["logits"], feeds)[0]
    assert np.abs(got - want).max() <= RTOL[level] * np.abs(want).max()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_qdq_view_equals_dequantize_then_compute(tiny_ckpt, tmp_path, scheme):
    """The TensorRT view of a quantized artifact (INT4/INT8 constants, blocked DequantizeLinear,
    MatMul; opset 21), run by ONNX Runtime, computes the dequantize-then-compute reference."""
    quant = WeightQuantization(scheme, 32)
    artifact = export_artifact(tiny_ckpt, tmp_path / scheme, max_context=64, quantize=quant)
    view_dir = tmp_path / "view"
    view_dir.mkdir()
    view = qdq_model(artifact / "model.onnx", view_dir)
    model = onnx.load(str(view))
    onnx.checker.check_model(model)
    types = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" not in types and types.count("DequantizeLinear") == 2 * 4 + 1
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    weight = next(t for t in model.graph.initializer if t.name.endswith(".qdq") and t.dims[0] > 1)
    want_type = onnx.TensorProto.INT4 if scheme == "int4" else onnx.TensorProto.INT8
    assert weight.data_type == want_type
    options = session_options()
    # ONNX Runtime fuses DQ + MatMul into MatMulNBits, by default with int8 activations.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    feeds = first_step_feeds(OrtBackend(artifact, device="cpu", ort_ops="functions"), [40, 29], 1)
    want, got = logits_of([dequantized_graph(artifact).SerializeToString(), str(view)], feeds,
                          options)  # fmt: skip
    assert np.abs(got - want).max() <= RTOL[0] * np.abs(want).max()


def test_fp8_view_equals_dequantize_then_compute(tiny_ckpt, tmp_path):
    """The fp8 view of an fp32 artifact (`mosaicrt build --weights fp8`: every weight MatMul as a
    FLOAT8E4M3FN constant, DequantizeLinear with a scale per column, MatMul), run by ONNX
    Runtime, computes the graph whose weights are their fp8 values; each weight within e4m3's
    rounding of the original."""
    import torch

    from mosaicrt.export.quantize import fp8_columns, read_tensor

    artifact = export_artifact(tiny_ckpt, tmp_path / "fp32", max_context=64)
    (tmp_path / "view").mkdir()
    view = qdq_model(artifact / "model.onnx", tmp_path / "view", fp8_weights=True)
    model = onnx.load(str(view))
    onnx.checker.check_model(model)
    reference = onnx.load(str(artifact / "model.onnx"))
    inits = {t.name: t for t in reference.graph.initializer}
    weight_matmuls = [n for n in reference.graph.node
                      if n.op_type == "MatMul" and n.input[1] in inits]  # fmt: skip
    types = [n.op_type for n in model.graph.node]
    assert types.count("DequantizeLinear") == len(weight_matmuls) == 2 * 4 + 1
    fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == len(weight_matmuls)
    for node in weight_matmuls:  # the reference: the same graph with the fp8 values as fp32
        tensor = inits[node.input[1]]
        weight = read_tensor(tensor, artifact)
        q, scales = fp8_columns(weight)
        values = torch.from_numpy(q).view(torch.float8_e4m3fn).float().numpy() * scales
        assert (np.abs(values - weight) <= np.abs(weight) * 2**-4 + scales * 2**-9).all()
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    feeds = first_step_feeds(OrtBackend(artifact, device="cpu", ort_ops="functions"), [40, 29], 1)
    want, got = logits_of([reference.SerializeToString(), str(view)], feeds)
    assert np.abs(got - want).max() <= RTOL[0] * np.abs(want).max()


def test_int4_packing_is_the_onnx_layout():
    """pack_int4 lays values out as ONNX's own INT4 tensors (first value in the low nibble)."""
    q = np.random.default_rng(0).integers(-8, 8, size=(5, 7)).astype(np.int8)  # odd count
    proto = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, q.shape, q.reshape(-1).tolist())
    assert pack_int4(q).tolist() == list(proto.int32_data)  # make_tensor packs into int32_data
    assert (numpy_helper.to_array(proto).astype(np.int8) == q).all()


def stored_values(state, layer: int, memory: str, field: str, store: str) -> torch.Tensor:
    """What a step graph's store (keys or values) holds, dequantized, in the reference's layout
    (B, N, H, hs): the STM ring slot for slot, the LTM pool's blocks read through the table."""
    name = io_spec.store_name(layer, memory, field)
    bits = torch.from_numpy(state.stores[name].copy())
    q = bits if store == "int8" else bits.view(torch.float8_e4m3fn)
    pairs = dequantize_pairs(q, torch.from_numpy(state.stores[name + io_spec.SCALE_SUFFIX]))
    if memory == "stm":
        return pairs.transpose(1, 2)  # (B, H, h-1, hs) -> (B, h-1, H, hs)
    table = torch.from_numpy(state.blocks.table)  # (B, NB): row b's blocks in the pool
    rows = pairs[table]  # (B, NB, H, S, hs)
    return rows.transpose(2, 3).flatten(1, 2)  # (B, NB*S, H, hs), slot tau


@pytest.mark.parametrize("store", ["int8", "float8_e4m3fn"])
def test_scaled_stores_equal_the_reference_over_the_stored_pairs(
    tiny_ckpt, tmp_path, ort_ops, store
):
    """Decode token by token, past the STM window and the LTM delay. Each step reads int8 or fp8
    pairs and their scales where the reference reads what they stand for (the graph's stored
    pairs, dequantized, put into the reference's stores after every step), and the graph stores
    what quantize_pairs makes of the reference's own pairs, but for values that fp32 rounding
    pushes across a rounding boundary (each then one step of the quantizer away)."""
    artifact = export_artifact(tiny_ckpt, tmp_path / "s", max_context=256, store_dtype=store)
    backend = OrtBackend(artifact, device="cpu", ort_ops=ort_ops)
    model = load_model(tiny_ckpt, dtype=torch.float32)
    cfg = model.config
    T = cfg.stm_window + cfg.ltm_delay + 40
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    state, ref_state = backend.new_state(2, T), DecodeState.allocate(cfg, 2, T)
    ones = torch.ones(2, dtype=torch.int64)
    worst, flipped, compared = 0.0, 0, 0
    with torch.no_grad():
        for t in range(T):
            got = backend.step(ids[:, t : t + 1], ones, state, last_only=True)
            want = model.step(ids[:, t : t + 1], ref_state, ones, last_only=True)
            worst = max(worst, float((got - want).abs().max()))
            for layer, memories in enumerate(ref_state.memories):
                for memory, st in memories.items():
                    for field, ref in (("keys", st.keys), ("values", st.vals)):
                        graph = stored_values(state, layer, memory, field, store)[:, : ref.shape[1]]
                        own = dequantize_pairs(*quantize_pairs(ref, store))
                        flipped += int(((graph - own).abs() > 1e-6).sum())
                        compared += own.numel()
                        ref.copy_(graph)
    assert worst <= ATOL_SCALED_STORES
    assert flipped <= 1e-4 * compared  # measured: 0-1 (int8), 3-4 (fp8) of 2.6M compared
    assert state.stores["past.0.ltm.keys"].dtype == np.int8  # fp8: the bits of e4m3 values
    assert state.stores["past.0.ltm.keys_scale"].dtype == np.float32


@pytest.mark.parametrize("store", ["int8", "float8_e4m3fn"])
def test_scaled_state_bytes_are_the_real_bytes(tiny_ckpt, tmp_path, store):
    from mosaicrt.bench.state_bytes import measure_state

    artifact = export_artifact(tiny_ckpt, tmp_path / "s8", max_context=600, store_dtype=store)
    backend = OrtBackend(artifact, device="cpu")
    report = measure_state(backend, 1, 600)
    assert report["store_dtype"] == store
    # A token's pairs: one-byte keys and values, and an fp32 scale per head beside each.
    cfg = backend.config
    per_token = cfg.num_layers * 2 * (cfg.memory_width + 4 * cfg.num_heads)
    assert report["ltm_bytes_per_token_formula"] == per_token
    assert report["ltm_bytes_per_token_measured"] == pytest.approx(per_token, rel=0.01)


def test_demo_model_int8_keeps_its_fp32_predictions(tmp_path):
    """int8 weights and int8 stores against the fp32 torch reference on held-out text."""
    from mosaicrt.eval.compare import compare_logits
    from mosaicrt.model.checkpoint import DEMO_DIR
    from mosaicrt.runtime.tokenizer import load_tokenizer
    from mosaicrt.runtime.torch_backend import TorchBackend
    from mosaicrt.train.corpus import load_corpus

    artifact = export_artifact(
        DEMO_DIR, tmp_path / "q8", max_context=1024, store_dtype="int8",
        quantize=WeightQuantization("int8"),
    )  # fmt: skip
    reference = TorchBackend(DEMO_DIR, device="cpu", dtype="float32")
    text = load_corpus("heldout")[:2048].decode("utf-8", errors="ignore")
    tokenizer = load_tokenizer(DEMO_DIR, reference.config.vocab_size)
    report = compare_logits(reference, OrtBackend(artifact, device="cpu"), tokenizer, text, 1024)
    assert report["positions"] >= 2000
    assert report["top1_agreement"] >= 0.97  # measured 0.99 over 8 KiB
    assert report["kl_mean"] <= 1e-3


def test_bad_quantization_options_get_one_line_and_exit_2(cli, tiny_ckpt, tmp_path):
    for args, message in (
        (["--quantize", "int3"], "--quantize must be int4 or int8"),
        (["--quantize", "int4", "--block-size", "7"], "--block-size must be one of 32, 64, 128"),
        (["--block-size", "64"], "--block-size applies to --quantize"),
        (["--store-dtype", "int4"], "--store-dtype must be fp32, fp16, bf16, int8 or fp8"),
    ):
        result = cli("export", tiny_ckpt, "-o", tmp_path / "x", *args)
        assert result.returncode == 2, args
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("rows", [1, 5, 100])  # decode (packed int8 matmul) and prefill (dense)
def test_torch_int8_linear_equals_dequantize_then_compute(rows):
    from mosaicrt.model.quantize import Int8Linear

    linear = torch.nn.Linear(96, 40, bias=False)
    q = Int8Linear(linear)
    x = torch.randn(rows, 3, 96)
    want = x @ (q.weight_int8.float() * q.scales[:, None]).T
    assert torch.allclose(q(x), want, atol=1e-5, rtol=1e-5)
    # Each weight within half a scale of the original, up to fp32 arithmetic: w / scale (< 128)
    # is rounded to 2^-18 of a scale, which can tip a tie (seen: 123.4999984 -> 124).
    error = (q.weight_int8.float() * q.scales[:, None] - linear.weight).abs()
    fp32 = q.scales[:, None] * 2**-17 + linear.weight.abs() * 2**-22
    assert bool((error <= q.scales[:, None] / 2 + fp32).all())


@pytest.mark.parametrize("rows", [1, 5])
def test_torch_int4_linear_equals_dequantize_then_compute(rows):
    """Int4Linear (PyTorch's CPU int4 layout; the CUDA one packs the same integers) computes x
    times the weights its groups and scales stand for, each within half a scale."""
    from mosaicrt.model.quantize import Int4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48, bias=False)
    q = Int4Linear(linear, group=128)
    groups = linear.weight.detach().reshape(48, 2, 128)
    scale = groups.abs().amax(-1) / 7  # (N, K / group)
    ints = torch.clamp(torch.round(groups / scale[..., None]), -8, 7)
    weight = (ints * scale[..., None]).reshape(48, 256)  # dequantized in the test
    x = torch.randn(rows, 3, 256)
    assert torch.allclose(q(x), x @ weight.T, atol=1e-4, rtol=1e-4)
    assert torch.allclose(q.dequantized(), weight, atol=1e-6)
    error = (weight - linear.weight).abs().reshape(48, 2, 128)
    assert bool((error <= scale[..., None] / 2 * (1 + 1e-5)).all())
    with pytest.raises(BackendError, match="multiple of 128"):
        Int4Linear(torch.nn.Linear(64, 48, bias=False))


def demo_agreement(device: str, dtype: str, quantize: str, anywhere: bool = False) -> dict:
    """The torch backend's demo model with `quantize` weights against itself unquantized, on
    held-out text (eval.compare's report). anywhere: on a device the backend would refuse for
    being slow there (the numbers are the same)."""
    from mosaicrt.eval.compare import compare_logits
    from mosaicrt.model.checkpoint import DEMO_DIR
    from mosaicrt.model.quantize import replace_linears
    from mosaicrt.runtime.tokenizer import load_tokenizer
    from mosaicrt.runtime.torch_backend import TorchBackend
    from mosaicrt.train.corpus import load_corpus

    reference = TorchBackend(DEMO_DIR, device=device, dtype=dtype)
    if anywhere:
        quantized = TorchBackend(DEMO_DIR, device=device, dtype=dtype)
        replace_linears(quantized.model, quantize)
    else:
        quantized = TorchBackend(DEMO_DIR, device=device, dtype=dtype, quantize=quantize)
    text = load_corpus("heldout")[:2048].decode("utf-8", errors="ignore")
    tokenizer = load_tokenizer(DEMO_DIR, reference.config.vocab_size)
    return compare_logits(reference, quantized, tokenizer, text, 1024)


def needs_gpu(capability: tuple[int, int], kernel: str):
    """A skip unless a CUDA GPU of `capability` or newer runs `kernel`."""
    ok = torch.cuda.is_available() and torch.cuda.get_device_capability() >= capability
    sm = "".join(map(str, capability))
    return pytest.mark.skipif(not ok, reason=f"{kernel} needs a CUDA GPU of sm{sm} or newer")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "quantize",
    [
        pytest.param(
            "int4", marks=needs_gpu((8, 0), "PyTorch's int4 matmul (_weight_int4pack_mm)")
        ),
        pytest.param(
            "fp8",
            marks=needs_gpu((8, 9), "PyTorch's row-wise scaled fp8 matmul (torch._scaled_mm)"),
        ),
    ],
)
def test_torch_backend_low_bit_weights_keep_the_demo_models_predictions_on_a_gpu(quantize):
    report = demo_agreement("cuda", "bfloat16", quantize)
    assert report["top1_agreement"] >= 0.9, report


@pytest.mark.parametrize("rows", [1, 5])
def test_torch_fp8_linear_equals_quantize_then_compute(rows):
    """Fp8Linear (torch._scaled_mm; it runs on the CPU too) computes the product of the fp8 rows
    of x and of W with their scales, each value within e4m3's rounding (3 mantissa bits)."""
    from mosaicrt.model.quantize import Fp8Linear, to_fp8_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False)
    q = Fp8Linear(linear)
    x = torch.randn(rows, 3, 96)
    x8, x_scale = to_fp8_rows(x.reshape(-1, 96))
    w8, w_scale = to_fp8_rows(linear.weight.detach())
    want = (x8.float() * x_scale) @ (w8.float() * w_scale).T
    assert torch.allclose(q(x).reshape(-1, 48), want, atol=1e-5, rtol=1e-5)
    error = (w8.float() * w_scale - linear.weight).abs()
    # Half a unit in e4m3's last place (3 mantissa bits; subnormals 2^-9 apart), and fp32's
    # rounding of w / scale, which can tip a tie.
    assert bool((error <= linear.weight.abs() * (2**-4 + 2**-20) + w_scale * 2**-10).all())
    with pytest.raises(BackendError, match="multiples of 16"):
        Fp8Linear(torch.nn.Linear(64, 4, bias=False))


def test_fp8_weights_keep_the_demo_models_predictions():
    """fp8 weights and activations (the layers that fit; on the CPU, where the backend would
    refuse them for speed, the numbers are those of a GPU's fp8 matmul up to summation order)."""
    report = demo_agreement("cpu", "float32", "fp8", anywhere=True)
    assert report["top1_agreement"] >= 0.95, report


def test_torch_backend_int8_weights_keep_the_demo_models_predictions():
    report = demo_agreement("cpu", "float32", "int8")
    assert report["top1_agreement"] >= 0.98 and report["kl_mean"] <= 1e-3


def test_run_options_name_the_backends_that_take_them(cli, tiny_ckpt, tmp_path):
    artifact = export_artifact(tiny_ckpt, tmp_path / "a", max_context=64)
    prompt = ["--prompt", "hi", "--max-new-tokens", "2"]
    result = cli("generate", artifact, "--quantize", "int8", *prompt)
    assert result.returncode == 2 and "mosaicrt export --quantize" in result.stderr
    for scheme in ("int4", "fp8"):  # CUDA kernels, refused on the CPU
        result = cli("generate", tiny_ckpt, "--backend", "torch", "--quantize", scheme, *prompt)
        assert result.returncode == 2 and "int8" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_check_measures_a_quantized_artifact_against_its_fp32_source(cli, tiny_ckpt, tmp_path):
    artifact = export_artifact(tiny_ckpt, tmp_path / "q", max_context=256, store_dtype="int8",
                               quantize=WeightQuantization("int8"))  # fmt: skip
    result = cli("check", artifact, "--text-bytes", "600", "--context", "128", "--min-top1", "0.5")
    assert result.returncode == 0, result.stderr
    assert "int8 weights + int8 stores onnxruntime vs fp32 torch reference" in result.stdout
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["positions"] >= 500 and 0.5 <= report["top1_agreement"] <= 1.0
    assert report["kl_mean"] >= 0.0 and report["logit_abs_error_max"] > 0.0

"""The native ONNX Runtime kernels of the mosaic ops (mosaicrt.ops.ort_library) against the ops'
ONNX function bodies, node by node, and how the backend picks between them."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the native ops are ONNX Runtime's ([onnx] extra)")

from helpers import pooled, run_node  # noqa: E402

from mosaicrt.errors import BackendError  # noqa: E402
from mosaicrt.ops.associative_memory.reference import dequantize_pairs, quantize_pairs  # noqa: E402
from mosaicrt.ops.geometry import NO_WINDOW  # noqa: E402

ATOL = 1e-5  # fp32 native kernels vs the fp32 function body on O(1) outputs


def memory_inputs(kind, chunk, store_dtype, seed, ltm_blocks=3):
    """AssociativeMemory inputs as the step graph makes them: rows before the delay, a wrapped
    ring, a long store (row 2: to the last of ltm_blocks blocks), a row with no real token; the
    stored blocks scattered over a pool larger than they need, in no order."""
    rng = np.random.default_rng(seed)
    B, H, hs, window, delay = 4, 3, 16, 6, (1 if kind == "stm" else 4)
    NB, S = (1, window - 1) if kind == "stm" else (ltm_blocks, 8)
    pos = np.array([0, 3, 17 if kind == "stm" else 17 + (NB - 3) * S, 11])
    lengths = np.array([chunk, max(chunk - 3, 1), chunk, 0])
    t = pos[:, None] + np.arange(chunk)[None, :]
    valid = np.arange(chunk)[None, :] < lengths[:, None]
    last, slot = (pos - 2)[None, :, None], np.arange(S)[None, None, :]
    tau = (
        last - np.mod(last - slot, S)
        if kind == "stm"
        else np.arange(NB)[:, None, None] * S + slot + 0 * last
    )

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    (store_k, store_v), table = pooled(
        [
            unit(NB, B, H, S, hs).astype(store_dtype),
            (3 * rng.standard_normal((NB, B, H, S, hs))).astype(store_dtype),
        ],
        rng,
    )
    inputs = {
        "q": unit(B, chunk, H, hs),
        "t": t,
        "store_k": store_k,
        "store_v": store_v,
        "store_blocks": table,
        "store_tau": np.where((tau >= 0) & (tau <= last), tau, -1),
        "new_k": unit(B, chunk, H, hs),
        "new_v": 3 * rng.standard_normal((B, chunk, H, hs)).astype(np.float32),
        "new_tau": np.where(valid & (t >= 1), t - 1, -1),
        "beta0": rng.uniform(0.5, 2, H).astype(np.float32),
        "beta1": rng.uniform(2, 8, H).astype(np.float32),  # sharp: beta(n) up to ~50
        "alpha": rng.uniform(0.2, 0.8, H).astype(np.float32),
    }
    attrs = {"window": window if kind == "stm" else NO_WINDOW, "delay": delay}
    return inputs, attrs, lengths


@pytest.mark.parametrize("store_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kind", ["stm", "ltm", "ltm-10-blocks"])
@pytest.mark.parametrize("chunk", [1, 9])
def test_associative_memory_kernel_matches_the_function(
    native_ort_library, kind, chunk, store_dtype, tmp_path
):
    """ltm-10-blocks: decode cuts 4 rows x 10 blocks into work items of 3 blocks (the last of a
    row holds 1), merged per row."""
    blocks = 10 if kind == "ltm-10-blocks" else 3
    inputs, attrs, lengths = memory_inputs(kind[:3], chunk, store_dtype, chunk, blocks)
    (want,), ran = run_node("AssociativeMemory", inputs, ["y"], profile_dir=tmp_path / "f", **attrs)
    assert "AssociativeMemory" not in ran  # inlined: its body's standard ops ran
    (got,), ran = run_node(
        "AssociativeMemory", inputs, ["y"], native_ort_library, tmp_path / "n", **attrs
    )
    assert ran == {"AssociativeMemory"}  # one native node
    for b in range(3):  # row 3 has no real token: its outputs are never read
        assert np.abs(got[b, : lengths[b]] - want[b, : lengths[b]]).max() <= ATOL
    assert np.abs(want[0, 0]).max() == 0.0 == np.abs(got[0, 0]).max()  # t = 0: nothing visible


@pytest.mark.parametrize("kind", ["stm", "ltm"])
@pytest.mark.parametrize("chunk", [1, 9])
def test_int8_store_kernel_matches_the_function_and_the_dequantized_stores(
    native_ort_library, kind, chunk, tmp_path
):
    """AssociativeMemoryInt8 = AssociativeMemory over the stores its int8 pairs and scales stand
    for: the function body and the native kernel both."""
    inputs, attrs, lengths = memory_inputs(kind, chunk, np.float32, seed=10 + chunk)
    quantized = dict(inputs)
    for field in ("store_k", "store_v"):
        q, scale = quantize_pairs(torch.from_numpy(inputs[field]))
        quantized[field], quantized[field + "_scale"] = q.numpy(), scale.numpy()
        inputs[field] = dequantize_pairs(q, scale).numpy()
    (want,), _ = run_node("AssociativeMemory", inputs, ["y"], **attrs)
    (body,), ran = run_node(
        "AssociativeMemoryInt8", quantized, ["y"], profile_dir=tmp_path / "f", **attrs
    )
    assert "AssociativeMemoryInt8" not in ran  # inlined
    (got,), ran = run_node(
        "AssociativeMemoryInt8", quantized, ["y"], native_ort_library, tmp_path / "n", **attrs
    )
    assert ran == {"AssociativeMemoryInt8"}
    for b in range(3):  # row 3 has no real token
        assert np.abs(body[b, : lengths[b]] - want[b, : lengths[b]]).max() <= ATOL
        assert np.abs(got[b, : lengths[b]] - want[b, : lengths[b]]).max() <= ATOL


def test_quantized_pairs_round_trip_within_half_a_scale():
    x = torch.randn(5, 7, 3, 64) * torch.rand(5, 7, 3, 1) * 10
    x[0, 0, 0] = 0.0  # an empty slot's pair
    q, scale = quantize_pairs(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    error = (dequantize_pairs(q, scale) - x).abs()
    assert bool((error <= scale[..., None] / 2 * (1 + 1e-6)).all())
    assert float(scale[0, 0, 0]) == 0.0 and bool((q[0, 0, 0] == 0).all())
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize("chunk", [1, 21])
def test_gated_key_scan_kernel_matches_the_function(native_ort_library, chunk, tmp_path):
    rng = np.random.default_rng(chunk)
    B, H, hs = 3, 2, 16
    lengths = np.array([chunk, max(chunk - 5, 1), 0])
    valid = np.arange(chunk)[None, :] < lengths[:, None]
    s_in = rng.standard_normal((B, H, hs)).astype(np.float32)
    s_in /= np.linalg.norm(s_in, axis=-1, keepdims=True)
    mx_in = rng.standard_normal((B, H)).astype(np.float32)
    s_in[0, 0], mx_in[0, 0] = 0.0, -np.inf  # a fresh sequence's state
    inputs = {
        "k_raw": rng.standard_normal((B, chunk, H, hs)).astype(np.float32),
        "log_g": rng.standard_normal((B, chunk, H)).astype(np.float32),
        "log_lam": -0.1 * rng.random((B, chunk, H)).astype(np.float32),
        "valid": valid,
        "s_in": s_in,
        "mx_in": mx_in,
    }
    names = ["keys", "s_out", "mx_out"]
    want, _ = run_node("GatedKeyScan", inputs, names, eps=1e-6)
    got, ran = run_node("GatedKeyScan", inputs, names, native_ort_library, tmp_path, eps=1e-6)
    assert ran == {"GatedKeyScan"}
    assert np.abs(got[0][valid] - want[0][valid]).max() <= ATOL
    assert np.abs(got[1] - want[1]).max() <= ATOL  # an idle row keeps its state exactly
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)


def test_the_backend_picks_the_ops_it_can_run(tmp_path, monkeypatch, native_ort_library):
    from mosaicrt.runtime.ort_backend import native_ops_library

    cpu = ["CPUExecutionProvider"]
    assert native_ops_library("auto", cpu) == native_ort_library
    assert native_ops_library("native", cpu) == native_ort_library
    assert native_ops_library("functions", cpu) is None
    assert native_ops_library("auto", ["CUDAExecutionProvider", *cpu]) is None  # CPU kernels
    monkeypatch.setenv("MOSAICRT_CACHE", str(tmp_path))  # nothing built there
    assert native_ops_library("auto", cpu) is None
    with pytest.raises(BackendError, match="mosaicrt ort-ops build"):
        native_ops_library("native", cpu)
    with pytest.raises(BackendError, match="unknown --ort-ops"):
        native_ops_library("fast", cpu)


def test_without_the_library_the_function_bodies_run(tmp_path, monkeypatch):
    """A fresh machine (nothing built): the onnxruntime backend falls back to the bodies."""
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.model import preset, random_model, save_checkpoint
    from mosaicrt.runtime.generator import RunLimits, generate
    from mosaicrt.runtime.ort_backend import OrtBackend
    from mosaicrt.runtime.sampling import SamplingParams

    monkeypatch.setenv("MOSAICRT_CACHE", str(tmp_path / "empty-cache"))
    save_checkpoint(random_model(preset("tiny"), seed=2), tmp_path / "ckpt")
    artifact = export_artifact(tmp_path / "ckpt", tmp_path / "onnx", max_context=64)
    backend = OrtBackend(artifact)
    assert backend.ort_ops == "functions"
    [tokens] = generate(backend, [[3, 4, 5]], 8, SamplingParams(), RunLimits(max_context=16))
    assert len(tokens) == 8
    with pytest.raises(BackendError, match="mosaicrt ort-ops build"):
        OrtBackend(artifact, ort_ops="native")


def test_cli_ort_ops(cli, tmp_path, monkeypatch, native_ort_library):
    assert cli("ort-ops", "status").stdout.strip().splitlines()[0] == str(native_ort_library)
    monkeypatch.setenv("MOSAICRT_CACHE", str(tmp_path))
    result = cli("ort-ops", "status")
    assert result.returncode == 1 and "mosaicrt ort-ops build" in result.stdout
    headerless = tmp_path / "empty"
    headerless.mkdir()
    result = cli("ort-ops", "build", "--headers", str(headerless))
    assert result.returncode == 2 and "onnxruntime_cxx_api.h" in result.stderr
    ckpt = tmp_path / "ckpt"
    assert cli("init", ckpt, "--preset", "tiny").returncode == 0
    result = cli("generate", ckpt, "--ort-ops", "native", "--prompt", "hi", "--max-new-tokens", "1")
    assert (
        result.returncode == 2
        and "--ort-ops native applies to the onnxruntime backend" in result.stderr
    )


def test_loading_the_library_leaves_the_process_floating_point_mode_alone(native_ort_library):
    """The kernels are compiled with -ffast-math but linked without it: crtfastmath's constructor
    would turn on flush-to-zero for the whole process (torch and numpy included)."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(native_ort_library))
    tiny = np.float32(1e-40)  # a subnormal
    assert tiny * np.float32(1.0) == tiny
    assert float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) > 0

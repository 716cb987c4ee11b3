"""The native ONNX Runtime kernels of the mosaic ops (mosaicrt.ops.ort_library) against the ops'
ONNX function bodies, node by node, and how the backend picks between them."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the native ops are ONNX Runtime's ([onnx] extra)")

from helpers import memory_op_oracle, pooled, run_node  # noqa: E402

from mosaicrt.errors import BackendError  # noqa: E402
from mosaicrt.ops.associative_memory import SCALED_STORES  # noqa: E402
from mosaicrt.ops.associative_memory.reference import dequantize_pairs, quantize_pairs  # noqa: E402
from mosaicrt.ops.geometry import NO_WINDOW  # noqa: E402
from mosaicrt.ops.ort_library import VECTOR_PATHS  # noqa: E402

# An fp32 retrieval against the float64 oracle: within ROUNDINGS x 2^-24 x each output's condition
# (helpers.memory_op_oracle). The function body and every vector path measured at most 7.
ROUNDINGS = 16
ATOL = 1e-5  # the native key scan vs its function body, on unit keys


def assert_near_oracle(y, truth, cond, lengths):
    """y (B, C, H, hs) within the fp32 bound of the oracle's, rows b < 3 as far as they hold real
    tokens (row 3 has none: its outputs are never read)."""
    for b in range(3):
        error = np.abs(y[b, : lengths[b]] - truth[b, : lengths[b]])
        assert (error <= ROUNDINGS * 2.0**-24 * cond[b, : lengths[b]]).all(), error.max()


@pytest.fixture(scope="module", params=list(VECTOR_PATHS))
def kernel_library(request):
    """The native library built for each vector path this CPU can run (this machine's own build
    for AVX-512, narrower targets for the others), so that every path is checked on a machine
    with AVX-512, and all but that one elsewhere."""
    from mosaicrt.errors import InputError
    from mosaicrt.ops import ort_library

    march, needs = VECTOR_PATHS[request.param]
    arch, *flags = ort_library.cpu_features().split()
    features = set(flags)
    if arch != "x86_64":
        pytest.skip("the vector paths' build targets are x86-64's")
    if not needs <= features:
        pytest.skip(
            f"this CPU lacks {', '.join(sorted(needs - features))} for the {request.param} path"
        )
    try:
        return ort_library.build_library(log=lambda message: None, march=march)
    except InputError as exc:
        pytest.skip(f"the native ONNX Runtime ops cannot be built here: {exc}")


def memory_inputs(kind, chunk, store_dtype, seed, ltm_blocks=3, hs=16):
    """AssociativeMemory inputs as the step graph makes them: rows before the delay, a wrapped
    ring, a long store (row 2: to the last of ltm_blocks blocks), a row with no real token; the
    stored blocks scattered over a pool larger than they need, in no order."""
    rng = np.random.default_rng(seed)
    B, H, window, delay = 4, 3, 6, (1 if kind == "stm" else 4)
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
    kernel_library, kind, chunk, store_dtype, tmp_path
):
    """ltm-10-blocks: decode cuts 4 rows x 10 blocks into work items of 3 blocks (the last of a
    row holds 1), merged per row."""
    blocks = 10 if kind == "ltm-10-blocks" else 3
    inputs, attrs, lengths = memory_inputs(kind[:3], chunk, store_dtype, chunk, blocks)
    (body,), ran = run_node("AssociativeMemory", inputs, ["y"], profile_dir=tmp_path / "f", **attrs)
    assert "AssociativeMemory" not in ran  # inlined: its body's standard ops ran
    (got,), ran = run_node(
        "AssociativeMemory", inputs, ["y"], kernel_library, tmp_path / "n", **attrs
    )
    assert ran == {"AssociativeMemory"}  # one native node
    truth, cond = memory_op_oracle(inputs, **attrs)
    assert_near_oracle(body, truth, cond, lengths)
    assert_near_oracle(got, truth, cond, lengths)
    assert np.abs(body[0, 0]).max() == 0.0 == np.abs(got[0, 0]).max()  # t = 0: nothing visible


@pytest.mark.parametrize("chunk", [1, 9])
def test_a_table_of_no_blocks_reads_the_chunk_alone(kernel_library, chunk, tmp_path):
    """Every row from position 0, no pair stored yet, a block table of no columns: the kernel
    reads the chunk's own pairs only (decode: nothing visible yet), as the function body does."""
    inputs, attrs, lengths = memory_inputs("ltm", chunk, np.float32, chunk)
    t = np.broadcast_to(np.arange(chunk), inputs["t"].shape).copy()
    valid = np.arange(chunk)[None, :] < lengths[:, None]
    inputs |= {"t": t, "new_tau": np.where(valid & (t >= 1), t - 1, -1),
               "store_blocks": inputs["store_blocks"][:, :0],
               "store_tau": inputs["store_tau"][:0]}  # fmt: skip
    (body,), _ = run_node("AssociativeMemory", inputs, ["y"], **attrs)
    (got,), _ = run_node("AssociativeMemory", inputs, ["y"], kernel_library, **attrs)
    truth, cond = memory_op_oracle(inputs, **attrs)
    assert_near_oracle(body, truth, cond, lengths)
    assert_near_oracle(got, truth, cond, lengths)
    assert np.abs(truth).max() > 0 if chunk > attrs["delay"] else np.abs(got).max() == 0


@pytest.mark.parametrize("hs", [18, 24, 64, 80])
@pytest.mark.parametrize("kind", ["stm", "ltm"])
def test_chunk_path_for_head_sizes_with_and_without_register_tiles(
    kernel_library, kind, hs, tmp_path
):
    """A chunk's queries fold 6 (16 lanes) or 3 (8 or 4 lanes) at a time with 1-4 vectors of
    value columns in registers per pass (64: 4 vectors of 16 lanes, 4 + 4 of 8, 4 x 4 of 4; 80:
    4 + 1 of 16, 4 + 4 + 2 of 8; 24: 3 of 8, 4 + 2 of 4) or, for a head size that is no multiple
    of the lanes (18; 24 on 16 lanes), one query at a time. 70 queries: 11 tiles of 6 then one of
    4, or 23 of 3 then one of 1; the chunk's own 70 pairs are scored in tiles of 64, 32 or 16."""
    inputs, attrs, lengths = memory_inputs(kind, 70, np.float32, seed=hs, hs=hs)
    (body,), _ = run_node("AssociativeMemory", inputs, ["y"], **attrs)
    (got,), ran = run_node(
        "AssociativeMemory", inputs, ["y"], kernel_library, tmp_path / "n", **attrs
    )
    assert ran == {"AssociativeMemory"}
    truth, cond = memory_op_oracle(inputs, **attrs)
    assert_near_oracle(body, truth, cond, lengths)
    assert_near_oracle(got, truth, cond, lengths)


@pytest.mark.parametrize("chunk", [1, 9])
def test_a_nan_query_gives_a_nan_output_as_in_the_function(kernel_library, chunk, tmp_path):
    """The kernels are compiled with -ffast-math: a NaN must still reach the output (the runtime's
    finite check names the row), for that query alone, decode and chunk paths alike."""
    inputs, attrs, _ = memory_inputs("ltm", chunk, np.float32, seed=3)
    inputs["q"][2, -1, 0, 3] = np.nan  # row 2 sees stored pairs in every query
    (body,), _ = run_node("AssociativeMemory", inputs, ["y"], **attrs)
    (got,), _ = run_node("AssociativeMemory", inputs, ["y"], kernel_library, **attrs)
    for y in (body, got):
        assert np.isnan(y[2, -1, 0]).all()
        assert np.isfinite(y[:3, :, 1:]).all() and np.isfinite(y[:2]).all()


@pytest.mark.parametrize("kind", ["stm", "ltm"])
@pytest.mark.parametrize("chunk", [1, 9])
@pytest.mark.parametrize("store", ["int8", "float8_e4m3fn"])
def test_scaled_store_kernel_matches_the_function_and_the_dequantized_stores(
    kernel_library, kind, chunk, store, tmp_path
):
    """AssociativeMemoryInt8 / -Fp8 = AssociativeMemory over the stores their pairs (fp8: e4m3
    bits in int8) and scales stand for: the function body and the native kernel both."""
    op = SCALED_STORES[store][0]
    inputs, attrs, lengths = memory_inputs(kind, chunk, np.float32, seed=10 + chunk)
    quantized = dict(inputs)
    for field in ("store_k", "store_v"):
        q, scale = quantize_pairs(torch.from_numpy(inputs[field]), store)
        bits = q if store == "int8" else q.view(torch.int8)
        quantized[field], quantized[field + "_scale"] = bits.numpy(), scale.numpy()
        inputs[field] = dequantize_pairs(q, scale).numpy()
    (body,), ran = run_node(op, quantized, ["y"], profile_dir=tmp_path / "f", **attrs)
    assert op not in ran  # inlined
    (got,), ran = run_node(op, quantized, ["y"], kernel_library, tmp_path / "n", **attrs)
    assert ran == {op}
    truth, cond = memory_op_oracle(inputs, **attrs)  # over the dequantized stores
    assert_near_oracle(body, truth, cond, lengths)
    assert_near_oracle(got, truth, cond, lengths)


@pytest.mark.parametrize("seed", range(20))
def test_quantized_pairs_round_trip_within_half_a_scale(seed: int):
    """|q * scale - x| <= scale / 2, plus the fp32 rounding of x / scale and of q * scale: one
    unit in the last place of |x| each (2 * 2^-24 |x|)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 3, 64, generator=gen) * torch.rand(5, 7, 3, 1, generator=gen) * 10
    x[0, 0, 0] = 0.0  # an empty slot's pair
    q, scale = quantize_pairs(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    error = (dequantize_pairs(q, scale) - x).abs()
    assert bool((error <= scale[..., None] / 2 + x.abs() * 2**-23).all())
    assert float(scale[0, 0, 0]) == 0.0 and bool((q[0, 0, 0] == 0).all())
    assert int(q.abs().max()) == 127


def test_fp8_pairs_round_trip_within_half_an_e4m3_step():
    """Each element of a pair scaled to |x| <= 448 is rounded to the nearest e4m3 value: within
    2^-4 of itself in a normal binade (3 mantissa bits), within 2^-10 below 2^-6 (subnormals,
    steps of 2^-9), both in units of the pair's scale."""
    x = torch.randn(5, 7, 3, 64) * torch.rand(5, 7, 3, 1) * 10
    x[0, 0, 0] = 0.0
    q, scale = quantize_pairs(x, "float8_e4m3fn")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    scaled = x / scale.clamp(min=1e-30)[..., None]
    bound = torch.maximum(scaled.abs() * 2.0**-4, torch.tensor(2.0**-10)) * (1 + 1e-6)
    error = (dequantize_pairs(q, scale) - x).abs() / scale.clamp(min=1e-30)[..., None]
    assert bool((error <= bound).all())
    assert float(scale[0, 0, 0]) == 0.0 and bool((q[0, 0, 0].float() == 0).all())
    assert float(q.float().abs().max()) == 448.0


def test_fp8_stores_read_every_e4m3_value_exactly(kernel_library, tmp_path):
    """One visible stored pair per head whose value holds 64 of the 256 e4m3 bit patterns (NaN's
    two replaced by 0): the retrieval returns that value, so the function body's table and the
    native kernel's vector loads must both decode every pattern to PyTorch's value exactly."""
    H, hs, S, delay = 4, 64, 8, 4
    bits = torch.arange(256, dtype=torch.uint8).view(torch.int8).reshape(H, hs)
    bits[(bits == 0x7F) | (bits == -1)] = 0  # 0x7F and 0xFF are NaN
    store_v = torch.zeros(1, H, S, hs, dtype=torch.int8)
    store_v[0, :, 0] = bits  # pair tau = 0 of each head
    zeros = np.zeros((1, 1, H, hs), np.float32)
    inputs = {
        "q": zeros, "t": np.array([[delay]]),  # sees tau <= 0: the one pair
        "store_k": np.zeros((1, H, S, hs), np.int8), "store_v": store_v.numpy(),
        "store_blocks": np.zeros((1, 1), np.int64),
        "store_tau": np.array([[[0] + [-1] * (S - 1)]]),
        "new_k": zeros, "new_v": zeros, "new_tau": np.array([[-1]]),
        "beta0": np.ones(H, np.float32), "beta1": np.zeros(H, np.float32),
        "alpha": np.ones(H, np.float32),
        "store_k_scale": np.ones((1, H, S), np.float32),
        "store_v_scale": np.ones((1, H, S), np.float32),
    }  # fmt: skip
    want = bits.view(torch.float8_e4m3fn).float().numpy()  # (H, hs)
    attrs = {"window": NO_WINDOW, "delay": delay}
    (body,), _ = run_node("AssociativeMemoryFp8", inputs, ["y"], **attrs)
    (native,), ran = run_node(
        "AssociativeMemoryFp8", inputs, ["y"], kernel_library, tmp_path, **attrs
    )
    assert ran == {"AssociativeMemoryFp8"}
    np.testing.assert_array_equal(body[0, 0], want)
    np.testing.assert_array_equal(native[0, 0], want)


def test_graph_fp8_bits_are_torchs_rounding():
    """The step graph's fp8 encoding (e4m3_bits) gives torch's bits (round to nearest, ties to
    even) for every e4m3 value, every midpoint between two, and random values over the range."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mosaicrt.onnx_graph import IR_VERSION, OPSET, GraphBuilder
    from mosaicrt.ops.associative_memory.onnx import e4m3_bits, e4m3_values

    g = GraphBuilder()
    e4m3_bits(g, "y", "bits")
    graph = helper.make_graph(
        g.nodes,
        "e4m3",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("bits", TensorProto.INT8, [None])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = np.sort(e4m3_values()[np.isfinite(e4m3_values())])
    midpoints = (values[1:] + values[:-1]) / 2
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 2.6, 20000)
    y = np.concatenate([values, midpoints, spread]).astype(np.float32)
    y = y[np.abs(y) <= 448.0]
    got = session.run(None, {"y": y})[0]
    want = torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.int8).numpy()
    zero = y == 0  # -0.0: torch keeps its sign bit; the graph writes +0 (the same value)
    assert (got[~zero] == want[~zero]).all()
    assert (got[zero] == 0).all()


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


@pytest.mark.parametrize("f", [37, 64])
def test_swiglu_kernel_is_silu_of_the_gate_times_up(kernel_library, f, tmp_path):
    """SwiGLU (ops/ort_swiglu.h) of (3, 5, 2f) against float64, on every vector path: within 8
    fp32 roundings of each output, a NaN in either half gives a NaN, an infinite gate an
    infinite output. Gates below -88, whose sigmoid the kernel caps at 1/(1 + e^88), give
    outputs within 1e-36 of theirs."""
    rng = np.random.default_rng(f)
    x = (4 * rng.standard_normal((3, 5, 2 * f))).astype(np.float32)
    x[0, 0, :4] = [-100.0, 90.0, -1e-30, 0.0]  # gates: capped, saturated, tiny, zero
    x[1, 1, 0], x[1, 2, f + 1], x[2, 3, 2] = np.nan, np.nan, np.inf
    (got,), ran = run_node("SwiGLU", {"x": x}, ["y"], kernel_library, tmp_path)
    assert ran == {"SwiGLU"} and got.shape == (3, 5, f)
    gate, up = x[..., :f].astype(np.float64), x[..., f:].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = gate / (1 + np.exp(-gate)) * up
    assert (np.isnan(got) == np.isnan(want)).all() and np.isinf(got[2, 3, 2])
    finite = np.isfinite(want)
    error = np.abs(got[finite] - want[finite])
    assert (error <= 8 * 2.0**-24 * np.abs(want[finite]) + 1e-36).all(), error.max()


@pytest.mark.parametrize("vocab", [37, 8192])
def test_row_scan_kernel_is_the_batchers_scan(kernel_library, vocab, tmp_path):
    """RowScan (ops/ort_row_scan.h) gives each row's first largest logit where sampling.scan_rows
    finds the row finite, and -1 where it does not: NaN, +inf and -inf rows, ties, a constant
    row, a row whose largest value is its last."""
    from onnx import TensorProto

    from mosaicrt.runtime.sampling import scan_rows

    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    logits[0, vocab // 2] = np.nan
    logits[1, 3], logits[2, vocab - 1] = np.inf, -np.inf
    logits[3, [5, 9]] = 50.0  # a tie: the first wins
    logits[4] = 0.25
    logits[5, vocab - 1] = 60.0
    (got,), ran = run_node(
        "RowScan", {"logits": logits}, ["row_scan"], kernel_library, tmp_path, TensorProto.INT64
    )
    assert ran == {"RowScan"} and got.dtype == np.int64 and got.shape == (8,)
    finite, greedy = scan_rows(logits)
    assert finite == [False, False, False, True, True, True, True, True]
    assert got.tolist() == [token if ok else -1 for ok, token in zip(finite, greedy)]
    assert got[3] == 5 and got[4] == 0 and got[5] == vocab - 1


@pytest.mark.parametrize(("k", "n", "parts"), [(5, 37, 8), (200, 64, None), (130, 4100, 3)])
def test_row_matmul_kernel_is_x_times_w(kernel_library, k, n, parts, tmp_path):
    """RowMatMul (ops/ort_row_matmul.h) of x (2, 3, K) and W (K, N) against float64, on every
    vector path: within K fp32 roundings of sum |x w| per output, whether the weight's rows are
    one range (no `parts`: the default) or several (more ranges than rows: the empty ones add
    nothing), N a multiple of the vector loop or not, and wider than the accumulator's column
    block (4096)."""
    rng = np.random.default_rng(k + n)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    (got,), ran = run_node(
        "RowMatMul",
        {"x": x, "w": w},
        ["y"],
        kernel_library,
        tmp_path,
        **({"parts": parts} if parts else {}),
    )
    assert ran == {"RowMatMul"} and got.shape == (2, 3, n)
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = k * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert (np.abs(got - want) <= bound).all()


def test_the_backend_picks_the_ops_it_can_run(tmp_path, monkeypatch, native_ort_library):
    from mosaicrt.runtime.ort_backend import native_ops_library

    cpu = ["CPUExecutionProvider"]
    assert native_ops_library("auto", cpu) == native_ort_library
    assert native_ops_library("native", cpu) == native_ort_library
    assert native_ops_library("fused", cpu) == native_ort_library
    assert native_ops_library("functions", cpu) is None
    assert native_ops_library("auto", ["CUDAExecutionProvider", *cpu]) is None  # CPU kernels
    monkeypatch.setenv("MOSAICRT_CACHE", str(tmp_path))  # nothing built there
    assert native_ops_library("auto", cpu) is None
    for required in ("native", "fused"):
        with pytest.raises(BackendError, match=f"--ort-ops {required}: .*mosaicrt ort-ops build"):
            native_ops_library(required, cpu)
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
    from mosaicrt.ops.ort_library import cpu_features

    lines = cli("ort-ops", "status").stdout.strip().splitlines()
    assert lines[0] == str(native_ort_library)
    flags = set(cpu_features().split()[1:])
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "f16c", "fma"} <= flags else 4
    assert lines[1].endswith(f"({lanes} fp32 lanes)")
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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_native_retrieval_appends_the_pairs_the_runtime_would_write(
    tmp_path, native_ort_library, dtype, monkeypatch
):
    """With the native kernels the run writes each step's new pairs into fp32/fp16 stores itself
    and the runtime writes none. Through chunks longer than the STM ring and the LTM delay, decode
    steps across ring wraps and LTM block edges, rows at different positions, an idle row and a
    step on a row range, the stores and the logits are, bit for bit, those of the same kernels
    with the runtime writing the pairs (pairs_in_run=False, as for the function bodies)."""
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.model import preset, random_model, save_checkpoint
    from mosaicrt.runtime import graph_state
    from mosaicrt.runtime.ort_backend import OrtBackend

    save_checkpoint(random_model(preset("tiny"), seed=5), tmp_path / "ckpt")
    artifact = export_artifact(
        tmp_path / "ckpt", tmp_path / "onnx", dtype=dtype, max_context=128, ltm_block=8
    )
    native = OrtBackend(artifact, ort_ops="native")
    bodies = OrtBackend(artifact, ort_ops="native", pairs_in_run=False)  # the runtime writes
    assert native.pairs_in_run and not bodies.pairs_in_run
    states = [backend.new_state(2, 128) for backend in (native, bodies)]
    schedule = [([20, 7], None), ([0, 19], None), ([3, 1], None)]  # ring 15, delay 8, blocks 8
    schedule += [([1, 1], None)] * 20 + [([4], slice(1, 2)), ([1], slice(0, 1))]
    schedule += [([1, 1], None)] * 10
    rng = np.random.default_rng(0)
    written = []
    real_write = graph_state.write_new_pairs

    def counted(*args, **kwargs):
        written.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(graph_state, "write_new_pairs", counted)
    for lengths, rows in schedule:
        ids = rng.integers(0, 256, (len(lengths), max(lengths)))
        lengths = np.array(lengths)
        before = len(written)
        got = native.step(ids, lengths, states[0], last_only=True, rows=rows)
        assert len(written) == before  # the run wrote them
        want = bodies.step(ids, lengths, states[1], last_only=True, rows=rows)
        np.testing.assert_array_equal(got[lengths > 0], want[lengths > 0])
    assert len(written) == len(schedule)  # pairs_in_run=False: the runtime wrote them
    for memory in ("stm", "ltm"):
        np.testing.assert_array_equal(states[0].pairs[memory], states[1].pairs[memory])
    np.testing.assert_array_equal(states[0].pos, [54, 61])

"""The plugin-side implementation of the `mosaic` ops (Triton kernels, interpreted on a CPU)
against their ONNX function bodies run by ONNX Runtime: the two definitions of each op agree."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the plugin ops run the Triton kernels ([triton] extra)")
ort = pytest.importorskip("onnxruntime", reason="the reference is the ONNX function ([onnx] extra)")

from helpers import pooled, run_node  # noqa: E402

from mosaicrt.ops import plugin_specs  # noqa: E402
from mosaicrt.ops.associative_memory import SCALED_STORES  # noqa: E402
from mosaicrt.ops.associative_memory.reference import quantize_pairs  # noqa: E402
from mosaicrt.ops.geometry import NO_WINDOW  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-5  # fp32 kernels vs the fp32 function body on O(1) outputs


def step_positions(pos: np.ndarray, lengths: np.ndarray, C: int) -> tuple:
    """t and new_tau as the step graph computes them."""
    t = pos[:, None] + np.arange(C)[None, :]
    valid = np.arange(C)[None, :] < lengths[:, None]
    return t, np.where(valid & (t >= 1), t - 1, -1), valid


def store_positions(kind: str, pos: np.ndarray, NB: int, S: int) -> np.ndarray:
    """store_tau (NB, B, S) as the step graph computes it."""
    last = (pos - 2)[None, :, None]
    slot = np.arange(S)[None, None, :]
    if kind == "stm":
        tau = last - np.mod(last - slot, S)
    else:
        tau = np.arange(NB)[:, None, None] * S + slot + 0 * last
    return np.where((tau >= 0) & (tau <= last), tau, -1)


def memory_inputs(kind: str, chunk: int, seed: int) -> tuple[dict, dict, np.ndarray]:
    """One AssociativeMemory node's inputs, scattered over pools: rows at t < m and t < h, a
    ring that wrapped, a long store, and a row of no real token (3)."""
    rng = np.random.default_rng(seed)
    B, H, hs, window, delay = 4, 2, 16, 6, (1 if kind == "stm" else 4)
    NB, S = (1, window - 1) if kind == "stm" else (3, 8)
    pos = np.array([0, 3, 17, 11])  # t < m and t < h, ring wrap-around, a long store
    lengths = np.array([chunk, max(chunk - 3, 1), chunk, 0])
    t, new_tau, _ = step_positions(pos, lengths, chunk)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    stores = [unit(NB, B, H, S, hs), 3 * rng.standard_normal((NB, B, H, S, hs)).astype(np.float32)]
    (store_k, store_v), table = pooled(stores, rng)  # scattered over a pool, in random order
    inputs = {
        "q": unit(B, chunk, H, hs),
        "t": t,
        "store_k": store_k,
        "store_v": store_v,
        "store_blocks": table,
        "store_tau": store_positions(kind, pos, NB, S),
        "new_k": unit(B, chunk, H, hs),
        "new_v": 3 * rng.standard_normal((B, chunk, H, hs)).astype(np.float32),
        "new_tau": new_tau,
        "beta0": rng.uniform(0.5, 2, H).astype(np.float32),
        "beta1": rng.uniform(0.5, 2, H).astype(np.float32),
        "alpha": rng.uniform(0.2, 0.8, H).astype(np.float32),
    }
    fields = {"window": window if kind == "stm" else NO_WINDOW, "delay": delay}
    return inputs, fields, lengths


def run_plugin(op: str, inputs: dict, fields: dict, shape: tuple) -> np.ndarray:
    x = [torch.from_numpy(v).to(DEVICE) for v in inputs.values()]
    y = torch.full(shape, float("nan"), device=DEVICE)  # every element must be written
    plugin_specs()[op].run(x, [y], fields)
    return y.cpu().numpy()


@pytest.mark.parametrize("kind", ["stm", "ltm"])
@pytest.mark.parametrize("chunk", [1, 9])
def test_associative_memory_plugin_op_matches_the_function(kind, chunk):
    inputs, fields, lengths = memory_inputs(kind, chunk, seed=chunk)
    (want,), _ = run_node("AssociativeMemory", inputs, ["y"], **fields)
    got = run_plugin("AssociativeMemory", inputs, fields, want.shape)
    for b in range(3):  # row 3 has no real tokens: its outputs are never read
        n = lengths[b]
        assert np.abs(got[b, :n] - want[b, :n]).max() <= ATOL


@pytest.mark.parametrize("kind", ["stm", "ltm"])
@pytest.mark.parametrize("chunk", [1, 9])
@pytest.mark.parametrize("store", ["int8", "float8_e4m3fn"])
def test_scaled_store_plugin_op_matches_the_function(kind, chunk, store):
    """The plugin reads int8 or fp8 pools (fp8 as the graph carries them: e4m3 bits in int8)
    and their scales (scattered over the pool like the pairs) as the ONNX function body of
    AssociativeMemoryInt8 / -Fp8 does."""
    op = SCALED_STORES[store][0]
    inputs, fields, lengths = memory_inputs(kind, chunk, seed=20 + chunk)
    for field in ("store_k", "store_v"):
        q, scale = quantize_pairs(torch.from_numpy(inputs[field]), store)
        inputs[field] = q.view(torch.int8).numpy()
        inputs[field + "_scale"] = scale.numpy()
    (want,), _ = run_node(op, inputs, ["y"], **fields)
    got = run_plugin(op, inputs, fields, want.shape)
    for b in range(3):  # row 3 has no real tokens
        n = lengths[b]
        assert np.abs(got[b, :n] - want[b, :n]).max() <= ATOL
    assert np.abs(got[2, 0]).max() > 0  # stored pairs were read


@pytest.mark.parametrize("chunk", [1, 21])
def test_gated_key_scan_plugin_op_matches_the_function(chunk):
    rng = np.random.default_rng(chunk)
    B, H, hs = 3, 2, 16
    lengths = np.array([chunk, max(chunk - 5, 1), 0])
    valid = np.arange(chunk)[None, :] < lengths[:, None]
    s_in = rng.standard_normal((B, H, hs)).astype(np.float32)
    s_in /= np.linalg.norm(s_in, axis=-1, keepdims=True)
    inputs = {
        "k_raw": rng.standard_normal((B, chunk, H, hs)).astype(np.float32),
        "log_g": rng.standard_normal((B, chunk, H)).astype(np.float32),
        "log_lam": -0.1 * rng.random((B, chunk, H)).astype(np.float32),
        "valid": valid,
        "s_in": s_in,
        "mx_in": rng.standard_normal((B, H)).astype(np.float32),
    }
    want, _ = run_node("GatedKeyScan", inputs, ["keys", "s_out", "mx_out"], eps=1e-6)
    x = [torch.from_numpy(v).to(DEVICE) for v in inputs.values()]
    keys, s_out, mx_out = (torch.full(w.shape, float("nan"), device=DEVICE) for w in want)
    plugin_specs()["GatedKeyScan"].run(x, [keys, s_out, mx_out], {"eps": 1e-6})
    assert np.abs(keys.cpu().numpy()[valid] - want[0][valid]).max() <= ATOL
    assert np.abs(s_out.cpu().numpy()[:2] - want[1][:2]).max() <= ATOL  # row 2 is idle
    np.testing.assert_allclose(mx_out.cpu().numpy()[:2], want[2][:2], rtol=1e-6)

"""Small helpers shared by test modules."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from mosaicrt.export.functions import functions, plugin_attrs
from mosaicrt.onnx_graph import IR_VERSION, OPSET
from mosaicrt.ops import DOMAIN

ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
        np.dtype(np.int64): TensorProto.INT64, np.dtype(bool): TensorProto.BOOL,
        np.dtype(np.int8): TensorProto.INT8}  # fmt: skip


def mosaicrt(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the mosaicrt CLI in a fresh interpreter; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mosaicrt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_node(
    op, inputs, outputs, library=None, profile_dir=None, output_type=TensorProto.FLOAT, **attrs
):
    """One mosaic node as the step graph has it (function body and plugin attributes attached),
    through ONNX Runtime's CPU provider, with the native library registered when given; its
    outputs of `output_type`. Returns the outputs, and the op types the session ran when
    profiled (else None)."""
    import onnxruntime as ort

    node = helper.make_node(op, list(inputs), outputs, domain=DOMAIN, **attrs, **plugin_attrs())
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(k, ELEM[v.dtype], v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(name, output_type, None) for name in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=functions(op if op.startswith("AssociativeMemory") else "AssociativeMemory"),
        ir_version=IR_VERSION,
    )
    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(str(library))
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "profile")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(None, inputs)
    if profile_dir is None:
        return got, None
    events = json.loads(Path(session.end_profiling()).read_text())
    return got, {e["args"]["op_name"] for e in events if "op_name" in e.get("args", {})}


def pooled(stores, rng, spare: int = 3):
    """Stores in blocks, each (NB, B, H, S[, hs]), as the step graph feeds them: one pool
    (P, H, S[, hs]) per store with every row's blocks scattered over it in random order, unread
    blocks noise; returns the pools and the block table (B, NB) int64."""
    NB, B = stores[0].shape[:2]
    table = rng.permutation(NB * B + spare)[: B * NB].reshape(B, NB).astype(np.int64)
    pools = []
    for store in stores:
        pool = rng.standard_normal((NB * B + spare, *store.shape[2:])).astype(store.dtype)
        pool[table.T] = store  # row b's block i -> pool block table[b, i]
        pools.append(pool)
    return pools, table


def memory_op_oracle(inputs: dict, window: int, delay: int) -> tuple[np.ndarray, np.ndarray]:
    """AssociativeMemory in float64, pair by pair from the op's contract (pooled stores, as
    run_node feeds them; int8/fp8 stores given dequantized), and each output's fp32 condition:
    cond = sum_s p_s a_s |v_s - y| + sum_s p_s |v_s|, a_s = beta * sum_d |q_d k_sd|, p the
    softmax weights. To first order, rounding a score by u * a_s moves y by u * p_s a_s |v_s - y|,
    and the weighted sum's own roundings are u * sum p_s |v_s|, so an fp32 implementation that
    rounds each a few times stays within a small multiple of 2^-24 * cond. Returns (y, cond),
    both (B, C, H, hs)."""
    x = {k: v if v.dtype == np.int64 else np.asarray(v, np.float64) for k, v in inputs.items()}
    B, C, H, hs = x["q"].shape
    table = inputs["store_blocks"]  # (B, NB)
    y, cond = np.zeros((B, C, H, hs)), np.zeros((B, C, H, hs))
    for b in range(B):
        keys = np.concatenate(
            [x["store_k"][p] for p in table[b]] + [x["new_k"][b].swapaxes(0, 1)], 1
        )
        values = np.concatenate(
            [x["store_v"][p] for p in table[b]] + [x["new_v"][b].swapaxes(0, 1)], 1
        )
        tau = np.concatenate([inputs["store_tau"][:, b].ravel(), inputs["new_tau"][b]])
        for c in range(C):
            age = inputs["t"][b, c] - tau
            seen = (tau >= 0) & (age >= delay) & (age <= window - 1)
            if not seen.any():
                continue  # nothing visible: y = 0
            for h in range(H):
                q, k, v = x["q"][b, c, h], keys[h, seen], values[h, seen]  # (hs,), (n, hs) x 2
                beta = x["beta1"][h] * seen.sum() ** x["alpha"][h] + x["beta0"][h]
                score = beta * (k @ q)
                p = np.exp(score - score.max())
                p /= p.sum()
                y[b, c, h] = p @ v
                a = beta * (np.abs(k) @ np.abs(q))
                cond[b, c, h] = (p * a) @ np.abs(v - y[b, c, h]) + p @ np.abs(v)
    return y, cond

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


def run_node(op, inputs, outputs, library=None, profile_dir=None, **attrs):
    """One mosaic node as the step graph has it (function body and plugin attributes attached),
    through ONNX Runtime's CPU provider, with the native library registered when given. Returns
    the outputs, and the op types the session ran when profiled (else None)."""
    import onnxruntime as ort

    node = helper.make_node(op, list(inputs), outputs, domain=DOMAIN, **attrs, **plugin_attrs())
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(k, ELEM[v.dtype], v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
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

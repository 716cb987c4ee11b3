"""Weight-only block-wise quantization of the step graph's weight MatMuls (ONNX Runtime's
`com.microsoft::MatMulNBits`, packed by ONNX Runtime's own quantizer).

Each weight W^T (K, N) is cut along K into blocks of `block_size`; every (block, column) keeps one
fp32 scale and symmetric integers (int4: -8..7, int8: -128..127), stored offset by 2^(bits-1) as
MatMulNBits expects (the scale carries the sign of the block's largest magnitude, which maps to
-2^(bits-1), so the whole range is used):

    W^T[k, n] ~= scales[n, k // block] * (q[n, k] - 2^(bits-1))

The products run with int8 activations by default (`accuracy_level` 4), which is what makes
MatMulNBits fast on the CPU (int8 weights at level 0 ran 6-7x slower than fp32 here); level 0
computes in fp32 on the dequantized weights, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from mosaicrt.errors import InputError
from mosaicrt.onnx_graph import ExternalData

MS_DOMAIN = "com.microsoft"
BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVEL = 4  # int8 activations in the products (MLAS's fast CPU path)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: unset (fp32 here), fp32, fp16, bf16, int8


@dataclass(frozen=True)
class WeightQuantization:
    """How an artifact's weight MatMuls are quantized (None in the builder: fp weights)."""

    scheme: str  # "int4" or "int8"
    block_size: int = 32
    accuracy_level: int = ACCURACY_LEVEL  # the products' input precision (MatMulNBits)

    def __post_init__(self) -> None:
        if self.scheme not in BITS:
            raise InputError(f"--quantize must be int4 or int8, got {self.scheme!r}")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(
                f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                f"got {self.block_size}"
            )
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise InputError(f"accuracy_level must be 0-4, got {self.accuracy_level}")

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    def manifest(self) -> dict:
        return {
            "weights": self.scheme,
            "block_size": self.block_size,
            "symmetric": True,
            "operator": f"{MS_DOMAIN}::MatMulNBits",
            "accuracy_level": self.accuracy_level,
            "embeddings": "float32",
        }


def quantize_weight(weight_t: np.ndarray, quant: WeightQuantization) -> dict[str, np.ndarray]:
    """W^T (K, N) fp32 -> {"packed": uint8 (N, K/block, block*bits/8), "scales": fp32 (N,
    K/block)}, packed by ONNX Runtime's C++ block quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=quant.block_size, is_symmetric=True, bits=quant.bits
    )
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_t, dtype=np.float32)
    )
    return {"packed": packed, "scales": scales}


def unpack_weight(packed: np.ndarray, K: int, bits: int, block_size: int) -> np.ndarray:
    """The signed integers (K, N) int8 of a MatMulNBits weight (int4: -8..7, int8: -128..127)."""
    N, blocks, _ = packed.shape
    if bits == 4:  # two values a byte, the first in the low nibble
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks * block_size)
    else:
        q = packed.reshape(N, blocks * block_size)
    return (q[:, :K].astype(np.int16) - 2 ** (bits - 1)).astype(np.int8).T


def dequantize_weight(
    packed: np.ndarray, scales: np.ndarray, K: int, bits: int, block_size: int
) -> np.ndarray:
    """The fp32 W^T (K, N) a MatMulNBits weight stands for (the inverse of quantize_weight)."""
    q = unpack_weight(packed, K, bits, block_size).astype(np.float32)  # (K, N)
    return q * np.repeat(scales.T, block_size, axis=0)[:K]


# The TensorRT view of a quantized artifact: standard Q/DQ, which needs opset 21 (blocked
# DequantizeLinear, INT4) and IR 10.
QDQ_OPSET, QDQ_IR_VERSION = 21, 10
QDQ_DATA = "qdq_weights.data"  # the view's own external data: the rewritten weights


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (any shape, int8 -8..7) as ONNX and TensorRT store INT4: row-major,
    two a byte, the first in the low nibble. Returns uint8 (ceil(n / 2),)."""
    nibbles = (q.reshape(-1) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def qdq_model(model_path: Path, out: Path, fp8_weights: bool = False) -> Path:
    """Write the TensorRT view of an artifact's graph to directory `out` and return its path:
    every MatMulNBits becomes DequantizeLinear (blocked along K, no zero point: symmetric) of an
    INT4/INT8 constant (K, N) with its scales (K / block, N), then MatMul, which TensorRT fuses
    into a weight-only quantized GEMM. With fp8_weights (an artifact of fp weights), every MatMul
    of a weight (K, N) becomes DequantizeLinear of a FLOAT8E4M3FN constant with a scale per
    column, then MatMul. The graph and the ops' function bodies move to opset 21; the artifact's
    own weight files are linked, not copied."""
    model = onnx.load(model_path, load_external_data=False)
    source = model_path.parent
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for name in {entry.value for tensor in model.graph.initializer
                 for entry in tensor.external_data if entry.key == "location"}:  # fmt: skip
        (out / name).symlink_to((source / name).resolve())
    rewrite = fp8_matmul if fp8_weights else nbits_matmul
    external = ExternalData(out / QDQ_DATA)
    nodes, dropped = [], set()
    try:
        for node in model.graph.node:
            rewritten = rewrite(node, weights, source, external)
            if rewritten is None:
                nodes.append(node)
                continue
            new_weights, replaced, new_nodes = rewritten
            model.graph.initializer.extend(new_weights)
            dropped.update(replaced)
            nodes += new_nodes
    finally:
        external.close()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for imports in [model.opset_import] + [f.opset_import for f in model.functions]:
        for opset in imports:
            if opset.domain in ("", "ai.onnx"):
                opset.version = QDQ_OPSET
        ms = [o for o in imports if o.domain == MS_DOMAIN]
        for opset in ms:
            imports.remove(opset)
    model.ir_version = QDQ_IR_VERSION
    path = out / model_path.name
    onnx.save(model, path)
    return path


Rewrite = tuple[list[TensorProto], set[str], list[onnx.NodeProto]]  # new weights, dropped, nodes


def nbits_matmul(node, weights: dict, source: Path, external: ExternalData) -> Rewrite | None:
    """A MatMulNBits as INT4/INT8 constant (K, N) -> blocked DequantizeLinear -> MatMul."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    K, N, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    x, packed_name, scales_name = node.input[:3]
    packed, scales = (read_tensor(weights[n], source) for n in (packed_name, scales_name))
    q = unpack_weight(packed, K, bits, block)  # (K, N)
    data = pack_int4(q) if bits == 4 else q.view(np.uint8).reshape(-1)
    element = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    w_q, w_scales, w = f"{packed_name}.qdq", f"{scales_name}.qdq", f"{node.output[0]}.weight"
    new = [external.raw(w_q, element, (K, N), data),
           external.tensor(w_scales, np.ascontiguousarray(scales.T))]  # (K / block, N)  # fmt: skip
    dequantize = helper.make_node("DequantizeLinear", [w_q, w_scales], [w],
                                  name=f"{node.name}/DequantizeLinear",
                                  axis=0, block_size=block)  # fmt: skip
    matmul = helper.make_node("MatMul", [x, w], list(node.output), name=f"{node.name}/MatMul")
    return new, {packed_name, scales_name}, [dequantize, matmul]


def fp8_matmul(node, weights: dict, source: Path, external: ExternalData) -> Rewrite | None:
    """A MatMul of a weight initializer (K, N) as FLOAT8E4M3FN constant -> DequantizeLinear (a
    scale per column, in the weight's dtype) -> MatMul."""
    if node.op_type != "MatMul" or node.input[1] not in weights:
        return None
    tensor = weights[node.input[1]]
    if len(tensor.dims) != 2:
        return None
    weight = read_tensor(tensor, source)  # (K, N)
    q, scales = fp8_columns(weight)
    w_q, w_scales, w = f"{tensor.name}.fp8", f"{tensor.name}.fp8_scale", f"{node.output[0]}.weight"
    new = [external.raw(w_q, TensorProto.FLOAT8E4M3FN, weight.shape, q.reshape(-1)),
           numpy_helper.from_array(scales.astype(weight.dtype), w_scales)]  # fmt: skip
    dequantize = helper.make_node("DequantizeLinear", [w_q, w_scales], [w], axis=1,
                                  name=f"{node.name}/DequantizeLinear")  # fmt: skip
    matmul = helper.make_node("MatMul", [node.input[0], w], list(node.output),
                              name=f"{node.name}/MatMul")  # fmt: skip
    return new, {tensor.name}, [dequantize, matmul]


def fp8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (K, N) -> its float8 e4m3 bytes (K, N) uint8 and fp32 scales (N,): each column as the
    torch backend's Fp8Linear keeps a weight row (model.quantize.to_fp8_rows)."""
    import torch

    from mosaicrt.model.quantize import to_fp8_rows

    rows, scales = to_fp8_rows(torch.from_numpy(np.array(weight, dtype=np.float32)).T)  # (N, K)
    return rows.T.contiguous().view(torch.uint8).numpy(), scales[:, 0].numpy()


def read_tensor(tensor: TensorProto, base: Path) -> np.ndarray:
    """An initializer's values, read from its external data file if it has one."""
    if tensor.data_location == TensorProto.EXTERNAL:
        tensor = TensorProto.FromString(tensor.SerializeToString())
        load_external_data_for_tensor(tensor, str(base))
    return numpy_helper.to_array(tensor)

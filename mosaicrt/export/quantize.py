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

import numpy as np

from mosaicrt.errors import InputError

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


def dequantize_weight(
    packed: np.ndarray, scales: np.ndarray, K: int, bits: int, block_size: int
) -> np.ndarray:
    """The fp32 W^T (K, N) a MatMulNBits weight stands for (the inverse of quantize_weight)."""
    N, blocks, _ = packed.shape
    if bits == 4:  # two values a byte, the first in the low nibble
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks, block_size)
    else:
        q = packed.reshape(N, blocks, block_size)
    values = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[:, :, None]  # (N, blocks, block)
    return values.reshape(N, blocks * block_size)[:, :K].T.copy()

"""Weight-only int8 for the torch backend: every nn.Linear of a model becomes an Int8Linear, one
int8 row and one scale per output feature, multiplied by PyTorch's int8 weight-packed matmul
(`aten._weight_int8pack_mm`, CPU). The embedding and the memories' state stay as they are."""

from __future__ import annotations

import torch
from torch import nn

from mosaicrt.errors import BackendError

PACKED_ROWS = 32  # more rows than this (a prefill chunk) run as a dense matmul
TORCH_SCHEMES = ("int8",)  # int4 (_weight_int4pack_mm) needs CUDA's tiled layout: not here yet


class Int8Linear(nn.Module):
    """x @ W^T with W (out, in) kept as int8 rows and one scale per row: max|row| / 127."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scales = weight.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)  # (out,) fp32
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        scales = self.scales.to(x.dtype)
        if rows.shape[0] > PACKED_ROWS:  # prefill: dequantize once, then one dense matmul
            y = rows @ (self.weight_int8.to(x.dtype) * scales[:, None]).T
        else:  # decode: read the int8 weights only
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, scales)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_linears(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by its `scheme` version; returns model."""
    if scheme not in TORCH_SCHEMES:
        raise BackendError(
            f"the torch backend quantizes weights to {' or '.join(TORCH_SCHEMES)}, not "
            f"{scheme!r}: use int8, or an ONNX artifact (`mosaicrt export --quantize {scheme}`)"
        )
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise BackendError(
            f"--quantize {scheme} on the torch backend runs on the CPU (PyTorch's int8 "
            "weight-packed matmul): use --device cpu"
        )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model

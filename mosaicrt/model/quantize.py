"""Weight-only quantization for the torch backend, where PyTorch has the kernels. Every nn.Linear
of a model becomes
- int8 (CPU): an Int8Linear, one int8 row and one scale per output feature, multiplied by
  PyTorch's int8 weight-packed matmul (`aten._weight_int8pack_mm`);
- int4 (CUDA): an Int4Linear, symmetric int4 in groups of INT4_GROUP inputs with one scale per
  group and output, multiplied by PyTorch's tiled int4 matmul (`aten._weight_int4pack_mm`, bf16
  activations, sm80+). PyTorch's CPU int4 matmul exists but ran 16x slower than an fp32 matmul on
  a 1024 x 1024 weight here, so the CPU layout serves the tests only;
- fp8 (CUDA): an Fp8Linear, float8 e4m3 weights with one scale per output feature, and each
  activation row quantized to float8 with its own scale as it comes, multiplied by PyTorch's
  row-wise scaled fp8 matmul (`torch._scaled_mm`, bf16 out, sm89+). It runs on the CPU too, 80x
  slower than an fp32 matmul at batch 1 here, so there it serves the tests only.
The embedding and the memories' state stay as they are."""

from __future__ import annotations

import torch
from torch import nn

from mosaicrt.errors import BackendError

PACKED_ROWS = 32  # more rows than this (a prefill chunk) run as a dense matmul
TORCH_SCHEMES = {"int8": "cpu", "int4": "cuda", "fp8": "cuda"}  # scheme -> its kernel's device
INT4_GROUP = 128  # inputs per int4 scale (tinygemm takes 32, 64, 128 or 256)
INT4_INNER_K_TILES = 8  # tinygemm's tiling of the input dimension (2, 4 or 8)


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


class Int4Linear(nn.Module):
    """x @ W^T with W (out, in) as symmetric int4 in groups of `group` inputs:
    W[n, k] ~= (q[n, k] - 8) * scale[k // group, n], q in 0..15, scale = max|group| / 7.
    The weight is packed in the tiled layout of the device's int4 matmul (CUDA: bf16 products;
    CPU: fp32, for tests)."""

    SHAPES = f"in_features a multiple of {INT4_GROUP}, out_features of 16"

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        N, K = weight.shape
        if not Int4Linear.fits(linear, group):
            raise BackendError(
                f"int4 weights need in_features a multiple of {group} and of "
                f"{INT4_INNER_K_TILES * 16} and out_features a multiple of 16; this Linear is "
                f"{K} -> {N}: use --quantize int8 or an ONNX artifact"
            )
        groups = weight.reshape(N, K // group, group)
        scale = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 7.0
        q = (torch.clamp(torch.round(groups / scale[..., None]), -8, 7) + 8).reshape(N, K)
        if weight.is_cuda:  # two values a byte, the first in the high nibble
            q = q.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).contiguous(), INT4_INNER_K_TILES
            )
            dtype = torch.bfloat16
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), INT4_INNER_K_TILES
            )
            dtype = torch.float32
        # (K / group, N, 2): each group's scale and offset (0: symmetric)
        scales_and_zeros = torch.stack([scale.T, torch.zeros_like(scale.T)], -1)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype).contiguous())
        self.group, self.dtype = group, dtype
        self.in_features, self.out_features = K, N

    @staticmethod
    def fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
        """Can the int4 kernels take this Linear's shape?"""
        K, N = linear.in_features, linear.out_features
        return K % group == 0 and K % (INT4_INNER_K_TILES * 16) == 0 and N % 16 == 0

    def dequantized(self) -> torch.Tensor:
        """W (out, in) fp32 as the int4 weights stand for it (through the matmul itself)."""
        eye = torch.eye(self.in_features, device=self.weight_int4.device)
        return self.matmul(eye).float().T

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.dtype)
        if self.weight_int4.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(
                rows, self.weight_int4, self.group, self.scales_and_zeros
            )
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.weight_int4, self.group, self.scales_and_zeros
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8Linear(nn.Module):
    """x @ W^T with W (out, in) as float8 e4m3 rows, W[n] ~= w8[n] * w_scale[n] (max|row| / 448),
    and x quantized row by row the same way as it comes (dynamic, per token)."""

    SHAPES = "in_features and out_features multiples of 16"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        N, K = weight.shape
        if not Fp8Linear.fits(linear):
            raise BackendError(
                f"fp8 weights need {Fp8Linear.SHAPES}; this Linear is {K} -> {N}: use "
                "--quantize int4 or int8"
            )
        weight_fp8, scale = to_fp8_rows(weight)
        self.register_buffer("weight_fp8", weight_fp8)  # (out, in) float8_e4m3fn
        self.register_buffer("weight_scale", scale.T.contiguous())  # (1, out) fp32
        self.in_features, self.out_features = K, N

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Can the fp8 matmul take this Linear's shape?"""
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, row_scale = to_fp8_rows(x.reshape(-1, self.in_features))  # (M, in), (M, 1)
        out = torch.bfloat16 if rows.is_cuda else torch.float32  # row-wise scaling: bf16 on CUDA
        y = torch._scaled_mm(rows, self.weight_fp8.T, scale_a=row_scale,
                             scale_b=self.weight_scale, out_dtype=out)  # fmt: skip
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def to_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 e4m3 (M, K) and fp32 scales (M, 1): x ~= q * scale, scale = max|row| /
    448 (e4m3's largest value)."""
    x = x.float()
    top = torch.finfo(torch.float8_e4m3fn).max
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / top
    return (x / scale).clamp(-top, top).to(torch.float8_e4m3fn), scale


QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


def quantize_linears(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by its `scheme` version (int4, fp8: every
    one whose shape the kernels take), on the device the scheme's kernel runs on; returns model."""
    if scheme not in TORCH_SCHEMES:
        raise BackendError(
            f"the torch backend quantizes weights to int8 (CPU), int4 or fp8 (CUDA), not "
            f"{scheme!r}: use one of those, or an ONNX artifact (`mosaicrt export --quantize "
            f"int4|int8`)"
        )
    device = next(model.parameters()).device
    if device.type != TORCH_SCHEMES[scheme]:
        runs_here = [name for name, kind in TORCH_SCHEMES.items() if kind == device.type]
        other = f"--quantize {runs_here[0]}" if runs_here else "a CPU or a CUDA device"
        raise BackendError(
            f"--quantize {scheme} on the torch backend runs on {TORCH_SCHEMES[scheme]} only "
            f"(PyTorch's {scheme} matmul is fast there only), not on {device.type}: use {other}, "
            f"or an ONNX artifact (`mosaicrt export --quantize int4|int8`)"
        )
    if scheme == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        raise BackendError(
            f"--quantize fp8 needs a GPU with fp8 matmuls (sm89 or newer); this one is sm"
            f"{''.join(map(str, torch.cuda.get_device_capability(device)))}: use --quantize int4"
        )
    return replace_linears(model, scheme)


def replace_linears(model: nn.Module, scheme: str) -> nn.Module:
    """Every nn.Linear of `model` whose shape `scheme`'s kernel takes, replaced in place (no
    device check: quantize_linears makes it)."""
    cls = QUANTIZED_LINEARS[scheme]
    linears = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, nn.Linear)
    ]
    if hasattr(cls, "fits"):  # layers too narrow for the kernels (the key gates: d -> H) stay
        linears = [(parent, name, child) for parent, name, child in linears if cls.fits(child)]
        if not linears:
            raise BackendError(
                f"no Linear layer of this model fits the {scheme} kernels ({cls.SHAPES}): use "
                "--quantize int8 or an ONNX artifact"
            )
    for parent, name, child in linears:
        setattr(parent, name, cls(child))
    return model

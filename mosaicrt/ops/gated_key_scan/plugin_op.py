"""GatedKeyScan through the Triton kernel, on the step graph's tensors: what the TensorRT plugin's
enqueue runs, and what `--kernels triton` gives the torch backend."""

from __future__ import annotations

import torch

from mosaicrt.ops import PluginSpec
from mosaicrt.ops.gated_key_scan import NAME


def gated_key_scan(
    k_raw: torch.Tensor,
    log_g: torch.Tensor,
    log_lam: torch.Tensor,
    valid: torch.Tensor,
    s: torch.Tensor,
    mx: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op with the state updated in place (s (B, H, hs), mx (B, H)); valid (B, C) bool is a
    prefix of each row. Returns the keys (B, C, H, hs), written into `out` when given."""
    from mosaicrt.ops.gated_key_scan.kernel import gated_key_scan as kernel

    return kernel(k_raw, log_g, log_lam, valid.sum(dim=1), s, mx, eps, out=out)


def run(inputs: list, outputs: list, fields: dict) -> None:
    """The plugin's enqueue: k_raw, log_g, log_lam, valid, s_in, mx_in -> keys, s_out, mx_out."""
    k_raw, log_g, log_lam, valid, s_in, mx_in = inputs
    keys, s_out, mx_out = outputs
    s_out.copy_(s_in)
    mx_out.copy_(mx_in)
    gated_key_scan(k_raw, log_g, log_lam, valid, s_out, mx_out, fields["eps"], out=keys)


PLUGIN = PluginSpec(
    name=NAME,
    inputs=(("float32",), ("float32",), ("float32",), ("bool",), ("float32",), ("float32",)),
    same_type={},
    outputs=(0, 4, 5),
    fields={"eps": float},
    run=run,
)

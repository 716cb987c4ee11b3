"""AssociativeMemory through the Triton kernel, on the step graph's tensors: what the TensorRT
plugin's enqueue runs, and what `--kernels triton` gives the torch backend.

The kernel derives visibility from each row's position and length instead of reading tau tensors;
the graph's tensors determine both (t = pos + j; new_tau = t - 1 for real tokens with t >= 1, else
-1), so they are taken from there. beta(n_t) is applied here, before the kernel.
"""

from __future__ import annotations

import functools

import torch

from mosaicrt.ops import STORE_TYPES, PluginSpec
from mosaicrt.ops.associative_memory import NAME, NAME_FP8, NAME_INT8
from mosaicrt.ops.geometry import bandwidth, has_window, visible_count


def associative_memory(
    q: torch.Tensor,
    t: torch.Tensor,
    store_k: torch.Tensor,
    store_v: torch.Tensor,
    store_blocks: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_tau: torch.Tensor,
    beta0: torch.Tensor,
    beta1: torch.Tensor,
    alpha: torch.Tensor,
    window: int,
    delay: int,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The op (its store_tau input implied by the positions): stores pools (P, H, S, hs) read
    through store_blocks (B, NB); a store with a window is a ring; int8 and fp8 stores come with
    their scales (P, H, S). Returns y (B, C, H, hs) fp32."""
    from mosaicrt.ops.associative_memory.kernel import retrieve_any

    pos = t[:, 0].contiguous()
    # Real tokens: those whose pair exists (new_tau >= 0), plus a sequence's first token, whose pair
    # (tau = -1) does not. A row of no tokens at position 0 counts one: it sees nothing either way.
    lengths = (new_tau >= 0).sum(dim=1) + (pos == 0)
    beta = bandwidth(visible_count(t, window, delay).float(), beta0, beta1, alpha)  # (B, C, H)
    qb = (q.float() * beta[..., None]).contiguous()
    ring = has_window(window)
    return retrieve_any(qb, store_k, store_v, new_k.contiguous(), new_v.contiguous(), pos,
                        lengths, window=window if ring else 0, delay=delay, ring=ring,
                        blocks=store_blocks, scales=scales)  # fmt: skip


def run(inputs: list, outputs: list, fields: dict, fp8: bool = False) -> None:
    """The plugin's enqueue on torch views of TensorRT's buffers (AssociativeMemoryInt8 and -Fp8:
    two more inputs, the stores' scales; fp8: the int8 stores hold the bits of e4m3 values)."""
    q, t, store_k, store_v, blocks, _store_tau, new_k, new_v, new_tau, beta0, beta1, alpha = inputs[
        :12
    ]
    scales = tuple(inputs[12:]) or None
    if fp8:
        store_k, store_v = store_k.view(torch.float8_e4m3fn), store_v.view(torch.float8_e4m3fn)
    y = associative_memory(q, t, store_k, store_v, blocks, new_k, new_v, new_tau, beta0, beta1,
                           alpha, fields["window"], fields["delay"], scales)  # fmt: skip
    outputs[0].copy_(y)


PLUGIN = PluginSpec(
    name=NAME,
    # q, t, store_k, store_v, store_blocks, store_tau, new_k, new_v, new_tau, beta0, beta1,
    # alpha -> y
    inputs=(
        ("float32",),
        ("int64",),
        STORE_TYPES,
        STORE_TYPES,
        ("int64",),
        ("int64",),
        ("float32",),
        ("float32",),
        ("int64",),
        ("float32",),
        ("float32",),
        ("float32",),
    ),  # fmt: skip
    same_type={3: 2},
    outputs=(0,),
    fields={"window": int, "delay": int},
    run=run,
)


def scaled_plugin(name: str, fp8: bool) -> PluginSpec:
    """AssociativeMemory's plugin over int8 stores (fp8: the bits of e4m3 values), then
    store_k_scale, store_v_scale (P, H, S) fp32."""
    return PluginSpec(
        name=name,
        inputs=PLUGIN.inputs[:2] + (("int8",),) * 2 + PLUGIN.inputs[4:] + (("float32",),) * 2,
        same_type={},
        outputs=(0,),
        fields=PLUGIN.fields,
        run=functools.partial(run, fp8=fp8),
    )


PLUGIN_INT8 = scaled_plugin(NAME_INT8, fp8=False)
PLUGIN_FP8 = scaled_plugin(NAME_FP8, fp8=True)

"""AssociativeMemory through the Triton kernel, on the step graph's tensors: what the TensorRT
plugin's enqueue runs, and what `--kernels triton` gives the torch backend.

The kernel derives visibility from each row's position and length instead of reading tau tensors;
the graph's tensors determine both (t = pos + j; new_tau = t - 1 for real tokens with t >= 1, else
-1), so they are taken from there. beta(n_t) is applied here, before the kernel.
"""

from __future__ import annotations

import torch

from mosaicrt.ops import STORE_TYPES, PluginSpec
from mosaicrt.ops.associative_memory import NAME, NAME_INT8
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
    through store_blocks (B, NB); a store with a window is a ring; int8 stores come with their
    scales (P, H, S). Returns y (B, C, H, hs) fp32."""
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


def run(inputs: list, outputs: list, fields: dict) -> None:
    """The plugin's enqueue on torch views of TensorRT's buffers (AssociativeMemoryInt8: two
    more inputs, the stores' scales)."""
    q, t, store_k, store_v, blocks, _store_tau, new_k, new_v, new_tau, beta0, beta1, alpha = inputs[
        :12
    ]
    scales = tuple(inputs[12:]) or None
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

PLUGIN_INT8 = PluginSpec(
    name=NAME_INT8,
    # AssociativeMemory's inputs with int8 stores, then store_k_scale, store_v_scale (P, H, S)
    inputs=PLUGIN.inputs[:2] + (("int8",), ("int8",)) + PLUGIN.inputs[4:] + (("float32",),) * 2,
    same_type={},
    outputs=(0,),
    fields=PLUGIN.fields,
    run=run,
)

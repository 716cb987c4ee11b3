"""The associative-memory ops, one folder each, side by side: the ground floor of mosaicrt.

Each op folder holds, in order: the op's contract (its package docstring), `reference.py` (torch,
what the reference model runs), `onnx.py` (the ONNX function body stock ONNX Runtime inlines),
`kernel.py` (the Triton kernel) and `plugin_op.py` (the op on the step graph's tensors through the
kernel: what a TensorRT plugin's enqueue runs, and its plugin description). `geometry.py` holds the
memory geometry every implementation shares. README.md has the checklist for adding an op or a
backend.

Nothing here imports a later stage (model, export, plugins, runtime); the stages use the ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DOMAIN = "mosaic"  # ONNX domain of the ops, and the TensorRT plugins' namespace
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
OP_FOLDERS = ("gated_key_scan", "associative_memory")
STORE_TYPES = ("float32", "float16", "bfloat16")  # what a store may hold


@dataclass(frozen=True)
class PluginSpec:
    """What a TensorRT plugin needs to know about one op, in terms of no TensorRT version.

    inputs: per input, the element types it accepts ("float32", "int64", "bool", ...).
    same_type: input index -> the input whose type it must share.
    outputs: per output, the input whose shape it has (all outputs are float32).
    fields: attribute name -> int, float or str.
    run: (inputs, outputs, fields) on torch tensors, writes the outputs.
    """

    name: str
    inputs: tuple[tuple[str, ...], ...]
    same_type: dict[int, int]
    outputs: tuple[int, ...]
    fields: dict[str, type]
    run: Callable


def plugin_specs() -> dict[str, PluginSpec]:
    """Every op's plugin description, by op name."""
    from mosaicrt.ops.associative_memory.plugin_op import PLUGIN as memory
    from mosaicrt.ops.associative_memory.plugin_op import PLUGIN_FP8 as memory_fp8
    from mosaicrt.ops.associative_memory.plugin_op import PLUGIN_INT8 as memory_int8
    from mosaicrt.ops.gated_key_scan.plugin_op import PLUGIN as scan

    return {spec.name: spec for spec in (scan, memory, memory_int8, memory_fp8)}


def source_files() -> list[Path]:
    """The files whose code runs inside a plugin (hashed into an engine's build manifest)."""
    root = Path(__file__).parent
    return [root / "__init__.py", root / "geometry.py"] + [
        root / folder / name
        for folder in OP_FOLDERS
        for name in ("__init__.py", "kernel.py", "plugin_op.py")
    ]

"""The `mosaic` ops as the step graph uses them: every op's ONNX function body (mosaicrt.ops) and
the attributes that let TensorRT's parser pick a registered plugin instead.

Stock ONNX Runtime inlines the bodies, so it needs no custom library; TensorRT's parser imports a
node as the plugin of that name because every node carries `plugin_namespace`.
"""

from __future__ import annotations

import onnx

from mosaicrt.ops import DOMAIN, PLUGIN_VERSION
from mosaicrt.ops.associative_memory import NAME
from mosaicrt.ops.associative_memory import onnx as associative_memory
from mosaicrt.ops.gated_key_scan import onnx as gated_key_scan


def functions(memory_op: str = NAME) -> list[onnx.FunctionProto]:
    """The function bodies of the ops a step graph uses, for the model's function list: its
    AssociativeMemory op is `memory_op` (AssociativeMemoryInt8 or -Fp8 for scaled stores)."""
    return [gated_key_scan.function(), associative_memory.function(memory_op)]


def plugin_attrs() -> dict[str, str]:
    """Attributes that let TensorRT parsers pick a registered plugin over the function body."""
    return {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}

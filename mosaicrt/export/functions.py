"""The `mosaic` ops as the step graph uses them: every op's ONNX function body (mosaicrt.ops) and
the attributes that let TensorRT's parser pick a registered plugin instead.

Stock ONNX Runtime inlines the bodies, so it needs no custom library; TensorRT's parser imports a
node as the plugin of that name because every node carries `plugin_namespace`.
"""

from __future__ import annotations

import onnx

from mosaicrt.ops import DOMAIN, PLUGIN_VERSION
from mosaicrt.ops.associative_memory import onnx as associative_memory
from mosaicrt.ops.gated_key_scan import onnx as gated_key_scan


def functions(int8_stores: bool = False) -> list[onnx.FunctionProto]:
    """The function bodies of the ops a step graph uses, for the model's function list:
    AssociativeMemoryInt8 in place of AssociativeMemory for int8 stores."""
    return [gated_key_scan.function(), associative_memory.function(int8_stores)]


def plugin_attrs() -> dict[str, str]:
    """Attributes that let TensorRT parsers pick a registered plugin over the function body."""
    return {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}

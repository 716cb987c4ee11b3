"""TensorRT plugins for the `mosaic` ops: class-based Python IPluginV3 plugins with
IPluginCreatorV3One creators (namespace "mosaic", version "1"), for full TensorRT (`tensorrt`) and
TensorRT-RTX (`tensorrt_rtx`) alike, whichever is installed (full TensorRT first).

One generic plugin class serves every op: what differs per op (input types, output shapes,
attributes, what enqueue runs) is the op's PluginSpec (mosaicrt.ops.*.plugin_op). A plugin's build
side is plain TensorRT; its enqueue views TensorRT's device pointers as torch tensors and runs the
op's Triton kernel on TensorRT's stream. The engine stores the attributes; the deserializing process
must call `register()` before it deserializes (a Python plugin cannot be embedded in an engine).

Importing this module does nothing else: TensorRT is imported on first use (`load_tensorrt`), and
TensorRT-RTX's parser link is made by `register()`, which says so when it makes it.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from mosaicrt.errors import BackendError
from mosaicrt.ops import DOMAIN, PLUGIN_VERSION, PluginSpec, plugin_specs


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType  # tensorrt or tensorrt_rtx
    flavour: str  # "tensorrt" or "tensorrt_rtx"

    @property
    def version(self) -> str:
        return self.module.__version__


@functools.cache
def load_tensorrt() -> TensorRT:
    """Full TensorRT if it imports, else TensorRT-RTX, else a clear error."""
    try:
        import tensorrt as trt

        trt.Builder  # the PyPI placeholder package imports but has no bindings
        return TensorRT(trt, "tensorrt")
    except (ImportError, AttributeError, OSError):
        pass
    try:
        import tensorrt_rtx as trt
    except (ImportError, OSError):
        raise BackendError(
            "TensorRT is not installed: pip install 'mosaicrt[tensorrt]' (TensorRT-RTX, builds "
            "engines on any machine) or NVIDIA's full TensorRT for your GPU"
        ) from None
    return TensorRT(trt, "tensorrt_rtx")


def rtx_parser_alias() -> str | None:
    """TensorRT-RTX's ONNX parser dlopens the unversioned libtensorrt_rtx.so to add a plugin layer;
    the wheel ships only libtensorrt_rtx.so.1, and without the alias the process aborts. Makes the
    link if it is missing; returns what was done (None if nothing)."""
    import tensorrt_rtx_libs

    libs = os.path.dirname(tensorrt_rtx_libs.__file__)
    alias = os.path.join(libs, "libtensorrt_rtx.so")
    if os.path.lexists(alias):
        return None
    try:
        os.symlink("libtensorrt_rtx.so.1", alias)
    except OSError as e:
        raise BackendError(
            f"TensorRT-RTX's parser needs {alias} and it cannot be created ({e.strerror}): run "
            f"`ln -s libtensorrt_rtx.so.1 {alias}` once with write access to {libs}"
        ) from None
    return f"created {alias} -> libtensorrt_rtx.so.1 (TensorRT-RTX's ONNX parser loads it)"


def trt_type(name: str):
    """The TensorRT DataType of an element type name of a PluginSpec."""
    trt = load_tensorrt().module
    return {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF,
            "bfloat16": trt.DataType.BF16, "int64": trt.DataType.INT64,
            "int8": trt.DataType.INT8, "bool": trt.DataType.BOOL}[name]  # fmt: skip


def field_types() -> dict:
    trt = load_tensorrt().module
    return {
        int: (trt.PluginFieldType.INT64, np.int64),
        float: (trt.PluginFieldType.FLOAT32, np.float32),
        str: (trt.PluginFieldType.CHAR, np.int8),
    }


def encode_fields(spec: PluginSpec, fields: dict) -> tuple:
    """The plugin's attributes as TensorRT serializes them into the engine, and the arrays behind
    them: a PluginField points at its array's memory, so the caller keeps them alive."""
    trt, types = load_tensorrt().module, field_types()
    arrays, out = [], []
    for name, kind in spec.fields.items():
        field_type, dtype = types[kind]
        value = fields[name]
        data = np.frombuffer(value.encode(), np.int8) if kind is str else np.array([value], dtype)
        arrays.append(data)
        out.append(trt.PluginField(name, data, field_type))
    return trt.PluginFieldCollection(out), arrays


def decode_fields(spec: PluginSpec, collection) -> dict:
    """Attributes from a PluginFieldCollection (the parser's, INT as int32, or the engine's)."""
    fields = {}
    for field in collection:
        kind = spec.fields.get(field.name)
        if kind is None:
            continue  # plugin_namespace, plugin_version: for the parser only
        data = np.asarray(field.data)
        fields[field.name] = (
            data.astype(np.uint8).tobytes().decode().rstrip("\0") if kind is str else kind(data[0])
        )
    missing = set(spec.fields) - set(fields)
    if missing:
        raise BackendError(f"mosaic::{spec.name} is missing attributes {sorted(missing)}")
    return fields


_TORCH_VIEWS = {  # element type -> (array-interface typestr, torch dtype to view as)
    "float32": ("<f4", None),
    "float16": ("<f2", None),
    "bfloat16": ("<i2", "bfloat16"),  # no array-interface code for bf16: bits as int16, then a view
    "int64": ("<i8", None),
    "int8": ("|i1", None),
    "bool": ("|b1", None),
}


class _DeviceArray:
    """A raw device pointer with a __cuda_array_interface__, for torch.as_tensor (no copy)."""

    def __init__(self, pointer: int, shape: tuple, typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "data": (pointer, False),
            "shape": shape,
            "typestr": typestr,
            "version": 3,
        }


@functools.cache
def _views_by_trt_type() -> dict:
    return {trt_type(name): view for name, view in _TORCH_VIEWS.items()}


def device_tensor(pointer: int, desc):
    """TensorRT's device pointer as a torch tensor of the descriptor's type and shape."""
    import torch

    typestr, view = _views_by_trt_type()[desc.type]
    tensor = torch.as_tensor(_DeviceArray(pointer, tuple(desc.dims), typestr), device="cuda")
    return tensor.view(getattr(torch, view)) if view else tensor


def plugin_classes() -> tuple[type, type]:
    """(MosaicPlugin, MosaicPluginCreator), built on the TensorRT this process loads."""
    from mosaicrt.plugins import plugin_class

    return plugin_class.MosaicPlugin, plugin_class.MosaicPluginCreator


_CREATORS: list = []  # the registry does not keep Python creators alive


def register(log=lambda message: print(message, file=sys.stderr)) -> list[str]:
    """Load TensorRT and register the mosaic plugin creators (once per process); returns the op
    names. With TensorRT-RTX, first makes the parser's library link if it is missing (logged)."""
    tensorrt = load_tensorrt()
    if tensorrt.flavour == "tensorrt_rtx":
        done = rtx_parser_alias()
        if done:
            log(done)
    registry = tensorrt.module.get_plugin_registry()
    creator_class = plugin_classes()[1]
    specs = plugin_specs()
    for spec in specs.values():
        if registry.get_creator(spec.name, PLUGIN_VERSION, DOMAIN) is None:
            creator = creator_class(spec)
            registry.register_creator(creator, DOMAIN)
            _CREATORS.append(creator)
    return list(specs)

"""TensorRT plugins for the `mosaic` ops: class-based Python IPluginV3 plugins with
IPluginCreatorV3One creators (namespace "mosaic", version "1"), for full TensorRT (`tensorrt`) and
TensorRT-RTX (`tensorrt_rtx`) alike, whichever is installed (full TensorRT first).

A plugin's build side (output shapes and types, formats, fields) is plain TensorRT; its enqueue
views TensorRT's device pointers as torch tensors and runs mosaicrt.plugins.ops (the Triton
kernels) on TensorRT's stream. The engine stores the fields; the deserializing process must call
`register()` before it deserializes (a Python plugin cannot be embedded in an engine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

from mosaicrt.errors import BackendError
from mosaicrt.export.ops import DOMAIN, PLUGIN_VERSION


def import_tensorrt() -> tuple[ModuleType, str]:
    """(module, flavour): full TensorRT if it imports, else TensorRT-RTX, else a clear error."""
    try:
        import tensorrt as trt

        trt.Builder  # the PyPI placeholder package imports but has no bindings
        return trt, "tensorrt"
    except (ImportError, AttributeError, OSError):
        pass
    try:
        import tensorrt_rtx as trt
    except (ImportError, OSError):
        raise BackendError(
            "TensorRT is not installed: pip install 'mosaicrt[tensorrt]' (TensorRT-RTX, builds "
            "engines on any machine) or NVIDIA's full TensorRT for your GPU"
        ) from None
    rtx_parser_alias()
    return trt, "tensorrt_rtx"


def rtx_parser_alias() -> None:
    """TensorRT-RTX's ONNX parser dlopens the unversioned libtensorrt_rtx.so to add a plugin layer;
    the wheel ships only libtensorrt_rtx.so.1, and without the alias the process aborts."""
    import tensorrt_rtx_libs

    libs = os.path.dirname(tensorrt_rtx_libs.__file__)
    alias = os.path.join(libs, "libtensorrt_rtx.so")
    if os.path.lexists(alias):
        return
    try:
        os.symlink("libtensorrt_rtx.so.1", alias)
    except OSError as e:
        raise BackendError(
            f"TensorRT-RTX's parser needs {alias} and it cannot be created ({e.strerror}): run "
            f"`ln -s libtensorrt_rtx.so.1 {alias}` once with write access to {libs}"
        ) from None


trt, FLAVOUR = import_tensorrt()
F32, F16, BF16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
I64, BOOL = trt.DataType.INT64, trt.DataType.BOOL
STORE_TYPES = (F32, F16, BF16)


@dataclass(frozen=True)
class OpSpec:
    """What TensorRT needs to know about one mosaic op (its ONNX signature: mosaicrt.export.ops)."""

    name: str
    inputs: tuple[tuple, ...]  # per input: the data types it accepts
    same_type: dict[int, int]  # input index -> the input whose type it must share
    outputs: tuple[int, ...]  # per output: the input whose shape it has (all outputs fp32)
    fields: dict[str, type]  # attribute name -> int, float or str
    run: Callable  # (inputs, outputs, fields) on torch tensors


def _run_scan(inputs: list, outputs: list, fields: dict) -> None:
    from mosaicrt.plugins.ops import gated_key_scan_op

    gated_key_scan_op(*inputs, fields["eps"], *outputs)


def _run_memory(inputs: list, outputs: list, fields: dict) -> None:
    from mosaicrt.plugins.ops import associative_memory_op

    q, t, store_k, store_v, _store_tau, new_k, new_v, new_tau, beta0, beta1, alpha = inputs
    associative_memory_op(q, t, store_k, store_v, new_k, new_v, new_tau, beta0, beta1, alpha,
                          fields["kind"], fields["window"], fields["delay"],
                          outputs[0])  # fmt: skip


OPS = {
    "GatedKeyScan": OpSpec(
        name="GatedKeyScan",
        # k_raw, log_g, log_lam, valid, s_in, mx_in -> keys, s_out, mx_out
        inputs=((F32,), (F32,), (F32,), (BOOL,), (F32,), (F32,)),
        same_type={},
        outputs=(0, 4, 5),
        fields={"eps": float},
        run=_run_scan,
    ),
    "AssociativeMemory": OpSpec(
        name="AssociativeMemory",
        # q, t, store_k, store_v, store_tau, new_k, new_v, new_tau, beta0, beta1, alpha -> y
        inputs=(
            (F32,),
            (I64,),
            STORE_TYPES,
            STORE_TYPES,
            (I64,),
            (F32,),
            (F32,),
            (I64,),
            (F32,),
            (F32,),
            (F32,),
        ),  # fmt: skip
        same_type={3: 2},
        outputs=(0,),
        fields={"kind": str, "window": int, "delay": int},
        run=_run_memory,
    ),
}

_FIELD_TYPES = {
    int: (trt.PluginFieldType.INT64, np.int64),
    float: (trt.PluginFieldType.FLOAT32, np.float32),
    str: (trt.PluginFieldType.CHAR, np.int8),
}


def encode_fields(spec: OpSpec, fields: dict) -> tuple[trt.PluginFieldCollection, list]:
    """The plugin's attributes as TensorRT serializes them into the engine, and the arrays behind
    them: a PluginField points at its array's memory, so the caller keeps them alive."""
    arrays, out = [], []
    for name, kind in spec.fields.items():
        field_type, dtype = _FIELD_TYPES[kind]
        value = fields[name]
        data = np.frombuffer(value.encode(), np.int8) if kind is str else np.array([value], dtype)
        arrays.append(data)
        out.append(trt.PluginField(name, data, field_type))
    return trt.PluginFieldCollection(out), arrays


def decode_fields(spec: OpSpec, collection) -> dict:
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


_TORCH_VIEWS = {  # TensorRT type -> (array-interface typestr, torch dtype to view as)
    F32: ("<f4", None),
    F16: ("<f2", None),
    BF16: ("<i2", "bfloat16"),  # no array-interface code for bf16: bits as int16, then a view
    I64: ("<i8", None),
    BOOL: ("|b1", None),
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


def device_tensor(pointer: int, desc):
    import torch

    typestr, view = _TORCH_VIEWS[desc.type]
    tensor = torch.as_tensor(_DeviceArray(pointer, tuple(desc.dims), typestr), device="cuda")
    return tensor.view(getattr(torch, view)) if view else tensor


class MosaicPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):  # fmt: skip  # noqa: E501
    """One mosaic op as a TensorRT plugin."""

    def __init__(self, spec: OpSpec, fields: dict) -> None:
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.spec, self.fields = spec, dict(fields)
        self.plugin_name, self.plugin_namespace = spec.name, DOMAIN
        self.plugin_version, self.num_outputs = PLUGIN_VERSION, len(spec.outputs)

    # IPluginV3
    def get_capability_interface(self, capability_type):
        return self

    def clone(self) -> MosaicPlugin:
        return MosaicPlugin(self.spec, self.fields)

    # Build
    def get_output_data_types(self, input_types) -> list:
        return [F32] * len(self.spec.outputs)

    def get_output_shapes(self, inputs, shape_inputs, expr_builder) -> list:
        return [inputs[i] for i in self.spec.outputs]

    def supports_format_combination(self, pos: int, in_out, num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format != trt.TensorFormat.LINEAR:
            return False
        if pos >= num_inputs:
            return desc.type == F32
        if pos in self.spec.same_type:
            return desc.type == in_out[self.spec.same_type[pos]].desc.type
        return desc.type in self.spec.inputs[pos]

    def configure_plugin(self, inputs, outputs) -> None:
        pass

    def get_workspace_size(self, inputs, outputs) -> int:
        return 0

    def get_valid_tactics(self) -> list:
        return []

    def set_tactic(self, tactic: int) -> None:
        pass

    # Runtime
    def on_shape_change(self, inputs, outputs) -> None:
        pass

    def attach_to_context(self, context) -> MosaicPlugin:
        return self.clone()

    def get_fields_to_serialize(self) -> trt.PluginFieldCollection:
        collection, self._field_arrays = encode_fields(self.spec, self.fields)
        return collection

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ins = [device_tensor(p, d) for p, d in zip(inputs, input_desc)]
            outs = [device_tensor(p, d) for p, d in zip(outputs, output_desc)]
            self.spec.run(ins, outs, self.fields)


class MosaicPluginCreator(trt.IPluginCreatorV3One):
    def __init__(self, spec: OpSpec) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        self.spec = spec
        self.name, self.plugin_namespace, self.plugin_version = spec.name, DOMAIN, PLUGIN_VERSION
        self._field_arrays = [np.zeros(0, _FIELD_TYPES[kind][1]) for kind in spec.fields.values()]
        self.field_names = trt.PluginFieldCollection(
            [
                trt.PluginField(name, data, _FIELD_TYPES[kind][0])
                for (name, kind), data in zip(spec.fields.items(), self._field_arrays)
            ]
        )

    def create_plugin(self, name: str, field_collection, phase) -> MosaicPlugin:
        return MosaicPlugin(self.spec, decode_fields(self.spec, field_collection))


_CREATORS: list[MosaicPluginCreator] = []  # the registry does not keep Python creators alive


def register() -> list[str]:
    """Register the mosaic plugin creators (once per process); returns their names."""
    registry = trt.get_plugin_registry()
    for spec in OPS.values():
        if registry.get_creator(spec.name, PLUGIN_VERSION, DOMAIN) is None:
            creator = MosaicPluginCreator(spec)
            registry.register_creator(creator, DOMAIN)
            _CREATORS.append(creator)
    return list(OPS)

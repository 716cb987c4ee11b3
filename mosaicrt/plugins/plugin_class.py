"""The generic TensorRT plugin class and its creator, built on the TensorRT this process loads:
importing this module imports TensorRT (mosaicrt.plugins.tensorrt imports it on first use only).
"""

from __future__ import annotations

import numpy as np

from mosaicrt.ops import DOMAIN, PLUGIN_VERSION, PluginSpec
from mosaicrt.plugins.tensorrt import (
    decode_fields,
    device_tensor,
    encode_fields,
    field_types,
    load_tensorrt,
    trt_type,
)

trt = load_tensorrt().module
F32, BUILD = trt.DataType.FLOAT, trt.TensorRTPhase.BUILD


class MosaicPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):  # fmt: skip  # noqa: E501
    """One mosaic op as a TensorRT plugin. A plugin made in the BUILD phase (the builder
    times tactics with made-up inputs) writes zeros instead of running the op: its kernels
    take loop bounds from the position inputs, which hold garbage then."""

    def __init__(self, spec: PluginSpec, fields: dict, phase=None) -> None:
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.spec, self.fields, self.phase = spec, dict(fields), phase
        self.plugin_name, self.plugin_namespace = spec.name, DOMAIN
        self.plugin_version, self.num_outputs = PLUGIN_VERSION, len(spec.outputs)

    def get_capability_interface(self, capability_type):
        return self

    def clone(self) -> MosaicPlugin:
        return MosaicPlugin(self.spec, self.fields, self.phase)

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
        return desc.type in [trt_type(n) for n in self.spec.inputs[pos]]

    def configure_plugin(self, inputs, outputs) -> None:
        pass

    def get_workspace_size(self, inputs, outputs) -> int:
        return 0

    def get_valid_tactics(self) -> list:
        return []

    def set_tactic(self, tactic: int) -> None:
        pass

    def on_shape_change(self, inputs, outputs) -> None:
        pass

    def attach_to_context(self, context) -> MosaicPlugin:
        return self.clone()

    def get_fields_to_serialize(self):
        collection, self._field_arrays = encode_fields(self.spec, self.fields)
        return collection

    def run(self, ins: list, outs: list) -> None:
        """The op on torch tensors (zeros while the builder times tactics)."""
        if self.phase == BUILD:
            for out in outs:
                out.zero_()
            return
        self.spec.run(ins, outs, self.fields)

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ins = [device_tensor(p, d) for p, d in zip(inputs, input_desc)]
            outs = [device_tensor(p, d) for p, d in zip(outputs, output_desc)]
            self.run(ins, outs)


class MosaicPluginCreator(trt.IPluginCreatorV3One):
    def __init__(self, spec: PluginSpec) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        self.spec = spec
        self.name, self.plugin_namespace = spec.name, DOMAIN
        self.plugin_version = PLUGIN_VERSION
        types = field_types()
        self._field_arrays = [np.zeros(0, types[kind][1]) for kind in spec.fields.values()]
        self.field_names = trt.PluginFieldCollection(
            [
                trt.PluginField(name, data, types[kind][0])
                for (name, kind), data in zip(spec.fields.items(), self._field_arrays)
            ]
        )

    def create_plugin(self, name: str, field_collection, phase) -> MosaicPlugin:
        return MosaicPlugin(self.spec, decode_fields(self.spec, field_collection), phase)

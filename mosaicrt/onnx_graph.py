"""A small helper that emits ONNX nodes with generated names, for graphs and function bodies
(the ops' ONNX functions in mosaicrt.ops and the step graph in mosaicrt.export)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

OPSET = 18  # default-domain opset of the artifact and of the function bodies
IR_VERSION = 9  # the lowest IR with opset 18, readable by every ONNX Runtime >= 1.15
FLOAT = TensorProto.FLOAT
ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}


class ExternalData:
    """Writes initializers straight into the external data file as they are made, so a large
    model's weights are never held in memory a second time (as protobuf bytes)."""

    def __init__(self, path) -> None:
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        element_type = numpy_helper.from_array(array.reshape(-1)[:0]).data_type
        return self.raw(name, element_type, array.shape, array.view(np.uint8).reshape(-1))

    def raw(self, name: str, element_type: int, dims, data: np.ndarray) -> TensorProto:
        """A tensor of any element type from its bytes as ONNX lays them out (uint8 (n,);
        4-bit types: two elements a byte, the first in the low nibble)."""
        proto = TensorProto(name=name, data_type=element_type, dims=list(dims))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset),
                           ("length", data.nbytes)):  # fmt: skip
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.file.write(np.ascontiguousarray(data).data)
        self.offset += data.nbytes
        return proto

    def close(self) -> None:
        self.file.close()


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self, prefix: str = "", external: ExternalData | None = None) -> None:
        self.prefix = prefix
        self.external = external  # where large initializers go, if anywhere
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counter = 0
        self.scope = ""
        self.constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{self.prefix}{self.scope}{hint}_{self.counter}"

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        name: str | None = None,
        **attrs,
    ) -> str | list[str]:
        """Add a node; with outputs=k return k fresh names, with a list use those names."""
        names = (
            [self.fresh(op_type.lower()) for _ in range(outputs)]
            if isinstance(outputs, int)
            else outputs
        )
        self.counter += 1
        node_name = name or f"/{self.prefix}{self.scope}{op_type}_{self.counter}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=node_name, domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """A constant tensor as a Constant node; equal constants share one node, so that ONNX
        Runtime's common-subexpression elimination can merge the computations that use them."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            out = self.fresh("const")
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [out], name=f"/{out}", value=numpy_helper.from_array(array)
                )
            )
            self.constants[key] = out
        return self.constants[key]

    def attribute(self, attr: str, kind: int) -> str:
        """In a function body: a Constant whose value is the function's attribute `attr` (a
        reference, filled per node); kind is AttributeProto.FLOAT or AttributeProto.INT."""
        out = self.fresh(attr)
        node = helper.make_node("Constant", [], [out], name=f"/{out}")
        field = {AttributeProto.FLOAT: "value_float", AttributeProto.INT: "value_int"}[kind]
        node.attribute.append(helper.make_attribute_ref(field, kind))
        node.attribute[-1].ref_attr_name = attr
        self.nodes.append(node)
        return out

    def weight(self, name: str, array: np.ndarray) -> str:
        """A graph initializer (model weights)."""
        if self.external is not None and array.nbytes >= 1024:
            self.initializers.append(self.external.tensor(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    # Shape helpers used throughout (all take/return tensor names).
    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def reshape(self, x: str, *shape: int) -> str:
        return self.op("Reshape", x, self.ints(*shape))

    def dim(self, x: str, axis: int) -> str:
        """The size of one axis of x, as an int64 scalar."""
        return self.op("Squeeze", self.op("Shape", x, start=axis, end=axis + 1), self.ints(0))

    def arange(self, n: str) -> str:
        """0..n-1 (int64) for an int64 scalar n."""
        return self.op("Range", self.const(0, np.int64), n, self.const(1, np.int64))

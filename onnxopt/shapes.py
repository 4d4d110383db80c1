"""Shape inference that never fails the run and never trusts declared intermediate/output shapes.

``infer(model)`` serializes the model (external weights stay references, nothing is loaded),
*removes* every declared value_info and the declared dims of graph outputs, and runs onnx shape
inference (non-strict, with data propagation).  Declared shapes can be wrong (onnxslim trusted
a wrong declared output shape and changed two real models' outputs); only graph-input
declarations, initializers and the ops themselves are believed.  The result is a side table
name -> dims; the model is not modified.  When inference fails the table is empty and passes
that need shapes simply find nothing to do.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

Dim = int | str | None  # int: static; str: symbolic name; None: unknown


class Shapes:
    """Inferred dims by value name (names are unique per model in valid ONNX)."""

    def __init__(self, table: dict[str, tuple[Dim, ...]], dtypes: dict[str, int] | None = None):
        self._table = table
        self._dtypes = dtypes or {}

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        """Element type: constants and graph inputs as declared, everything else as inferred."""
        if value is None:
            return None
        if value.const_value is not None:
            return value.const_value.dtype
        if value.is_graph_input():
            return value.dtype
        code = self._dtypes.get(value.name)
        return ir.DataType(code) if code else None

    def __len__(self) -> int:
        return len(self._table)

    def get(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        """Dims of ``value`` (None when its rank is unknown).  Graph inputs use their declaration."""
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(int(d) for d in value.const_value.shape)
        if value.is_graph_input() and value.shape is not None:
            return tuple(_dim(d) for d in value.shape)
        return self._table.get(value.name)


def _dim(d) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if value else None


def _proto_dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _strip(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip(g)


def _collect(graph: onnx.GraphProto, table: dict, seen: set, dtypes: dict) -> None:
    for vi in list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = vi.type.tensor_type.elem_type
        dims = _proto_dims(vi.type)
        if dims is None:
            continue
        if vi.name in seen and table.get(vi.name) != dims:
            table.pop(vi.name, None)  # same name in two scopes with different shapes: unknown
            continue
        seen.add(vi.name)
        table[vi.name] = dims
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect(attr.g, table, seen, dtypes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _collect(g, table, seen, dtypes)


def infer(model: ir.Model) -> Shapes:
    """Cost: one serialization of the graph structure and one onnx inference run."""
    try:
        proto = ir.to_proto(model)
        _strip(proto.graph)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference must never fail the run
        logger.info("shape inference failed (%s); continuing without inferred shapes", str(e).splitlines()[0][:200])
        return Shapes({})
    table: dict[str, tuple[Dim, ...]] = {}
    dtypes: dict[str, int] = {}
    _collect(inferred.graph, table, set(), dtypes)
    return Shapes(table, dtypes)

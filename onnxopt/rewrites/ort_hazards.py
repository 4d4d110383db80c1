"""Rewrites of correct graphs that ONNX Runtime's own optimizer would compute wrongly.

A pass that turns a value into a constant (cleanup: initializer-backed inputs; fold-constants) can
hand ORT a pattern that one of its fusions mishandles.  Each function here replaces such a pattern
by an equivalent one ORT runs as the spec says; each is idempotent and O(nodes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.base import FreshNames, is_standard

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


def _unit_numerator(node: ir.Node) -> np.ndarray | None:
    """The Div's numerator when it is a one-element float constant equal to 1 with rank >= 1."""
    if node.op_type != "Div" or not is_standard(node) or len(node.inputs) != 2 or node.inputs[0] is None:
        return None
    tensor = node.inputs[0].const_value
    if tensor is None or tensor.dtype not in _FLOATS or len(tensor.shape) == 0 or tensor.size != 1:
        return None
    array = tensor.numpy()
    return array if float(array.reshape(-1)[0]) == 1.0 else None


def reciprocal_for_unit_division(model: ir.Model) -> int:
    """``Div(ones, x)`` feeding a Mul, where the one-element constant ``ones`` may raise the rank.

    ORT's DivMulFusion (basic level) turns ``Mul(Div(1, x), y)`` into ``Div(y, x)`` without the
    rank the constant adds by broadcasting (ORT 1.32: a [1,1,1,1,1] numerator before a 4-D x gives a
    4-D output, the spec 5-D).  Rewritten as ``Reciprocal(x)`` (the same correctly rounded 1/x), then
    ``Unsqueeze`` of the missing leading axes when x's rank is known, else ``Mul`` by the constant
    (ORT's no-op elimination checks ranks).  Left alone where x's rank is known and not smaller:
    there the fusion is right.  Returns the number of rewrites."""
    names: FreshNames | None = None
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        ones = _unit_numerator(node)
        if ones is None or node.graph is None:
            continue
        out, x = node.outputs[0], node.inputs[1]
        if x is None or out.is_graph_output() or not any(u.node.op_type == "Mul" for u in out.uses()):
            continue
        rank = len(x.shape) if x.shape is not None else None
        if rank is not None and rank >= ones.ndim:
            continue
        names = names or FreshNames(model)
        graph = node.graph
        recip = ir.Node("", "Reciprocal", [x], name=names.node(f"{node.name or 'div'}_reciprocal"),
                        outputs=[ir.Value(name=names.value(f"{out.name}_reciprocal"), type=out.type)])
        graph.insert_before(node, recip)
        if rank is not None:
            widen = _unsqueeze(recip.outputs[0], list(range(ones.ndim - rank)), graph, model, names,
                               f"{node.name or 'div'}_unsqueeze")
        else:
            widen = ir.Node("", "Mul", [recip.outputs[0], node.inputs[0]], name=names.node(f"{node.name or 'div'}_widen"))
        graph.insert_before(node, widen)
        widen.outputs[0].name = names.value(f"{out.name}_widened")
        widen.outputs[0].type, widen.outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(widen.outputs[0])
        graph.remove(node, safe=True)
        count += 1
    return count


def _unsqueeze(value: ir.Value, axes: list[int], graph: ir.Graph, model: ir.Model, names: FreshNames,
               name: str) -> ir.Node:
    """Unsqueeze in the form of the model's opset (axes an initializer from opset 13, an attribute before)."""
    if model.opset_imports.get("", 13) < 13:
        return ir.Node("", "Unsqueeze", [value], attributes=[ir.AttrInt64s("axes", axes)], name=names.node(name))
    const = ir.Value(name=names.value(f"{name}_axes"), type=ir.TensorType(ir.DataType.INT64),
                     shape=ir.Shape([len(axes)]), const_value=ir.tensor(np.array(axes, dtype=np.int64)))
    graph.register_initializer(const)
    return ir.Node("", "Unsqueeze", [value, const], name=names.node(name))

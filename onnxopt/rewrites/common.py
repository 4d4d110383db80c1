"""What simplify's rules share: the Context of a round, the rule type and small graph helpers."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import (
    FreshNames,
    is_standard,
)
from onnxopt.passes import fold_shapes

INT_MAX_LIKE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Context:
    dims: shape_inference.Shapes
    opset: int  # of the default domain
    names: FreshNames
    aliased: fold_shapes.Aliased  # dims as products of symbols (Tile and Reshape outputs resolved)


def only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses()) and len(value.uses()) == 1


def producer_op(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ops or not is_standard(node):
        return None
    return node


def broadcast_keeps(x_dims, c_shape) -> bool:
    """True when broadcasting x against a tensor of shape c_shape leaves x's shape as it is."""
    if x_dims is None or len(c_shape) > len(x_dims):
        return False
    for c, d in zip(reversed(c_shape), reversed(x_dims)):
        if c != 1 and c != d:
            return False
    return True

"""cse: common subexpression elimination, in the main graph and in every subgraph."""

from __future__ import annotations

import collections

import onnx_ir as ir

from onnxopt.base import OptPass

NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})


class EliminateCommonSubexpressions(OptPass):
    """Merge nodes that compute the same thing: same op, domain, attributes and the same inputs.

    Contract: outputs bit-identical.  Never merges random ops, Dropout, nodes with subgraphs or
    nodes whose outputs are graph outputs (that would rename a graph output).  Attributes holding
    tensors above ``size_limit`` elements are not compared (treated as distinct).  Inside an
    If/Loop/Scan body, a node that recomputes what the enclosing graph computed before the
    owning node reuses the outer value (outer-scope references are legal there).
    Ours rather than onnx-ir's CommonSubexpressionEliminationPass because that one only
    visits the main graph.  Run ``dedup`` first so equal constants are the same value.
    Cost: O(nodes) with one hash per node.
    """

    name = "cse"

    def __init__(self, size_limit: int = 64):
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        self._graph(model.graph, {}, changed)
        return self.result(model, changed)

    def _graph(self, graph: ir.Graph, outer: dict[tuple, ir.Node], changed: collections.Counter) -> None:
        """CSE in ``graph``; ``outer`` holds the enclosing graphs' nodes that precede this subgraph's
        owner, whose outputs are visible here (so a branch reuses what the outer graph computed)."""
        seen: dict[tuple, ir.Node] = {}
        for node in list(graph):
            key = self._key(node)
            first = None if key is None else seen.get(key) or outer.get(key)
            if first is not None and not any(o.is_graph_output() for o in node.outputs):
                for old, new in zip(node.outputs, first.outputs):
                    old.replace_all_uses_with(new)
                graph.remove(node, safe=True)
                changed[f"{node.op_type} merged" + ("" if first.graph is graph else " with an outer-scope node")] += 1
                continue
            if key is not None and first is None:
                seen[key] = node
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    self._graph(attr.as_graph(), {**outer, **seen}, changed)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.as_graphs():
                        self._graph(sub, {**outer, **seen}, changed)

    def _key(self, node: ir.Node) -> tuple | None:
        if node.op_type in NONDETERMINISTIC:
            return None
        attrs = []
        for name, attr in sorted(node.attributes.items()):
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) or attr.is_ref():
                return None
            value = attr.value
            if attr.type == ir.AttributeType.TENSOR:
                if value.size > self.size_limit:
                    return None
                value = (value.dtype, tuple(value.shape), value.tobytes())
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            attrs.append((name, attr.type, value))
        return (node.domain, node.op_type, node.overload, len(node.outputs),
                tuple(id(v) if v is not None else None for v in node.inputs), tuple(attrs))

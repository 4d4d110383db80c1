"""``gemm-to-matmul`` (lossless, registered): Gemm with a constant 2-D weight and ``transA=0`` becomes
MatMul by ``alpha * B`` (transposed when ``transB``) + Add of ``beta * C``, so every weight matmul is
one MatMul the weight-only and dynamic quantizers reach (TorchScript exports write Linear as Gemm).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    NO_MATCH,
    FreshNames,
    Match,
    OptPass,
    constant,
    float_initializer,
    is_standard,
    new_initializer,
    node_output,
    replace_node,
)

FLOAT = ir.DataType.FLOAT


class GemmToMatMul(OptPass):
    """Gemm by a constant 2-D float weight -> MatMul (+ Add of the bias), and MatMul by
    ``Transpose(W)`` of a 2-D float initializer -> MatMul by a transposed copy (the tied LM head of
    dynamo exports, whose W the embedding Gather also reads), so weight-only and dynamic
    quantization reach every weight matmul.

    A step of ``quantize --mode dynamic`` / ``--weights int4``, not of the default pipeline: on its own
    the float model may run slower (measured on the tiny GPT-2: 0.46 -> 0.56 ms, MatMul + Add vs Gemm).
    Preserves outputs within float rounding (``alpha``/``beta`` folded into new float32 initializers,
    computed in float64; the old ones stay when shared) and graph output names.  Never touches Gemm
    with ``transA=1``, a non-constant or non-float32 weight, or a C that is not constant; main graph
    only.  Cost: O(Gemm nodes + their weights)."""

    name = "gemm-to-matmul"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        for node in list(model.graph):
            if node.op_type == "Gemm" and is_standard(node):
                _convert_gemm(model.graph, node, names).tally(changed, skipped, "Gemm -> MatMul", "Gemm")
            elif node.op_type == "MatMul" and is_standard(node) and len(node.inputs) == 2:
                _transposed_weight(model.graph, node, names).tally(changed, skipped, "Transpose(W) materialized")
        return self.result(model, changed, skipped)


def _transposed_weight(graph: ir.Graph, node: ir.Node, names: FreshNames) -> Match:
    t = node.inputs[1].producer() if node.inputs[1] is not None else None
    if t is None or t.op_type != "Transpose" or not is_standard(t) or not float_initializer(t.inputs[0]):
        return NO_MATCH
    w = constant(t.inputs[0])
    perm = t.attributes["perm"].as_ints() if "perm" in t.attributes else [1, 0]
    if w.ndim != 2 or list(perm) != [1, 0]:
        return NO_MATCH
    node.replace_input_with(1, new_initializer(graph, names, f"{t.inputs[0].name}_transposed", np.ascontiguousarray(w.T)))
    if not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
        graph.remove(t, safe=True)
    return Match.ok()


def _gemm_check(node: ir.Node) -> Match:
    a = node.attributes
    if (a["transA"].as_int() if "transA" in a else 0) != 0:
        return Match.fail("transA=1")
    if not float_initializer(node.inputs[1]) or len(node.inputs[1].const_value.shape) != 2:
        return Match.fail("weight is not a 2-D float32 initializer")
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None and (constant(c) is None or c.is_graph_input()):
        return Match.fail("C is not a constant")
    return Match.ok()


def _convert_gemm(graph: ir.Graph, node: ir.Node, names: FreshNames) -> Match:
    check = _gemm_check(node)
    if not check.succeeded:
        return check
    a = node.attributes
    alpha = a["alpha"].as_float() if "alpha" in a else 1.0
    beta = a["beta"].as_float() if "beta" in a else 1.0
    w = constant(node.inputs[1]).astype(np.float64)
    w = (w.T if (a["transB"].as_int() if "transB" in a else 0) else w) * alpha
    wv = new_initializer(graph, names, f"{node.inputs[1].name}_matmul", np.ascontiguousarray(w, np.float32))
    mm = ir.node("MatMul", [node.inputs[0], wv], name=names.node(f"{node.name}_MatMul"))
    result = node_output(mm, names, f"{node.name}_matmul", FLOAT)
    new = [mm]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        cv = new_initializer(graph, names, f"{c.name}_bias", (constant(c).astype(np.float64) * beta).astype(np.float32))
        add = ir.node("Add", [result, cv], name=names.node(f"{node.name}_Add"))
        result = node_output(add, names, f"{node.name}_biased", FLOAT)
        new.append(add)
    reason = replace_node(graph, node, new, result)
    return Match.ok() if reason is None else Match.fail(reason)

"""fold-constants: evaluate nodes whose inputs are all constant, with ONNX Runtime as the oracle."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.base import OptPass, is_standard

logger = logging.getLogger(__name__)

NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "Dropout", "Constant",
})


class FoldConstants(OptPass):
    """Replace standard-domain nodes whose inputs are all constant by initializers computed on ORT.

    Contract: outputs unchanged (ORT computes the same kernel it would run at inference; the
    onnx reference evaluator is the fallback for what ORT lacks).  Never folds Q/DQ, random ops,
    Dropout, custom-domain ops, nodes with subgraphs, nodes that write a graph output, or nodes
    reading an initializer that is also a graph input (a user may override it).  Size guard: a
    fold whose result is larger than ``size_limit`` bytes *and* larger than the initializers it
    frees is skipped, so the file does not grow.  Inputs above ``input_limit`` bytes are not
    evaluated.  Recurses into If/Loop/Scan bodies (outer-scope constants count as constant).
    Cost: one single-node ORT session per folded node; O(nodes).
    """

    name = "fold-constants"

    def __init__(self, size_limit: int = 1024, input_limit: int = 1 << 28):
        super().__init__()
        self.size_limit = size_limit
        self.input_limit = input_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.graph is None or not _all_inputs_constant(node):
                continue
            reason = self._fold(model, node)
            if reason:
                skipped[reason] += 1
            else:
                changed[f"folded {node.op_type}"] += 1
        return self.result(model, changed, skipped)

    def _fold(self, model: ir.Model, node: ir.Node) -> str | None:
        if not is_standard(node):
            return "custom-domain op"
        if node.op_type in NEVER_FOLD:
            return f"{node.op_type} is never folded"
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return "node has a subgraph"
        if any(o.is_graph_output() for o in node.outputs):
            return "output is a graph output"
        inputs = [v for v in node.inputs if v is not None]
        in_bytes = sum(v.const_value.nbytes for v in inputs)
        if in_bytes > self.input_limit:
            return "inputs too large to evaluate"
        try:
            values = _evaluate(model, node)
        except _Unfoldable as e:
            return str(e)
        out_bytes = sum(v.nbytes for v in values if v is not None)
        freed = sum(v.const_value.nbytes for v in set(inputs)
                    if v.is_initializer() and all(u.node is node for u in v.uses()))
        if out_bytes > self.size_limit and out_bytes > freed:
            return "result larger than size-limit and than the inputs it frees"
        graph = node.graph
        new_values = []
        for out, arr in zip(node.outputs, values):
            if arr is None:
                continue
            new = ir.Value(name=out.name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                           shape=ir.Shape(arr.shape), const_value=ir.tensor(arr, name=out.name))
            out.replace_all_uses_with(new)
            new_values.append(new)
        graph.remove(node, safe=True)
        for new in new_values:
            if new.uses():
                graph.register_initializer(new)
        return None


class _Unfoldable(Exception):
    pass


def _all_inputs_constant(node: ir.Node) -> bool:
    inputs = [v for v in node.inputs if v is not None]
    if not inputs:
        return False
    return all(v.const_value is not None and not v.is_graph_input() for v in inputs)


def _evaluate(model: ir.Model, node: ir.Node) -> list[np.ndarray | None]:
    """Run one node on ORT (falling back to the onnx reference evaluator); one array per
    output, None for an unnamed (omitted optional) output."""
    in_names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    out_names = [f"out{i}" if o.name else "" for i, o in enumerate(node.outputs)]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(in_names)
    del proto.output[:]
    proto.output.extend(out_names)
    feeds = {}
    graph_inputs = []
    for name, v in zip(in_names, node.inputs):
        if v is None:
            continue
        arr = v.const_value.numpy()
        feeds[name] = arr
        graph_inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    graph_outputs = [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in out_names if n]
    graph = onnx.helper.make_graph([proto], "fold", graph_inputs, graph_outputs)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    single = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version, 7))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(single.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        results = sess.run(None, feeds)
    except Exception as ort_error:  # noqa: BLE001 - ORT lacks a kernel: try the reference
        try:
            from onnx.reference import ReferenceEvaluator
            results = ReferenceEvaluator(single).run(None, feeds)
        except Exception:  # noqa: BLE001
            logger.debug("cannot evaluate %s: %s", node.op_type, ort_error)
            raise _Unfoldable("neither ORT nor the reference evaluator can run it") from None
    for r in results:
        if not isinstance(r, np.ndarray) or r.dtype == object or r.dtype.kind in "US":
            raise _Unfoldable("non-tensor or string output")
    produced = iter(results)
    return [next(produced) if o.name else None for o in node.outputs]

"""fold-constants: evaluate nodes whose inputs are all constant, with ONNX Runtime as the oracle."""

from __future__ import annotations

import collections
import heapq
import itertools
import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.base import OptPass, is_constant, is_standard, replace_with_initializer, serialized_size
from onnxopt.rewrites import ort_hazards

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
    reading an initializer that is also a graph input (a user may override it).
    Whole constant chains are evaluated in memory first and only their *frontier* (values read
    by nodes that stay) becomes initializers, so large intermediates of a chain cost nothing.
    Size guard: the bytes the pass adds beyond the initializers it frees must stay within
    ``max(size_limit, bytes the pipeline already saved)`` (serialized size at pipeline start vs
    now); while over budget, the producer of the largest frontier tensor is kept.  So the file
    does not grow beyond ``size_limit``, and only by that much when nothing else was saved.
    Inputs above ``input_limit`` bytes are not evaluated.  Recurses into If/Loop/Scan bodies
    (outer-scope constants count as constant).
    ConstantOfShape is a fill and is computed with numpy (one with a result above
    ``input_limit`` is not evaluated); a large fill therefore stays a ConstantOfShape node, the
    compact form of its bytes.
    Cost: one single-node ORT session per distinct node signature (op, attributes, input dtypes),
    one run per foldable node; the guard is O(folded nodes + kept nodes x log frontier).
    """

    name = "fold-constants"

    def __init__(self, size_limit: int = 1024, input_limit: int = 1 << 28, start_bytes: int | None = None):
        """``start_bytes``: the model's serialized size before the pipeline began (given by
        onnxopt.pipeline; None when run alone: then only ``size_limit`` bounds what a fold adds)."""
        super().__init__()
        self.size_limit = size_limit
        self.input_limit = input_limit
        self.start_bytes = start_bytes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        computed: dict[ir.Value, np.ndarray] = {}
        folded: list[ir.Node] = []
        sessions: dict[bytes, object] = {}  # one ORT session per distinct node signature
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            inputs = [v for v in node.inputs if v is not None]
            if not inputs or not all(v in computed or is_constant(v) for v in inputs):
                continue
            reason = self._check(node, inputs, computed)
            if reason is None:
                try:
                    values = _evaluate(model, node, computed, sessions, self.input_limit)
                except _Unfoldable as e:
                    reason = str(e)
            if reason:
                skipped[reason] += 1
                continue
            for out, arr in zip(node.outputs, values):
                if arr is not None:
                    computed[out] = arr
            folded.append(node)

        kept = self._apply_size_guard(model, folded, computed)
        if kept:
            skipped["result over the size budget (size-limit and bytes already saved)"] += len(kept)
        chosen = [n for n in folded if n not in kept]
        chosen_set = set(chosen)
        for node in chosen:
            for out in node.outputs:
                if out in computed and any(u.node not in chosen_set for u in out.uses()):
                    replace_with_initializer(out, computed[out])
        for node in reversed(chosen):
            node.graph.remove(node, safe=True)
            changed[f"folded {node.op_type}"] += 1
        if chosen:
            changed["Div(1, x) before a Mul as Reciprocal (ORT's DivMulFusion drops its rank)"] = \
                ort_hazards.reciprocal_for_unit_division(model)
        return self.result(model, changed, skipped)

    def _check(self, node: ir.Node, inputs: list[ir.Value], computed: dict) -> str | None:
        if node.graph is None:
            return "detached node"
        if not is_standard(node):
            return "custom-domain op"
        if node.op_type in NEVER_FOLD:
            return f"{node.op_type} is never folded"
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return "node has a subgraph"
        if any(o.is_graph_output() for o in node.outputs):
            return "output is a graph output"
        in_bytes = sum(computed[v].nbytes if v in computed else v.const_value.nbytes for v in inputs)
        if in_bytes > self.input_limit:
            return "inputs too large to evaluate"
        return None

    def _apply_size_guard(self, model: ir.Model, folded: list[ir.Node], computed: dict) -> set[ir.Node]:
        """Nodes to keep (not fold) so that the bytes added stay within the budget.

        Keeping a node only changes the frontier around that node (its outputs leave it, its
        computed inputs join it, its initializer inputs stop being freed), so the totals are
        updated incrementally and the largest frontier tensor comes from a heap."""
        start = self.start_bytes
        budget = None  # measured only when a fold adds more than size_limit (one serialization)
        chosen = set(folded)
        frontier = {out for n in folded for out in n.outputs
                    if out in computed and any(u.node not in chosen for u in out.uses())}
        added = sum(computed[v].nbytes for v in frontier)
        init_bytes: dict[ir.Value, int] = {}
        for n in folded:
            for v in n.inputs:
                if (v is not None and v not in init_bytes and v.is_initializer() and v.const_value is not None
                        and all(u.node in chosen for u in v.uses())):
                    init_bytes[v] = v.const_value.nbytes
        freed = sum(init_bytes.values())
        order = itertools.count()
        heap = [(-computed[v].nbytes, next(order), v) for v in frontier]
        heapq.heapify(heap)
        kept: set[ir.Node] = set()
        while frontier and added - freed > self.size_limit:
            if budget is None:
                now = serialized_size(model) if start is not None else None
                budget = max(self.size_limit, start - now if now is not None else 0)
            if added - freed <= budget:
                break
            largest = heapq.heappop(heap)[2]
            if largest not in frontier:
                continue  # left the frontier since it was pushed
            node = largest.producer()
            chosen.discard(node)
            kept.add(node)
            for out in node.outputs:
                if out in frontier:
                    frontier.discard(out)
                    added -= computed[out].nbytes
            for v in set(node.inputs):
                if v is None:
                    continue
                if v in computed and v.producer() in chosen and v not in frontier:
                    frontier.add(v)
                    added += computed[v].nbytes
                    heapq.heappush(heap, (-computed[v].nbytes, next(order), v))
                if v in init_bytes:
                    freed -= init_bytes.pop(v)
        return kept


class _Unfoldable(Exception):
    pass




def _constant_of_shape(node: ir.Node, shape: np.ndarray, limit: int) -> np.ndarray | None:
    """ConstantOfShape computed directly (a fill needs no kernel); None to leave it to ORT
    (malformed shape or value)."""
    attr = node.attributes.get("value")
    fill = np.zeros(1, np.float32) if attr is None else attr.as_tensor().numpy().reshape(-1)
    if fill.size != 1 or shape.ndim != 1 or shape.dtype != np.int64 or (shape < 0).any():
        return None
    if int(np.prod(shape, dtype=np.float64)) * fill.itemsize > limit:
        raise _Unfoldable("result too large to evaluate")
    return np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)


def _evaluate(model: ir.Model, node: ir.Node, computed: dict, sessions: dict | None = None,
              limit: int = 1 << 28) -> list[np.ndarray | None]:
    """Run one node on ORT (falling back to the onnx reference evaluator); one array per
    output, None for an unnamed (omitted optional) output.  ``sessions`` caches ORT sessions by
    node signature (op, attributes, input dtypes; input shapes are left undeclared so nodes that
    differ only in shapes share one); ConstantOfShape is a fill, computed with numpy."""
    if node.op_type == "ConstantOfShape" and node.inputs and node.inputs[0] is not None:
        shape_value = node.inputs[0]
        shape = computed[shape_value] if shape_value in computed else shape_value.const_value.numpy()
        filled = _constant_of_shape(node, np.asarray(shape), limit)
        if filled is not None:
            return [filled]
    in_names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    out_names = [f"out{i}" if o.name else "" for i, o in enumerate(node.outputs)]
    proto = ir.serde.serialize_node(node)
    proto.name, proto.doc_string = "", ""  # not part of the signature the session cache keys on
    proto.ClearField("metadata_props")
    del proto.input[:]
    proto.input.extend(in_names)
    del proto.output[:]
    proto.output.extend(out_names)
    feeds = {}
    graph_inputs = []
    for name, v in zip(in_names, node.inputs):
        if v is None:
            continue
        arr = computed[v] if v in computed else v.const_value.numpy()
        feeds[name] = arr
        graph_inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), None))
    graph_outputs = [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in out_names if n]
    graph = onnx.helper.make_graph([proto], "fold", graph_inputs, graph_outputs)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    single = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version, 7))
    key = single.SerializeToString()
    try:
        sess = sessions.get(key) if sessions is not None else None
        if sess is None:
            sess = runtime.session(key, threads=1, optimize=False)
            if sessions is not None:
                sessions[key] = sess
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

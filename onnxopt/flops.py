"""Compute cost: MACs and FLOPs per node and per op type, parameters, peak activation memory.

Shapes come from onnxopt.shapes with graph-input dims fixed by ``--shape`` (symbolic dims left
open become 1, as for validation).  Counting rules (FLOPs = 2 x MACs for multiply-accumulate ops):
- Conv: N x C_out x prod(out spatial) x (C_in / group) x prod(kernel) MACs (+ N x C_out x out
  spatial adds for a bias); ConvTranspose: N x C_in x prod(in spatial) x (C_out / group) x prod(kernel);
- Gemm: M x N x K (+ M x N for C); MatMul: prod(output batch dims) x M x N x K;
- com.microsoft Attention: the QKV projection plus 2 x B x S x S x hidden for scores and context;
- pooling: one FLOP per output element per kernel position (global: per input element);
- BatchNormalization 2, LayerNormalization 8, Softmax 5 FLOPs per element; other ops with a float
  output: one FLOP per output element (elementwise/activation); shape and data movement ops: 0.
Peak activation memory: tensors live from their producer to their last consumer (graph inputs
from the start, outputs to the end, weights excluded); the peak of the live bytes over the node
order.  Values whose shape stays unknown are counted as unknown, never guessed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Mapping

import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import name_of

logger = logging.getLogger(__name__)

NO_COMPUTE = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather", "Shape",
    "Identity", "Cast", "Expand", "Tile", "Pad", "Constant", "ConstantOfShape", "Range", "Dropout", "Size",
    "QuantizeLinear", "DequantizeLinear", "GatherElements", "GatherND", "ScatterND", "DepthToSpace", "SpaceToDepth",
    "NonZero", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "CastLike", "If", "Loop", "Scan",
})
PER_ELEMENT = {"BatchNormalization": 2, "LayerNormalization": 8, "Softmax": 5, "LogSoftmax": 5,
               "InstanceNormalization": 8, "SkipLayerNormalization": 9}


@dataclasses.dataclass
class NodeCost:
    name: str
    op_type: str
    macs: int
    flops: int


@dataclasses.dataclass
class Cost:
    nodes: list[NodeCost]
    unknown: list[str]  # nodes whose cost could not be computed (shapes unknown)
    peak_activation_bytes: int
    unknown_activations: int
    parameters: int
    parameter_bytes: int

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    def by_op(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "macs": 0, "flops": 0})
        for n in self.nodes:
            entry = out[n.op_type]
            entry["count"] += 1
            entry["macs"] += n.macs
            entry["flops"] += n.flops
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["flops"]))

    def to_dict(self, per_node: bool = True) -> dict:
        d = {"macs": self.macs, "flops": self.flops, "by_op": self.by_op(), "unknown_nodes": self.unknown,
             "peak_activation_bytes": self.peak_activation_bytes, "unknown_activations": self.unknown_activations,
             "parameters": self.parameters, "parameter_bytes": self.parameter_bytes}
        if per_node:
            d["nodes"] = [dataclasses.asdict(n) for n in self.nodes]
        return d


def _with_input_shapes(model: ir.Model, overrides: Mapping[str, tuple[int, ...]]) -> ir.Model:
    """A copy whose graph inputs have concrete dims (overrides, else symbolic -> 1)."""
    copy = model.clone()
    for value in copy.graph.inputs:
        if value.name in overrides:
            value.shape = ir.Shape(list(overrides[name_of(value)]))
        elif value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, int) else 1 for d in value.shape])
    return copy


def _ints(dims) -> tuple[int, ...] | None:
    """``dims`` when every one is a known integer, else None."""
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def _prod(dims) -> int | None:
    known = _ints(dims)
    return None if known is None else math.prod(known)


def estimate(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Cost:
    """Cost: one shape inference plus O(nodes)."""
    work = _with_input_shapes(model, shapes or {})
    dims = shape_inference.infer(work)
    nodes, unknown = [], []
    for node in ir.traversal.RecursiveGraphIterator(work.graph):
        macs_flops = _node_cost(node, dims)
        if macs_flops is None:
            unknown.append(node.name or node.op_type)
            continue
        macs, flops = macs_flops
        nodes.append(NodeCost(node.name or node.outputs[0].name or node.op_type,
                              node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}",
                              int(macs), int(flops)))
    peak, unknown_acts = _peak_activations(work, dims)
    params = [v.const_value for g in work.graphs() for v in g.initializers.values() if v.const_value is not None]
    return Cost(nodes, unknown, peak, unknown_acts, sum(t.size for t in params), sum(t.nbytes for t in params))


def _node_cost(node: ir.Node, dims: shape_inference.Shapes) -> tuple[int, int] | None:
    """(MACs, FLOPs) of one node, None when its shapes are unknown.  One branch per op family, read
    top to bottom (long on purpose: splitting it would scatter the formulas)."""
    op = node.op_type
    out = _ints(dims.get(node.outputs[0])) if node.outputs else None
    out_elems = _prod(out)
    if op in NO_COMPUTE:
        return 0, 0
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = 3 if op == "QLinearConv" else 1
        w = _ints(dims.get(node.inputs[w_index]))
        if out is None or w is None:
            return None
        assert out_elems is not None  # out_elems is None only when out is
        # W is [C_out, C_in/group, k...]: each output element costs W[1] x prod(k) MACs
        macs = out[0] * out[1] * math.prod(out[2:]) * w[1] * math.prod(w[2:])
        bias = out_elems if len(node.inputs) > 2 and node.inputs[2] is not None and op == "Conv" else 0
        return macs, 2 * macs + bias
    if op == "ConvTranspose":
        x, w = _ints(dims.get(node.inputs[0])), _ints(dims.get(node.inputs[1]))
        if x is None or w is None:
            return None
        # W is [C_in, C_out/group, k...]: each input element feeds W[1] x prod(k) MACs
        macs = x[0] * x[1] * math.prod(x[2:]) * w[1] * math.prod(w[2:])
        return macs, 2 * macs
    if op == "Gemm":
        a, b = _ints(dims.get(node.inputs[0])), _ints(dims.get(node.inputs[1]))
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        trans_a = node.attributes["transA"].as_int() if "transA" in node.attributes else 0
        k = a[0] if trans_a else a[1]
        m = a[1] if trans_a else a[0]
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        n = b[0] if trans_b else b[1]
        macs = m * n * k
        return macs, 2 * macs + (m * n if len(node.inputs) > 2 and node.inputs[2] is not None else 0)
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        a = _ints(dims.get(node.inputs[0]))
        if out_elems is None or a is None or not a:
            return None
        k = a[-1]
        macs = out_elems * k
        return macs, 2 * macs
    if op == "Attention" and node.domain == "com.microsoft":
        x, w = _ints(dims.get(node.inputs[0])), _ints(dims.get(node.inputs[1]))
        if x is None or w is None or len(x) != 3:
            return None
        batch, seq, hidden_in = x
        qkv = w[1]
        proj = batch * seq * hidden_in * qkv
        attn = 2 * batch * seq * seq * (qkv // 3)
        return proj + attn, 2 * (proj + attn)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = node.attributes["kernel_shape"].as_ints() if "kernel_shape" in node.attributes else None
        if out_elems is None or kernel is None:
            return None
        return 0, out_elems * math.prod(kernel)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        n_in = _prod(dims.get(node.inputs[0]))
        return (0, n_in) if n_in is not None else None
    if out_elems is None:
        return None
    dtype = dims.dtype(node.outputs[0])
    if op not in PER_ELEMENT and dtype is not None and dtype not in (
            ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
        return 0, 0  # integer/bool bookkeeping
    return 0, PER_ELEMENT.get(op, 1) * out_elems


def _peak_activations(model: ir.Model, dims: shape_inference.Shapes) -> tuple[int, int]:
    graph = model.graph
    order = list(graph)
    position = {id(n): i for i, n in enumerate(order)}
    end = len(order)
    unknown = 0

    def size_of(v: ir.Value) -> int | None:
        d, dtype = dims.get(v), dims.dtype(v)
        n = _prod(d)
        if n is None or dtype is None:
            return None
        return int(n * dtype.itemsize)

    intervals = []
    for v in list(graph.inputs) + [o for n in order for o in n.outputs if o.name]:
        if v.const_value is not None:
            continue
        size = size_of(v)
        if size is None:
            unknown += 1
            continue
        start = -1 if v.producer() is None else position[id(v.producer())]
        users = [position.get(id(u.node), end) for u in v.uses()]
        last = end if v.is_graph_output() else max(users, default=start)
        intervals.append((start, last, size))
    delta: collections.Counter = collections.Counter()
    for start, last, size in intervals:
        delta[start] += size
        delta[last + 1] -= size
    live = peak = 0
    for t in sorted(delta):
        live += delta[t]
        peak = max(peak, live)
    return peak, unknown

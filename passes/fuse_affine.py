"""fuse-affine: fold a per-channel scale/shift after Conv/ConvTranspose/Gemm/MatMul into its weights."""

from __future__ import annotations

import collections
import typing

import numpy as np
import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import NO_MATCH, Match, OptPass, add_initializer, constant, declined, is_standard, substitute

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class FuseAffine(OptPass):
    """Fold ``y = P(x) * s + t`` (s, t per output channel) into P's weight and bias.

    P is Conv, ConvTranspose (group 1), Gemm or MatMul with a constant float weight; the consumer
    is BatchNormalization in inference mode (s = scale/sqrt(var+eps), t = bias - mean*s) or Mul /
    Div / Add / Sub by a constant that is a scalar or a per-output-channel vector that does not
    broadcast the output to a larger shape or a higher rank (a size-1 constant of rank 3 after a
    rank-2 Gemm makes the output rank 3; the producer's output rank comes from its weight, or for
    MatMul from sound shape inference, never from declared shapes).  MatMul has no bias input, so only Mul/Div fold into
    it.  Rewrite: new weight and bias initializers (computed in float64, stored in the weight's
    dtype; the old ones may be shared), the consumer removed (its output name kept when it is a
    graph output).  Check (reasons recorded): P's output feeds only the consumer and is not a graph
    output; weight/bias/BN parameters are constants no user can override; Gemm's C is a vector.
    Outputs within float rounding (the sign of an exact zero may change, so a later division by it
    may give the opposite infinity).  Recurses into subgraphs.  Cost: O(nodes + folded weights).
    """

    name = "fuse-affine"
    PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    CONSUMERS = ("BatchNormalization", "Mul", "Div", "Add", "Sub")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        dims = None  # inferred lazily: only MatMul producers need it
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.graph is None or node.op_type not in self.CONSUMERS or not is_standard(node):
                continue
            match = self._match(node)
            if match.succeeded:
                producer = typing.cast(ir.Node, match.value)
                if dims is None and producer.op_type == "MatMul":
                    dims = shape_inference.infer(model)
                match = _affine(node, producer, dims)
                if match.succeeded:
                    s, t = typing.cast(tuple[np.ndarray, np.ndarray], match.value)
                    match = _rewrite(producer, node, s, t)
                match.tally(changed, skipped, f"{node.op_type} fused into {producer.op_type}")
            else:
                match.tally(changed, skipped, "")
        return self.result(model, changed, skipped)

    def _match(self, consumer: ir.Node) -> Match:
        """Match.ok(producer) when a producer's output feeds only the consumer."""
        for v in consumer.inputs[:2]:
            p = v.producer() if v is not None else None
            if p is not None and p.op_type in self.PRODUCERS and is_standard(p) and p.graph is consumer.graph:
                if consumer.op_type == "BatchNormalization" and v is not consumer.inputs[0]:
                    continue
                if len(v.uses()) != 1 or v.is_graph_output():
                    return Match.fail(f"{p.op_type.lower()} output has other users")
                return Match.ok(p)
        return NO_MATCH


def _channels(producer: ir.Node) -> Match:
    """Match.ok((number of output channels, axis of the weight that indexes them, output channel axis))."""
    w = constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
    if w is None:
        return Match.fail("weight is not constant")
    if producer.inputs[1].const_value.dtype not in FLOAT_TYPES:
        return Match.fail("weight is not floating point")
    op = producer.op_type
    if op == "Conv":
        return Match.ok((w.shape[0], 0, 1))
    if op == "ConvTranspose":
        group = producer.attributes.get("group")
        if group is not None and group.as_int() != 1:
            return Match.fail("grouped ConvTranspose")
        return Match.ok((w.shape[1], 1, 1))
    if w.ndim != 2:
        return Match.fail("weight is not 2-D")
    if op == "Gemm":
        trans_b = producer.attributes.get("transB")
        axis = 0 if trans_b is not None and trans_b.as_int() else 1
        return Match.ok((w.shape[axis], axis, -1))
    return Match.ok((w.shape[1], 1, -1))  # MatMul


def _output_rank(producer: ir.Node, dims: shape_inference.Shapes | None) -> int | None:
    """Rank of the producer's output: Conv/ConvTranspose that of the weight, Gemm 2, MatMul with a
    2-D weight that of its first input (1 for a vector), None when inference does not know it."""
    op = producer.op_type
    if op in ("Conv", "ConvTranspose"):
        return len(producer.inputs[1].const_value.shape)
    if op == "Gemm":
        return 2
    a = dims.get(producer.inputs[0]) if dims is not None else None
    return None if a is None else max(len(a), 1)


def _affine(consumer: ir.Node, producer: ir.Node, dims: shape_inference.Shapes | None = None) -> Match:
    """Match.ok((s, t)) with vectors of length C; a decline with its reason; NO_MATCH."""
    info = _channels(producer)
    if not info.succeeded:
        return info
    c, _, out_axis = typing.cast(tuple[int, int, int], info.value)
    op = consumer.op_type
    if op == "BatchNormalization":
        if producer.op_type not in ("Conv", "ConvTranspose") and _output_rank(producer, dims) != 2:
            return Match.fail("BN after a non-2-D Gemm/MatMul output")
        if len(consumer.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in consumer.outputs[1:]):
            return Match.fail("BN running statistics outputs are used (training)")
        training = consumer.attributes.get("training_mode")
        if training is not None and training.as_int() != 0:
            return Match.fail("BN in training mode")
        spatial = consumer.attributes.get("spatial")
        if spatial is not None and spatial.as_int() == 0:
            return Match.fail("BN with spatial=0")
        params = [constant(v) for v in consumer.inputs[1:5]] if len(consumer.inputs) == 5 else [None]
        if any(p is None for p in params):
            return Match.fail("BN parameters are not constant")
        if any(p.size != c for p in params):
            return Match.fail("BN parameter size does not match output channels")
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps_attr = consumer.attributes.get("epsilon")
        s = scale / np.sqrt(var + (eps_attr.as_float() if eps_attr is not None else 1e-5))
        return Match.ok((s, bias - mean * s))
    if producer.op_type == "MatMul" and op != "Mul" and op != "Div":
        return NO_MATCH  # no bias slot: MatMul+Add is simplify's MatMul+Add -> Gemm
    other_index = 1 if consumer.inputs[0] is producer.outputs[0] else 0
    k = constant(consumer.inputs[other_index])
    if k is None:
        return NO_MATCH  # e.g. a residual Add: not this pattern
    rank = _output_rank(producer, dims)
    if k.ndim > (rank if rank is not None else 1):
        return Match.fail("constant has a higher rank than the output (the broadcast adds dims)")
    vec = _per_channel(k, c, out_axis, producer)
    if vec is None:
        return Match.fail("constant is not a scalar or per-channel vector")
    ones, zeros = np.ones(c), np.zeros(c)
    if op == "Mul":
        return Match.ok((vec, zeros))
    if op == "Div":
        return Match.ok((1.0 / vec, zeros)) if other_index == 1 and np.all(vec != 0) else Match.fail("not x / c with c != 0")
    if op == "Add":
        return Match.ok((ones, vec))
    return Match.ok((ones, -vec) if other_index == 1 else (-ones, vec))  # Sub: P - c, or c - P


def _per_channel(k: np.ndarray, c: int, out_axis: int, producer: ir.Node) -> np.ndarray | None:
    """k as a length-c float64 vector when it only scales/shifts output channels, else None."""
    if k.size == 1:
        return np.full(c, float(k.reshape(-1)[0]))
    if k.size != c:
        return None
    if out_axis == -1:  # [..., N]: k must be [N] or [1, ..., 1, N]
        ok = k.shape[-1] == c
    else:  # [N, C, spatial...]: k must be [C, 1, ..., 1] or [1, C, 1, ..., 1]
        spatial = len(producer.inputs[1].const_value.shape) - 2  # weight rank == output rank
        ok = list(k.shape) in ([c] + [1] * spatial, [1, c] + [1] * spatial)
    return k.astype(np.float64).reshape(-1) if ok else None


def _rewrite(producer: ir.Node, consumer: ir.Node, s: np.ndarray, t: np.ndarray) -> Match:
    op = producer.op_type
    c, w_axis, _ = typing.cast(tuple[int, int, int], _channels(producer).value)
    w = producer.inputs[1].const_value.numpy()
    dtype = w.dtype
    has_t = bool(np.any(t != 0))
    bias_index = 2
    bias = None
    if op == "MatMul":
        if has_t:
            return Match.fail("MatMul has no bias to absorb a shift")
    elif len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = constant(producer.inputs[2])
        if bias is None:
            return Match.fail("bias is not constant")
        if op == "Gemm":
            beta = producer.attributes.get("beta")
            bias = bias * (beta.as_float() if beta is not None else 1.0)
            if bias.size not in (1, c) or (bias.ndim == 2 and bias.shape[0] != 1):
                return Match.fail("Gemm C is not a vector")
            bias = np.broadcast_to(bias.reshape(-1), (c,)) if bias.size in (1, c) else bias
    shape = [1] * w.ndim
    shape[w_axis] = -1
    new_w = (w.astype(np.float64) * s.reshape(shape)).astype(dtype)
    graph = producer.graph
    base = producer.name or producer.outputs[0].name or op
    producer.replace_input_with(1, add_initializer(graph, f"{base}_fused_weight", new_w))
    if op != "MatMul" and (has_t or bias is not None):
        old = bias.astype(np.float64).reshape(-1) if bias is not None else np.zeros(c)
        new_b = add_initializer(graph, f"{base}_fused_bias", (old * s + t).astype(dtype))
        if len(producer.inputs) <= bias_index:
            producer.resize_inputs(bias_index + 1)
        producer.replace_input_with(bias_index, new_b)
        if op == "Gemm":
            producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    reason = substitute(consumer, producer.outputs[0])
    assert reason is None, reason  # _match ensured the producer output is private to the consumer
    return declined(reason)

"""simplify: small algebraic and structural rewrites, each a pattern / check / rewrite rule."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import (
    NO_MATCH,
    FreshNames,
    Match,
    OptPass,
    add_initializer,
    constant,
    declined,
    is_standard,
    node_axes,
    nonnegative,
    remove_dead_producers,
    replace_with_initializer,
    substitute,
)
from onnxopt.passes import fold_shapes

# A rule returns NO_MATCH (pattern absent), Match.ok() (rewritten) or Match.fail(reason) (declined).
Rule = Callable[[ir.Node, "Context"], Match]
FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
INT_MAX_LIKE = 2**31 - 1
#: Rounds of all rules (each with fresh shapes) until nothing changes; a pass must be idempotent.
MAX_ROUNDS = 8


class Simplify(OptPass):
    """Algebraic and structural simplifications that keep outputs (within float rounding).

    Rules (each declines with a reason when its check fails):
    - ``Add(x,0)``, ``Sub(x,0)``, ``Mul(x,1)``, ``Div(x,1)`` -> x, when the constant's broadcast
      provably leaves x's shape unchanged (``Add(-0.0, 0)`` gives +0.0: the sign of a zero may flip);
    - constant chains ``(x*c1)*c2`` / ``(x+c1)+c2`` are *not* merged: whether the reassociated
      form rounds, overflows or underflows alike depends on x's runtime values (a later Cast or
      comparison turns a rounding difference into a different value);
    - ``Transpose(Transpose(x))`` -> one Transpose or none; identity Transpose -> x;
    - a reshape-like op (Reshape/Flatten/Squeeze/Unsqueeze) feeding a Reshape to a constant shape
      -> the Reshape reads x directly (a single copy-zero, with every other entry a positive
      literal, becomes -1: it is the only dim the -1 can infer; ported from onnxscript's rule);
      Reshape to x's own shape -> x (each target entry x's static dim, a copying 0 or the one -1);
    - ``Squeeze(Unsqueeze(x,a),a)`` and ``Unsqueeze(Squeeze(x,a),a)`` -> x;
    - ``Reshape(f(R(x)), t)`` -> ``f(x)`` for R a Reshape/Squeeze/Unsqueeze/Flatten and a chain f of elementwise ops whose other
      operands are one-element constants, when t provably is x's shape (x's rank, x's static dims,
      at most one -1, no 0) and nothing outside the chain reads its values;
    - ``Reshape(MatMul(Reshape(x, [rows, K]), W), t)`` -> ``MatMul(x, W)`` for a constant 2-D W when the
      inner target provably flattens x's leading dims and t provably restores them (dims and targets
      as products of symbols: tf2onnx's Tensordot for Keras' Dense on 3-D inputs);
    - Unsqueeze+Tile+Reshape repeating each element of one axis r times (r a power of two; float32)
      -> ``Resize(nearest, asymmetric, floor)`` with scale r there, and two such Resizes -> one
      (Keras' UpSampling2D);
    - ``Squeeze(Slice(x, [s], [s+1], [a]), [a])`` (or ``[-1]:`` to the end) -> ``Gather(x, s, axis=a)``
      (an index out of range fails in both);
    - ``Unsqueeze(Unsqueeze(x,a),b)`` -> ``Unsqueeze(x,c)`` with the combined axes, when every user
      of the inner one is an Unsqueeze (negative axes only with x's rank known);
    - ``And(x, true)`` / ``Or(x, false)`` -> x, under the same broadcast check as ``x*1``; also with the
      neutral element as a run-time fill (``Expand(true, Shape(..))``, ``ConstantOfShape``) when the
      result provably has x's dims (tf2onnx's ``ones_like`` masks); ``And(x, false)`` / ``Or(x, true)``
      with all-false/all-true constants -> a constant, when the result's dims are static;
    - Cast to x's own type -> x; a round trip through a wider type (f16->f32->f16, i32->i64->i32, ...) -> x;
    - no-ops: single-input Concat, Expand/Tile/Slice/Pad that change nothing, Resize/Upsample with
      all-ones scales and no sizes (not tf_crop_and_resize) (constant arguments);
    - ``Conv(Pad(x))`` with zero constant padding on spatial dims -> Conv with the pads;
      ``MaxPool(Pad(x))`` likewise when the fill is -inf, or 0 with x provably >= 0 (a Relu's output:
      Keras' ZeroPadding2D before MaxPooling2D), no ceil_mode, no dilation, the Indices output unused
      and the merged pads smaller than the kernel; ``AveragePool(Pad(x))`` with a zero fill, no
      ceil_mode, no dilation and count_include_pad=1;
    - MatMuls reading the same A with constant 2-D weights of the same row count (each used only
      there) -> one MatMul with the weights concatenated + Split on the last axis (Q/K/V);
    - an all-zero initial state (a zero constant or ``ConstantOfShape`` of 0, or Expand/Unsqueeze/
      Reshape/Concat/Cast... of such: ``_is_zeros``) of LSTM/GRU/RNN -> the input left out (the
      operators' default is zeros); the Shape chain computing it dies;
    - ``Concat(.., Concat(a, b), ..)`` on the same axis, the inner one used only there -> one Concat;
    - ``Slice(Slice(x))`` with constant arguments -> one Slice (disjoint axes; on a shared axis only
      with steps 1 and non-negative bounds, where ``x[s1:e1][s2:e2] = x[s1+s2 : min(e1, s1+e2)]``);
    - adjacent parts of a 1-D Concat that are consecutive slices of one ``Shape(x)`` (``[Shape(x)[i]]``
      as Unsqueeze/Gather, Slice or Shape with start/end) -> one ``Shape(x, start, end)`` (opset >= 15;
      not in a Reshape target, which fold-shapes and _reshape_own_dims turn into copies);
    - ``Where(Equal(s, c), a, s)`` -> s for a negative constant c and s provably >= 0 (shape
      arithmetic: the TorchScript exporter's guard of Expand shapes against -1), when neither c nor
      a broadcasts s to a larger shape;
    - a Reshape target entry computed as the data's own dim at the same position
      (``Concat(..., Unsqueeze(Gather(Shape(x), i)), ...)`` at position i, allowzero 0) -> 0, which
      copies exactly that dim (also when it is 0); the Shape chain dies;
    ``size-rules=false`` turns off the rules that only shrink the graph and whose results the
    transformer fusion patterns do not match (Unsqueeze chains, and/or neutral elements, Reshape
    round trips, the Q/K/V merge, the Where guard, the copied Reshape dims, nested Concats, Slice
    merges, Shape slices);
    - ``Add(MatMul(A, B), C)`` -> ``Gemm(A, B, C)`` for 2-D A, constant 2-D B and constant C of
      shape [N] or [1, N].
    Shapes come from onnxopt.shapes (declared intermediate/output shapes are not believed).
    Standard domain only; recurses into subgraphs.  Rounds repeat (with fresh shapes) until one
    changes nothing, so a second run is a no-op.  Cost: per round one shape inference plus O(nodes);
    at most MAX_ROUNDS rounds (in practice 1-3).
    """

    name = "simplify"

    def __init__(self, size_rules: bool = True):
        super().__init__()
        # off: fuse-transformer's preparation (fusion patterns match the exporter's Q/K/V and mask form)
        self.size_rules = size_rules

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        for _ in range(MAX_ROUNDS):  # a rewrite can enable another one on a node already visited
            before = sum(changed.values())
            skipped.clear()  # the last round's declines are the ones that stand
            table = shape_inference.infer(model)
            ctx = Context(table, model.opset_imports.get("", 1), names, fold_shapes.Aliased(table, model))
            for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
                if node.graph is None or not is_standard(node):
                    continue
                for rule in RULES.get(node.op_type, ()):
                    if node.graph is None:
                        break
                    if not self.size_rules and (rule in SIZE_RULES or node.op_type in ("And", "Or")):
                        continue
                    rule(node, ctx).tally(changed, skipped, rule.__doc__.strip().splitlines()[0], rule.__name__.strip("_"))
            if sum(changed.values()) == before:
                break
        return self.result(model, changed, skipped)


@dataclasses.dataclass(frozen=True)
class Context:
    dims: shape_inference.Shapes
    opset: int  # of the default domain
    names: FreshNames
    aliased: fold_shapes.Aliased  # dims as products of symbols (Tile and Reshape outputs resolved)


# ---------------------------------------------------------------- helpers

def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses()) and len(value.uses()) == 1


def _producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ops or not is_standard(node):
        return None
    return node


def _broadcast_keeps(x_dims, c_shape) -> bool:
    """True when broadcasting x against a tensor of shape c_shape leaves x's shape as it is."""
    if x_dims is None or len(c_shape) > len(x_dims):
        return False
    for c, d in zip(reversed(c_shape), reversed(x_dims)):
        if c != 1 and c != d:
            return False
    return True


# ---------------------------------------------------------------- rules

def _identity_arith(node: ir.Node, ctx: Context) -> Match:
    """neutral element removed (x+0, x-0, x*1, x/1, x and true, x or false)"""
    a, b = (list(node.inputs) + [None, None])[:2]
    neutral = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1, "And": True, "Or": False}[node.op_type]
    candidates = [(a, b)] + ([(b, a)] if node.op_type in ("Add", "Mul", "And", "Or") else [])
    for x, c in candidates:
        arr = constant(c)
        if arr is None and x is not None and constant(x) is None and _neutral_fill(c, neutral):
            return _drop_neutral_fill(node, x, ctx)
        if arr is None or x is None or constant(x) is not None:
            continue
        if not np.all(arr == neutral):
            continue
        if not _broadcast_keeps(ctx.dims.get(x), arr.shape):
            return Match.fail("the constant would broadcast x to a larger shape (or x's shape is unknown)")
        if ctx.dims.dtype(x) != c.const_value.dtype:
            return Match.fail("dtype differs")
        return declined(substitute(node, x))
    return NO_MATCH


def _neutral_fill(value: ir.Value | None, neutral) -> bool:
    """``Expand(c, shape)`` of a constant c, or ``ConstantOfShape`` with a fill, that is all ``neutral``
    (tf2onnx's ``ones_like`` masks: ``And(Expand(true, Shape(x)), m)``)."""
    producer = _producer(value, "Expand", "ConstantOfShape")
    if producer is None:
        return False
    if producer.op_type == "Expand":
        arr = constant(producer.inputs[0])
        return arr is not None and arr.size > 0 and bool(np.all(arr == neutral))
    fill = producer.attributes.get("value")
    arr = fill.as_tensor().numpy() if fill is not None else np.zeros(1, np.float32)
    return bool(np.all(arr == neutral))


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) or (isinstance(d, str) and d) for d in dims)


def _drop_neutral_fill(node: ir.Node, x: ir.Value, ctx: Context) -> Match:
    """``op(x, fill)`` -> x when the fill is neutral for op and the result provably has x's dims and type."""
    x_dims, out_dims = ctx.dims.get(x), ctx.dims.get(node.outputs[0])
    if not _known(x_dims) or x_dims != out_dims:
        return Match.fail("the fill may broadcast x to a larger shape (or a shape is unknown)")
    if ctx.dims.dtype(x) is None or ctx.dims.dtype(x) != ctx.dims.dtype(node.outputs[0]):
        return Match.fail("dtype differs or is unknown")
    fill = [v for v in node.inputs if v is not x]
    reason = substitute(node, x)
    if reason is None:
        remove_dead_producers(fill)
    return declined(reason)


def _transpose(node: ir.Node, ctx: Context) -> Match:
    """Transpose pair merged or identity Transpose removed"""
    perm_attr = node.attributes.get("perm")
    if perm_attr is None:
        return NO_MATCH
    perm = list(perm_attr.as_ints())
    if perm == list(range(len(perm))):
        return declined(substitute(node, node.inputs[0]))
    inner = _producer(node.inputs[0], "Transpose")
    if inner is None or inner.attributes.get("perm") is None:
        return NO_MATCH
    if not _only_use(node.inputs[0], node):
        return Match.fail("inner Transpose has other users")
    p1 = list(inner.attributes["perm"].as_ints())
    if len(p1) != len(perm):
        return Match.fail("rank mismatch")
    combined = [p1[p] for p in perm]
    node.replace_input_with(0, inner.inputs[0])
    node.attributes["perm"] = ir.AttrInt64s("perm", combined)
    if combined == list(range(len(combined))):
        substitute(node, node.inputs[0])  # if declined, an identity Transpose stays: still correct
    return Match.ok()


def _reshape(node: ir.Node, ctx: Context) -> Match:
    """Reshape chain shortened or no-op Reshape removed"""
    target = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return NO_MATCH
    target = [int(t) for t in target.reshape(-1)]
    allowzero = node.attributes.get("allowzero")
    copies = 0 in target and not (allowzero is not None and allowzero.as_int())
    x_dims = ctx.dims.get(node.inputs[0])
    if x_dims is not None and _reshape_keeps(x_dims, target, copies):
        return declined(substitute(node, node.inputs[0]))
    inner = _producer(node.inputs[0], "Reshape", "Flatten", "Squeeze", "Unsqueeze")
    if inner is None:
        return NO_MATCH
    if copies and (target.count(0) != 1 or any(t < 0 for t in target)):
        return Match.fail("target copies several dims of the intermediate (0 entries) or has a -1 too")
    if not _only_use(node.inputs[0], node):
        return Match.fail("intermediate has other users")
    if copies:  # the single copied dim is what -1 infers: every other entry is a positive literal
        new_target = np.array([-1 if t == 0 else t for t in target], dtype=np.int64)
        node.replace_input_with(1, add_initializer(node.graph, f"{node.name or node.outputs[0].name}_target", new_target))
    node.replace_input_with(0, inner.inputs[0])
    return Match.ok()


def _reshape_keeps(x_dims, target: list[int], copies: bool) -> bool:
    """True when Reshape(x, target) provably returns x's shape: same rank, every entry x's static
    dim, a copy (0, when 0 means copy) or the one -1 (inferred as the remaining dim: x's)."""
    if len(x_dims) != len(target) or target.count(-1) > 1:
        return False
    return all(t == -1 or (t == 0 and copies) or (isinstance(d, int) and t == d) for t, d in zip(target, x_dims))


def _squeeze_pair(node: ir.Node, ctx: Context) -> Match:
    """Squeeze/Unsqueeze pair removed"""
    other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    inner = _producer(node.inputs[0], other)
    if inner is None:
        return NO_MATCH
    a, b = node_axes(node), node_axes(inner)
    a, b = (sorted(a) if a is not None else None), (sorted(b) if b is not None else None)
    if a is None or b is None or a != b or any(x < 0 for x in a):
        return Match.fail("axes differ or are not constant non-negative")
    return declined(substitute(node, inner.inputs[0]))


def _unsqueeze_chain(node: ir.Node, ctx: Context) -> Match:
    """Unsqueeze chain merged into one Unsqueeze"""
    inner = _producer(node.inputs[0], "Unsqueeze")
    if inner is None:
        return NO_MATCH
    outer_axes, inner_axes = node_axes(node), node_axes(inner)
    if outer_axes is None or inner_axes is None:
        return Match.fail("axes are not constant")
    users = inner.outputs[0].uses()
    if inner.outputs[0].is_graph_output() or any(u.node.op_type != "Unsqueeze" for u in users):
        return Match.fail("the inner Unsqueeze has users other than Unsqueeze (it would stay)")
    if any(a < 0 for a in (*outer_axes, *inner_axes)):
        x_dims = ctx.dims.get(inner.inputs[0])
        if x_dims is None:
            return Match.fail("negative axes and the input's rank is unknown")
        middle = len(x_dims) + len(inner_axes)
        inner_axes = [a % middle for a in inner_axes]
        outer_axes = [a % (middle + len(outer_axes)) for a in outer_axes]
    outer = set(outer_axes)
    if len(outer) != len(outer_axes) or len(set(inner_axes)) != len(inner_axes):
        return Match.fail("repeated axes")
    # the intermediate's dims land, in order, on the output positions the outer axes leave free
    free = [p for p in range(len(outer) + max(inner_axes) + 1) if p not in outer]
    combined = sorted(outer | {free[a] for a in inner_axes})
    if ctx.opset >= 13:
        axes = add_initializer(node.graph, f"{node.name or node.outputs[0].name}_axes", np.array(combined, np.int64))
        node.replace_input_with(1, axes)
    else:
        node.attributes["axes"] = ir.AttrInt64s("axes", combined)
    node.replace_input_with(0, inner.inputs[0])
    return Match.ok()


#: ops whose output has their broadcast inputs' shape, element for element (a reshape round
#: trip around a chain of them can be dropped)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf", "Relu", "Sigmoid", "Neg", "Abs", "Sqrt",
                          "Exp", "Log", "Reciprocal", "Softplus", "Cast", "Max", "Min", "Where", "Identity"})
_ROUNDTRIP_LIMIT = 32  # nodes between the two Reshapes
#: ops that keep their input's elements in order and change only its shape (whatever their arguments)
_RESHAPE_LIKE = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def _elementwise_region(y: ir.Value, limit: int) -> tuple[set, ir.Node | None, str | None]:
    """Walk back from ``y`` through elementwise ops whose other operands are one-element
    constants: (region nodes, the single Reshape the walk ends at, reason when it does not)."""
    region: set = set()
    source, stack = None, [y]
    while stack:
        v = stack.pop()
        producer = v.producer()
        if producer is not None and producer.op_type in _RESHAPE_LIKE and is_standard(producer):
            if source is not None and source is not producer:
                return region, None, "the chain reads more than one Reshape"
            source = producer
            continue
        if producer is None or producer.op_type not in _ELEMENTWISE or not is_standard(producer):
            return region, None, "the chain has a non-elementwise op or a graph input"
        if producer in region:
            continue
        region.add(producer)
        if len(region) > limit:
            return region, None, "the chain is too long"
        for inp in producer.inputs:
            if inp is None:
                continue
            arr = constant(inp)
            if arr is not None:
                if arr.size != 1 or arr.ndim > 1:
                    return region, None, "a constant operand has more than one element"
                continue
            stack.append(inp)
    return region, source, None if source is not None else "no Reshape/Squeeze/Unsqueeze/Flatten at the start of the chain"


def _reshape_roundtrip(node: ir.Node, ctx: Context) -> Match:
    """Reshape round trip around elementwise ops removed"""
    target = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    y = node.inputs[0]
    if target is None or y is None or y.producer() is None or y.producer().op_type not in _ELEMENTWISE:
        return NO_MATCH
    region, inner, reason = _elementwise_region(y, _ROUNDTRIP_LIMIT)
    if inner is None:
        return NO_MATCH if reason == "the chain has a non-elementwise op or a graph input" else Match.fail(reason)
    x = inner.inputs[0]
    x_dims, target = ctx.dims.get(x), [int(t) for t in target.reshape(-1)]
    # target must give x's own shape: x's rank, every entry x's static dim, at most one -1 (then
    # the element count fixes that dim to x's) and no 0 (a copy of the *intermediate's* dim)
    if x_dims is None or len(x_dims) != len(target) or target.count(-1) > 1 or 0 in target:
        return Match.fail("the outer Reshape's target is not provably the inner Reshape's input shape")
    if any(t != -1 and t != d for t, d in zip(target, x_dims)) or any(a.ndim > len(x_dims) for a in _consts(region)):
        return Match.fail("the outer Reshape's target is not provably the inner Reshape's input shape")
    inside = region | {node}
    if any(u.node not in inside for u in inner.outputs[0].uses()) or inner.outputs[0].is_graph_output():
        return Match.fail("the inner Reshape's result has other users")
    for n in region:
        if any(o.is_graph_output() or any(u.node not in inside for u in o.uses()) for o in n.outputs):
            return Match.fail("a value inside the chain has users outside it")
    if ctx.dims.dtype(y) != ctx.dims.dtype(node.outputs[0]) and ctx.dims.dtype(y) is not None:
        return Match.fail("dtype differs")
    for n in region:
        for i, inp in enumerate(n.inputs):
            if inp is inner.outputs[0]:
                n.replace_input_with(i, x)
        for o in n.outputs:
            o.shape = None  # the declared shape was the intermediate's
            ctx.dims.forget(o)  # and so were the inferred dims (later rules this round must not use them)
    return declined(substitute(node, y))


def _consts(region: set) -> list[np.ndarray]:
    return [a for n in region for a in (constant(i) for i in n.inputs if i is not None) if a is not None]


_LOSSLESS = {
    ir.DataType.FLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.BFLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.FLOAT: {ir.DataType.DOUBLE},
    ir.DataType.INT8: {ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.UINT8: {ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT16,
                        ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.INT16: {ir.DataType.INT32, ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.INT32: {ir.DataType.INT64, ir.DataType.DOUBLE},
    ir.DataType.BOOL: {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64},
}


def _cast(node: ir.Node, ctx: Context) -> Match:
    """no-op Cast or lossless Cast round trip removed"""
    to = ir.DataType(node.attributes["to"].as_int()) if "to" in node.attributes else None
    x = node.inputs[0]
    if to is None or x is None:
        return NO_MATCH
    if ctx.dims.dtype(x) == to:
        return declined(substitute(node, x))
    inner = _producer(x, "Cast")
    if inner is None:
        return NO_MATCH
    source = ctx.dims.dtype(inner.inputs[0])
    middle = ir.DataType(inner.attributes["to"].as_int())
    if source != to:
        return NO_MATCH
    if middle not in _LOSSLESS.get(source, ()):
        return Match.fail("the intermediate type loses information")
    return declined(substitute(node, inner.inputs[0]))


def _noop(node: ir.Node, ctx: Context) -> Match:
    """no-op Concat/Expand/Tile/Slice/Pad/Resize removed"""
    x = node.inputs[0]
    op = node.op_type
    if op == "Concat":
        return declined(substitute(node, x)) if len(node.inputs) == 1 else NO_MATCH
    x_dims = ctx.dims.get(x)
    if op == "Expand":
        shape = constant(node.inputs[1])
        if shape is None or not _broadcast_keeps(x_dims, [int(s) for s in shape]):
            return NO_MATCH
        return declined(substitute(node, x))
    if op == "Tile":
        repeats = constant(node.inputs[1])
        return declined(substitute(node, x)) if repeats is not None and np.all(repeats == 1) else NO_MATCH
    if op == "Pad":
        pads = node.attributes["pads"].as_ints() if "pads" in node.attributes else constant(node.inputs[1])
        return declined(substitute(node, x)) if pads is not None and np.all(np.asarray(pads) == 0) else NO_MATCH
    if op in ("Resize", "Upsample"):
        ct = node.attributes.get("coordinate_transformation_mode")
        if ct is not None and ct.as_string() == "tf_crop_and_resize":
            return NO_MATCH
        scales_index = 2 if op == "Resize" and len(node.inputs) > 2 else 1
        scales = constant(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
        has_sizes = op == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None
        if scales is None or scales.size == 0 or has_sizes or not np.all(scales == 1):
            return NO_MATCH
        return declined(substitute(node, x))
    if op == "Slice":
        if len(node.inputs) < 3 or x_dims is None:
            return NO_MATCH
        starts, ends = constant(node.inputs[1]), constant(node.inputs[2])
        axes = constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        given = lambda i: len(node.inputs) > i and node.inputs[i] is not None  # noqa: E731
        if starts is None or ends is None or (given(3) and axes is None) or (given(4) and steps is None):
            return NO_MATCH  # an argument is there but not a constant (e.g. a Constant node's output)
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        for s, e, a, st in zip(starts, ends, axes, steps):
            dim = x_dims[a] if -len(x_dims) <= a < len(x_dims) else None
            full_end = e >= INT_MAX_LIKE or (isinstance(dim, int) and e >= dim)
            if st != 1 or s != 0 or not full_end:
                return NO_MATCH
        return declined(substitute(node, x))
    return NO_MATCH


def _pad_args(pad: ir.Node) -> tuple[list[int], float] | str:
    """(pads, fill value) of a constant-mode Pad with constant arguments and no ``axes``, padding only
    the spatial dims (from the third on) by non-negative amounts; else the reason it does not qualify."""
    mode = pad.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return "Pad mode is not constant"
    pads = pad.attributes["pads"].as_ints() if "pads" in pad.attributes else constant(pad.inputs[1])
    value_attr = pad.attributes.get("value")
    fill = constant(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else None
    if pads is None or (len(pad.inputs) > 2 and pad.inputs[2] is not None and fill is None):
        return "Pad arguments not constant"
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        return "Pad with axes"
    if fill is not None and fill.size != 1:
        return "Pad value is not a scalar"
    value = float(fill.reshape(-1)[0]) if fill is not None else value_attr.as_float() if value_attr is not None else 0.0
    pads = [int(p) for p in pads]
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or any(pads[i] or pads[rank + i] for i in (0, 1)):
        return "Pad touches batch/channel dims or is negative"
    return pads, value


def _merged_pads(node: ir.Node, pads: list[int]) -> list[int]:
    rank = len(pads) // 2
    k = rank - 2
    own = list(node.attributes["pads"].as_ints()) if "pads" in node.attributes else [0] * (2 * k)
    return [own[i] + pads[2 + i] for i in range(k)] + [own[k + i] + pads[rank + 2 + i] for i in range(k)]


def _pad_into_conv(node: ir.Node, ctx: Context) -> Match:
    """Pad folded into Conv"""
    pad = _producer(node.inputs[0], "Pad")
    if pad is None:
        return NO_MATCH
    args = _pad_args(pad)
    if isinstance(args, str):
        return Match.fail(args)
    pads, value = args
    if value != 0:
        return Match.fail("Pad value is not zero")
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return Match.fail("Conv uses auto_pad")
    if not _only_use(node.inputs[0], node):
        return Match.fail("Pad output has other users")
    node.attributes["pads"] = ir.AttrInt64s("pads", _merged_pads(node, pads))
    node.replace_input_with(0, pad.inputs[0])
    return Match.ok()


#: float ops whose output is >= 0 whatever their input (NaN aside)
_NONNEG_OPS = frozenset({"Relu", "Sigmoid", "Softplus", "Abs", "Exp", "Softmax", "HardSigmoid"})
#: ops whose output is >= 0 when their first input is (they move, select or pool its elements)
_NONNEG_KEEP = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Transpose", "Reshape",
                          "Identity", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Tile",
                          "DepthToSpace", "SpaceToDepth", "Dropout"})


def _nonnegative_float(value: ir.Value | None, depth: int = 8) -> bool:
    """True when every element of the float ``value`` is provably >= 0 (or NaN): a constant, Relu/
    Sigmoid/Softplus/Abs/Exp/Softmax/HardSigmoid, Clip with a constant min >= 0, Max with one such
    input, Add/Mul/Concat/Min of such inputs, and moves or pools of such a value (``_NONNEG_KEEP``;
    a Pad only with a fill >= 0).  False when not provable.  Cost: O(depth) nodes per path."""
    if value is None or depth == 0:
        return False
    arr = constant(value)
    if arr is not None:
        return arr.size > 0 and bool(np.all(arr >= 0))
    node = value.producer()
    if node is None or not is_standard(node):
        return False
    op = node.op_type
    if op in _NONNEG_OPS:
        return True
    if op == "Clip":  # min >= 0 and max absent or >= 0 (with max < min the result is max)
        bounds = []
        for i, key in ((1, "min"), (2, "max")):
            arr = constant(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
            given = len(node.inputs) > i and node.inputs[i] is not None
            attr = node.attributes.get(key)
            if given and (arr is None or arr.size != 1):
                return False
            bounds.append(float(arr.reshape(-1)[0]) if arr is not None else attr.as_float() if attr is not None else None)
        return bounds[0] is not None and bounds[0] >= 0 and (bounds[1] is None or bounds[1] >= 0)
    if op == "Max":
        return any(_nonnegative_float(v, depth - 1) for v in node.inputs)
    if op in ("Add", "Mul", "Concat", "Min", "Sum", "Mean"):
        return all(_nonnegative_float(v, depth - 1) for v in node.inputs)
    if op == "Pad":
        args = _pad_args(node)
        fill_ok = not isinstance(args, str) and args[1] >= 0
        return fill_ok and _nonnegative_float(node.inputs[0], depth - 1)
    if op in _NONNEG_KEEP:
        return _nonnegative_float(node.inputs[0], depth - 1)
    return False


def _pad_into_pool(node: ir.Node, ctx: Context) -> Match:
    """Pad folded into MaxPool/AveragePool"""
    pad = _producer(node.inputs[0], "Pad")
    if pad is None:
        return NO_MATCH
    args = _pad_args(pad)
    if isinstance(args, str):
        return Match.fail(args)
    pads, value = args
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return Match.fail("the pool uses auto_pad")
    if "ceil_mode" in node.attributes and node.attributes["ceil_mode"].as_int():
        return Match.fail("ceil_mode: windows past the padding would differ")
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Match.fail("MaxPool's Indices output is used (indices count the padded tensor)")
    if not _only_use(node.inputs[0], node):
        return Match.fail("Pad output has other users")
    merged = _merged_pads(node, pads)
    kernel = list(node.attributes["kernel_shape"].as_ints()) if "kernel_shape" in node.attributes else []
    k = len(merged) // 2
    if len(kernel) != k or any(merged[i] >= kernel[i] or merged[k + i] >= kernel[i] for i in range(k)):
        return Match.fail("the merged pads would not be smaller than the kernel")
    dilations = node.attributes.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations.as_ints()):
        return Match.fail("dilated pool")
    if node.op_type == "MaxPool":
        # a MaxPool's own pads are never the maximum: the Pad's fill may be dropped when it is -inf,
        # or when it is 0 and every input element is >= 0 (then no window's maximum is below it)
        if not (value == -np.inf or (value == 0 and _nonnegative_float(pad.inputs[0]))):
            return Match.fail("Pad value is not -inf, nor 0 before an input provably >= 0")
    else:
        if value != 0:
            return Match.fail("Pad value is not zero")
        include = node.attributes.get("count_include_pad")
        if not (include is not None and include.as_int()):
            # even without pads of its own: ORT's mean over a window past a small input divides by
            # the window's size with count_include_pad=1, by the elements inside with 0
            return Match.fail("AveragePool excludes padding from the mean (count_include_pad=0)")
        # the Pad's zeros are counted in every window's mean, as the op's own padding is with count_include_pad
    node.attributes["pads"] = ir.AttrInt64s("pads", merged)
    node.replace_input_with(0, pad.inputs[0])
    return Match.ok()


def _matmul_add_gemm(node: ir.Node, ctx: Context) -> Match:
    """MatMul+Add fused into Gemm"""
    if ctx.opset < 11:
        return NO_MATCH
    for i in (0, 1):
        mm = _producer(node.inputs[i], "MatMul")
        bias = node.inputs[1 - i]
        if mm is None:
            continue
        a, b = mm.inputs
        bw, c = constant(b), constant(bias)
        a_dims = ctx.dims.get(a)
        if bw is None or c is None or bw.ndim != 2 or a_dims is None or len(a_dims) != 2:
            return Match.fail("needs 2-D input, constant 2-D weight and constant bias")
        if c.shape not in ((bw.shape[1],), (1, bw.shape[1])) or c.dtype != bw.dtype or bw.dtype.kind != "f":
            return Match.fail("bias shape is not [N] or [1, N]")
        if not _only_use(node.inputs[i], node):
            return Match.fail("MatMul result has other users")
        gemm = ir.Node("", "Gemm", [a, b, bias], name=ctx.names.node((mm.name or "gemm") + "_gemm"), num_outputs=1)
        node.graph.insert_before(node, gemm)
        gemm.outputs[0].name = ctx.names.value((mm.outputs[0].name or "gemm") + "_gemm")
        reason = substitute(node, gemm.outputs[0])
        if reason:
            node.graph.remove(gemm, safe=True)
            return Match.fail(reason)
        return Match.ok()
    return NO_MATCH


def _matmul_siblings(node: ir.Node) -> list[ir.Node]:
    """MatMuls of node's graph reading node's first input as A, with a constant 2-D B of the same
    row count and dtype used by nothing else; in graph order (node first when it qualifies)."""
    x, w = node.inputs[0], constant(node.inputs[1])
    if x is None or w is None or w.ndim != 2:
        return []
    found = []
    for use in x.uses():
        other = use.node
        b = constant(other.inputs[1]) if other.op_type == "MatMul" and len(other.inputs) == 2 else None
        if (use.idx != 0 or other.graph is not node.graph or not is_standard(other) or b is None or b.ndim != 2
                or b.shape[0] != w.shape[0] or b.dtype != w.dtype or len(other.inputs[1].uses()) != 1
                or other.outputs[0].is_graph_output() or other.inputs[1].is_graph_output()):
            continue
        found.append(other)
    order = {id(n): i for i, n in enumerate(node.graph)}
    return sorted(found, key=lambda n: order[id(n)])


def _parallel_matmuls(node: ir.Node, ctx: Context) -> Match:
    """parallel MatMuls on one input merged into one MatMul + Split"""
    siblings = _matmul_siblings(node)
    if len(siblings) < 2 or siblings[0] is not node:
        return NO_MATCH  # rewritten from the first sibling only
    weights = [constant(n.inputs[1]) for n in siblings]
    graph, x = node.graph, node.inputs[0]
    merged = add_initializer(graph, f"{node.name or 'matmul'}_merged_weight", np.concatenate(weights, axis=1))
    matmul = ir.Node("", "MatMul", [x, merged], name=ctx.names.node(f"{node.name or 'matmul'}_merged"), num_outputs=1)
    sizes = np.array([w.shape[1] for w in weights], np.int64)
    split_inputs = [matmul.outputs[0]]
    attrs: list = [ir.AttrInt64("axis", -1)]
    if ctx.opset >= 13:
        split_inputs.append(add_initializer(graph, f"{node.name or 'matmul'}_split_sizes", sizes))
    else:
        attrs.append(ir.AttrInt64s("split", [int(v) for v in sizes]))
    split = ir.Node("", "Split", split_inputs, attributes=attrs, name=ctx.names.node(f"{node.name or 'matmul'}_split"),
                    num_outputs=len(siblings))
    matmul.outputs[0].name = ctx.names.value(f"{node.outputs[0].name or 'matmul'}_merged")
    graph.insert_before(node, [matmul, split])
    for sibling, out in zip(siblings, split.outputs):
        out.name = ctx.names.value(f"{sibling.outputs[0].name or 'matmul'}_part")
        ir.convenience.replace_all_uses_with(sibling.outputs[0], out)
        graph.remove(sibling, safe=True)
    return Match.ok()


#: ops whose output is all zeros when their first input is (they move, repeat, select or cast its elements)
_ZERO_KEEP = frozenset({"Expand", "Tile", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose", "Slice",
                        "Gather", "Cast", "Dropout"})


def _is_zeros(value: ir.Value | None, depth: int = 12) -> bool:
    """A constant of zeros, a ``ConstantOfShape`` whose fill value is zero (or left at its default 0),
    or what Expand/Tile/Unsqueeze/Squeeze/Reshape/Flatten/Identity/Transpose/Slice/Gather/Cast/
    Dropout make of such a value, or a Concat of such values (the exporters' run-time zero states:
    ``Expand(0, Concat(1, Shape(x)[0:1], hidden))``).  Cost: O(depth) nodes per path."""
    if value is None or depth == 0:
        return False
    arr = constant(value)
    if arr is not None:
        return bool(arr.size) and not np.any(arr)
    producer = value.producer()
    if producer is None or not is_standard(producer):
        return False
    if producer.op_type == "ConstantOfShape":
        fill = producer.attributes.get("value")
        return fill is None or not np.any(fill.as_tensor().numpy())
    if producer.op_type in _ZERO_KEEP:
        return _is_zeros(producer.inputs[0], depth - 1)
    if producer.op_type == "Concat":
        return bool(producer.inputs) and all(_is_zeros(v, depth - 1) for v in producer.inputs)
    return False


def _rnn_zero_state(node: ir.Node, ctx: Context) -> Match:
    """zero initial state of LSTM/GRU/RNN left to its default"""
    slots = (5, 6) if node.op_type == "LSTM" else (5,)  # initial_h (and initial_c): default 0
    zeros = [i for i in slots if i < len(node.inputs) and node.inputs[i] is not None and _is_zeros(node.inputs[i])]
    if not zeros:
        return NO_MATCH
    if any(node.inputs[i].is_graph_input() for i in zeros):
        return Match.fail("the initial state is a graph input")
    old = [node.inputs[i] for i in zeros]
    for i in zeros:
        node.replace_input_with(i, None)
    while node.inputs and node.inputs[-1] is None:  # trailing omitted inputs are dropped
        node.resize_inputs(len(node.inputs) - 1)
    remove_dead_producers(old)  # the run-time chain that built the zeros
    return Match.ok()


def _where_never_equal(node: ir.Node, ctx: Context) -> Match:
    """Expand shape guard Where(Equal(s, -1), 1, s) removed (s provably >= 0)"""
    cond, a, s = node.inputs if len(node.inputs) == 3 else (None, None, None)
    equal = _producer(cond, "Equal")
    if equal is None or s not in equal.inputs:
        return NO_MATCH
    c = constant(equal.inputs[1] if equal.inputs[0] is s else equal.inputs[0])
    if c is None or not np.all(c < 0):
        return NO_MATCH
    dims, a_shape = ctx.dims.get(s), ctx.dims.get(a)
    if a_shape is None or not _broadcast_keeps(dims, list(c.shape)) or not _broadcast_keeps(dims, list(a_shape)):
        return Match.fail("the condition or the other branch may broadcast s to a larger shape")
    if not nonnegative(s):
        return Match.fail("s is not provably >= 0")
    reason = substitute(node, s)
    if reason is None:
        remove_dead_producers([cond])
    return declined(reason)


def _own_dim(part: ir.Value, x: ir.Value, ctx: Context) -> int | None:
    """i when ``part`` is the one-element vector [x.shape[i]]: ``Unsqueeze(Gather(Shape(x), i), 0)``
    or ``Gather(Shape(x), [i])`` with a constant i (a negative i only with x's rank known)."""
    unsq = _producer(part, "Unsqueeze")
    gather = _producer(unsq.inputs[0] if unsq is not None else part, "Gather")
    if gather is None or (unsq is not None and node_axes(unsq) not in ([0], [-1])):
        return None
    shape = _producer(gather.inputs[0], "Shape")
    index = constant(gather.inputs[1]) if len(gather.inputs) > 1 else None
    if shape is None or shape.inputs[0] is not x or index is None or index.size != 1 \
            or (unsq is not None) != (index.ndim == 0) or "start" in shape.attributes or "end" in shape.attributes:
        return None
    i = int(index.reshape(-1)[0])
    if i < 0:
        dims = ctx.dims.get(x)
        if dims is None:
            return None
        i += len(dims)
    return i if i >= 0 else None


def _reshape_own_dims(node: ir.Node, ctx: Context) -> Match:
    """Reshape target entries read back from the data's own shape became 0 (copy)"""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return NO_MATCH
    allowzero = node.attributes.get("allowzero")
    concat = _producer(node.inputs[1], "Concat")
    if concat is None or (allowzero is not None and allowzero.as_int()) or \
            ("axis" in concat.attributes and concat.attributes["axis"].as_int() not in (0, -1)):
        return NO_MATCH
    hits, position = [], 0
    for k, part in enumerate(concat.inputs):
        i = _own_dim(part, node.inputs[0], ctx) if part is not None else None
        if i is not None and i == position:
            hits.append(k)
        value = constant(part) if part is not None else None
        dims = ctx.dims.get(part) if part is not None else None
        length = 1 if i is not None else value.size if value is not None else \
            dims[0] if dims is not None and len(dims) == 1 and isinstance(dims[0], int) else None
        if length is None:  # later entries' positions are unknown
            break
        position += length
    if not hits:
        return NO_MATCH
    if not _only_use(node.inputs[1], node):
        return Match.fail("the target has other users")
    zero = add_initializer(node.graph, ctx.names.value(f"{node.name or 'reshape'}_copy_dim"), np.array([0], np.int64))
    old = [concat.inputs[k] for k in hits]
    for k in hits:
        concat.replace_input_with(k, zero)
    remove_dead_producers(old)
    return Match.ok()


# ---------------------------------------------------------------- issue 22: Concat, Slice and Shape chains

INT64_MAX = 2**63 - 1


def _set_inputs(node: ir.Node, values: list) -> None:
    """Give ``node`` exactly ``values`` as inputs (in order)."""
    if len(values) > len(node.inputs):
        node.resize_inputs(len(values))
    for i, v in enumerate(values):
        if node.inputs[i] is not v:
            node.replace_input_with(i, v)
    if len(values) < len(node.inputs):
        node.resize_inputs(len(values))


def _concat_axis(node: ir.Node, ctx: Context, value: ir.Value | None = None) -> int | None:
    """A Concat's axis, made non-negative with the rank of ``value`` (or its output) when needed."""
    attr = node.attributes.get("axis")
    if attr is None:
        return None
    axis = attr.as_int()
    if axis >= 0:
        return axis
    dims = ctx.dims.get(value if value is not None else node.outputs[0])
    return axis + len(dims) if dims is not None and axis + len(dims) >= 0 else None


def _concat_flatten(node: ir.Node, ctx: Context) -> Match:
    """nested Concat on the same axis flattened"""
    axis = _concat_axis(node, ctx)
    nested = []
    for v in node.inputs:
        inner = _producer(v, "Concat")
        if inner is None or inner in nested:
            continue
        a = _concat_axis(inner, ctx)
        if a is None or axis is None:
            return Match.fail("negative Concat axis and the rank is unknown")
        if a != axis:
            continue
        if v.is_graph_output() or any(u.node is not node for u in v.uses()):
            return Match.fail("the inner Concat has other users")
        nested.append(inner)
    if not nested:
        return NO_MATCH
    flat: list = []
    for v in node.inputs:
        flat.extend(v.producer().inputs if v is not None and v.producer() in nested else [v])
    old = [n.outputs[0] for n in nested]
    _set_inputs(node, flat)
    remove_dead_producers(old)
    return Match.ok()


def _slice_args(node: ir.Node) -> tuple[list[int], list[int], list[int] | None, list[int]] | None:
    """(starts, ends, axes or None when omitted, steps) of a Slice with constant arguments (opset >= 10)."""
    if len(node.inputs) < 3:
        return None
    args = []
    for i in (1, 2, 3, 4):
        given = len(node.inputs) > i and node.inputs[i] is not None
        arr = constant(node.inputs[i]) if given else None
        if given and arr is None:
            return None
        args.append(None if arr is None else [int(a) for a in arr.reshape(-1)])
    starts, ends, axes, steps = args
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    steps = steps if steps is not None else [1] * len(starts)
    if len(steps) != len(starts) or (axes is not None and len(axes) != len(starts)):
        return None
    return starts, ends, axes, steps


def _slice_merge(node: ir.Node, ctx: Context) -> Match:
    """consecutive Slices merged into one"""
    inner = _producer(node.inputs[0], "Slice")
    if inner is None:
        return NO_MATCH
    a, b = _slice_args(inner), _slice_args(node)
    if a is None or b is None:
        return Match.fail("Slice arguments are not constant")
    if not _only_use(node.inputs[0], node):
        return Match.fail("the inner Slice has other users")
    x = inner.inputs[0]
    dims = ctx.dims.get(x)
    merged: dict[int, list[int]] = {}  # axis -> [start, end, step]
    for k, (starts, ends, axes, steps) in enumerate((a, b)):
        axes = axes if axes is not None else list(range(len(starts)))
        if any(ax < 0 for ax in axes):
            if dims is None:
                return Match.fail("negative axes and the rank is unknown")
            axes = [ax + len(dims) if ax < 0 else ax for ax in axes]
        if len(set(axes)) != len(axes):
            return Match.fail("repeated axes")
        for ax, s, e, st in zip(axes, starts, ends, steps):
            if ax not in merged:
                merged[ax] = [s, e, st]
                continue
            s1, e1, st1 = merged[ax]
            # x[s1:e1][s:e] with steps 1 and non-negative bounds is x[s1+s : min(e1, s1+e)] (clamping
            # included: both sides are empty exactly when s1 + s >= min(e1, s1 + e, dim))
            if k == 0 or st != 1 or st1 != 1 or min(s1, e1, s, e) < 0:
                return Match.fail("both Slices cut one axis with negative bounds or steps other than 1")
            merged[ax] = [min(s1 + s, INT64_MAX), min(e1, s1 + e, INT64_MAX), 1]
    order = sorted(merged)
    graph, base = node.graph, node.name or node.outputs[0].name or "slice"
    values = [add_initializer(graph, ctx.names.value(f"{base}_{what}"), np.array([merged[ax][i] for ax in order], np.int64))
              for i, what in ((0, "starts"), (1, "ends"))]
    values.append(add_initializer(graph, ctx.names.value(f"{base}_axes"), np.array(order, np.int64)))
    values.append(add_initializer(graph, ctx.names.value(f"{base}_steps"), np.array([merged[ax][2] for ax in order], np.int64)))
    _set_inputs(node, [x, *values])
    graph.remove(inner, safe=True)
    return Match.ok()


def _shape_range(part: ir.Value, ctx: Context) -> tuple[ir.Value, int, int] | None:
    """(x, a, b) when ``part`` is provably the 1-D vector ``Shape(x)[a:b]`` (0 <= a < b <= rank): a
    Shape (with start/end), ``Unsqueeze(Gather(Shape(x), i), 0)``, ``Gather(Shape(x), [i])`` or a
    step-1 ``Slice`` of a Shape, with constant indices; x's rank must be known."""
    unsq = _producer(part, "Unsqueeze")
    if unsq is not None and node_axes(unsq) not in ([0], [-1]):
        return None
    node = _producer(unsq.inputs[0] if unsq is not None else part, "Gather", "Slice", "Shape")
    if node is None:
        return None
    shape = node if node.op_type == "Shape" else _producer(node.inputs[0], "Shape")
    if shape is None:
        return None
    x = shape.inputs[0]
    dims = ctx.dims.get(x)
    if dims is None:
        return None
    rank = len(dims)

    def clamp(v: int) -> int:
        return max(0, min(v + rank if v < 0 else v, rank))
    s0 = clamp(shape.attributes["start"].as_int()) if "start" in shape.attributes else 0
    e0 = clamp(shape.attributes["end"].as_int()) if "end" in shape.attributes else rank
    length = max(0, e0 - s0)
    if node.op_type == "Shape":
        a, b = s0, e0
    elif node.op_type == "Gather":
        index = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes.get("axis")
        if index is None or index.size != 1 or (axis is not None and axis.as_int() not in (0, -1)):
            return None
        if (unsq is not None) != (index.ndim == 0):
            return None
        i = int(index.reshape(-1)[0])
        i = i + length if i < 0 else i
        if not 0 <= i < length:
            return None
        a, b = s0 + i, s0 + i + 1
    else:
        args = _slice_args(node)
        if unsq is not None or args is None or len(args[0]) != 1 or args[3] != [1] or args[2] not in (None, [0], [-1]):
            return None
        (s,), (e,) = args[0], args[1]
        s = max(0, min(s + length if s < 0 else s, length))
        e = max(0, min(e + length if e < 0 else e, length))
        a, b = s0 + s, s0 + e
    return (x, a, b) if 0 <= a < b <= rank else None


def _shape_runs(node: ir.Node, ctx: Context) -> Match:
    """adjacent Shape slices in a Concat merged into one Shape(start, end)"""
    if ctx.opset < 15 or _concat_axis(node, ctx) != 0:
        return NO_MATCH
    # a Reshape target is left to fold-shapes and _reshape_own_dims (a copied dim, 0, beats a Shape slice)
    if any(u.node.op_type == "Reshape" and u.idx == 1 for u in node.outputs[0].uses()):
        return NO_MATCH
    ranges = [_shape_range(v, ctx) if v is not None else None for v in node.inputs]
    runs, k = [], 0
    while k < len(ranges):
        j = k
        while (ranges[k] is not None and j + 1 < len(ranges) and ranges[j + 1] is not None
               and ranges[j + 1][0] is ranges[k][0] and ranges[j + 1][1] == ranges[j][2]):
            j += 1
        r = ranges[k]
        single_plain = j == k and (r is None or _producer(node.inputs[k], "Shape") is not None)
        if r is not None and not single_plain:
            runs.append((k, j))
        k = j + 1
    if not runs:
        return NO_MATCH
    graph, inputs, old = node.graph, list(node.inputs), []
    for k, j in reversed(runs):
        x, a, b = ranges[k][0], ranges[k][1], ranges[j][2]
        shape = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("start", a), ir.AttrInt64("end", b)],
                        name=ctx.names.node(f"{node.name or 'concat'}_shape_{a}_{b}"), num_outputs=1)
        shape.outputs[0].name = ctx.names.value(f"{x.name or 'x'}_shape_{a}_{b}")
        graph.insert_before(node, shape)
        old += inputs[k:j + 1]
        inputs[k:j + 1] = [shape.outputs[0]]
    _set_inputs(node, inputs)
    remove_dead_producers(old)
    if len(node.inputs) == 1:
        substitute(node, node.inputs[0])  # declined (graph output): a single-input Concat stays, still correct
    return Match.ok()



# ---------------------------------------------------------------- issue 22: repeats as nearest Resize

_NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
_RESIZE_DEFAULTS = {"exclude_outside": 0, "antialias": 0, "keep_aspect_ratio_policy": "stretch", "extrapolation_value": 0.0,
                    "cubic_coeff_a": -0.75}


def _power_of_two(r: int) -> bool:
    return r >= 2 and r & (r - 1) == 0


def _repeat_as_resize(node: ir.Node, ctx: Context) -> Match:
    """element repeat (Unsqueeze+Tile+Reshape) became a nearest Resize"""
    from onnxopt.passes.transpose_push import _resolve_target, _target
    tile = _producer(node.inputs[0], "Tile")
    unsq = _producer(tile.inputs[0], "Unsqueeze") if tile is not None else None
    if unsq is None:
        return NO_MATCH
    x = unsq.inputs[0]
    dims = ctx.aliased.dims(x)
    axes, reps = node_axes(unsq), constant(tile.inputs[1]) if len(tile.inputs) > 1 else None
    if dims is None or axes is None or len(axes) != 1 or reps is None or reps.size != len(dims) + 1:
        return Match.fail("the repeat's rank, axis or repeats are unknown")
    b = axes[0] % (len(dims) + 1)
    reps = [int(r) for r in reps.reshape(-1)]
    r = reps[b]
    if b == 0 or any(v != 1 for i, v in enumerate(reps) if i != b) or not _power_of_two(r):
        return Match.fail("not a repeat of one axis by a power of two")
    a = b - 1  # the Tile repeats x's axis a, element by element, once the Reshape merges axes a and b
    if ctx.opset < 13 or ctx.dims.dtype(x) != ir.DataType.FLOAT or len(dims) > 5:
        return Match.fail("Resize needs opset 13 and a float32 tensor of rank <= 5 here")
    tiled = dims[:b] + [fold_shapes._const(r)] + dims[b:]
    target = _target(ctx.aliased, node)
    if target is None:
        const = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        allowzero = node.attributes.get("allowzero")
        copies = not (allowzero is not None and allowzero.as_int())
        target = None if const is None else _resolve_target([int(t) for t in const.reshape(-1)], tiled, copies)
    want = dims[:a] + [fold_shapes._mul(dims[a], fold_shapes._const(r))] + dims[a + 1:]
    if target is None or any(e is None for e in want) or target != want:
        return Match.fail("the Reshape target is not provably the repeated axis merged")
    if not _only_use(tile.inputs[0], tile) or not _only_use(node.inputs[0], node):
        return Match.fail("the Unsqueeze or Tile result has other users")
    scales = np.ones(len(dims), np.float32)
    scales[a] = r
    graph = node.graph
    value = add_initializer(graph, ctx.names.value(f"{node.name or 'repeat'}_scales"), scales)
    resize = ir.Node("", "Resize", [x, None, value], attributes=[ir.AttrString(k, v) for k, v in _NEAREST.items()],
                     name=ctx.names.node(f"{node.name or 'repeat'}_resize"), num_outputs=1)
    resize.outputs[0].name = ctx.names.value(f"{node.outputs[0].name or 'repeat'}_resized")
    graph.insert_before(node, resize)
    reason = substitute(node, resize.outputs[0])
    if reason:
        graph.remove(resize, safe=True)
        return Match.fail(reason)
    remove_dead_producers([tile.outputs[0]])
    return Match.ok()


def _nearest_floor(node: ir.Node) -> np.ndarray | None:
    """Scales of a Resize that repeats elements (nearest, asymmetric, floor, default otherwise, constant
    power-of-two or 1 scales, no roi or sizes), else None."""
    if any(node.attributes[k].as_string() != v if k in node.attributes else True for k, v in _NEAREST.items()):
        return None
    for k, v in _RESIZE_DEFAULTS.items():
        attr = node.attributes.get(k)
        if attr is not None and attr.value != v:
            return None
    if "axes" in node.attributes:
        return None
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    roi = constant(inputs[1]) if inputs[1] is not None else np.zeros(0)
    scales = constant(inputs[2]) if inputs[2] is not None else None
    if roi is None or roi.size or scales is None or scales.size == 0 or inputs[3] is not None:
        return None
    if any(not (float(v) == 1.0 or (float(v).is_integer() and _power_of_two(int(v)))) for v in scales.reshape(-1)):
        return None
    return scales.reshape(-1)


def _resize_chain(node: ir.Node, ctx: Context) -> Match:
    """nearest Resize repeats merged into one"""
    inner = _producer(node.inputs[0], "Resize")
    if inner is None:
        return NO_MATCH
    outer_scales, inner_scales = _nearest_floor(node), _nearest_floor(inner)
    if outer_scales is None or inner_scales is None:
        return NO_MATCH
    if outer_scales.size != inner_scales.size:
        return Match.fail("rank mismatch")
    if not _only_use(node.inputs[0], node):
        return Match.fail("the inner Resize has other users")
    # x[floor(floor(i / s2) / s1)] = x[floor(i / (s1 * s2))] for integer scales
    scales = (outer_scales.astype(np.float64) * inner_scales.astype(np.float64)).astype(np.float32)
    node.replace_input_with(2, add_initializer(node.graph, ctx.names.value(f"{node.name or 'resize'}_scales"), scales))
    node.replace_input_with(0, inner.inputs[0])
    node.graph.remove(inner, safe=True)
    return Match.ok()


def _matmul_reshape_roundtrip(node: ir.Node, ctx: Context) -> Match:
    """Reshape round trip around a MatMul by a constant matrix removed"""
    from onnxopt.passes.transpose_push import _resolve_target, _target
    mm = _producer(node.inputs[0], "MatMul")
    inner = _producer(mm.inputs[0], "Reshape") if mm is not None else None
    w = constant(mm.inputs[1]) if mm is not None else None
    if inner is None or w is None or w.ndim != 2:
        return NO_MATCH
    x = inner.inputs[0]
    dims = ctx.aliased.dims(x)
    if dims is None or len(dims) < 3 or any(d is None for d in dims) or dims[-1] != fold_shapes._const(w.shape[0]):
        return Match.fail("x's dims are unknown, or its last dim is not the matrix's rows")
    rows: fold_shapes.Expr = (1, ())
    for d in dims[:-1]:
        rows = fold_shapes._mul(rows, d)

    def target_of(reshape: ir.Node, data_dims: list) -> list | None:
        found = _target(ctx.aliased, reshape)
        if found is None:
            const = constant(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
            allowzero = reshape.attributes.get("allowzero")
            copies = not (allowzero is not None and allowzero.as_int())
            found = None if const is None else _resolve_target([int(t) for t in const.reshape(-1)], data_dims, copies)
        return found
    flat = [rows, dims[-1]]
    if target_of(inner, dims) != flat:
        return Match.fail("the inner Reshape does not provably flatten x to [rows, K]")
    n = fold_shapes._const(w.shape[1])
    if target_of(node, [rows, n]) != dims[:-1] + [n]:
        return Match.fail("the outer Reshape does not provably restore x's leading dims")
    if not _only_use(mm.inputs[0], mm) or not _only_use(node.inputs[0], node):
        return Match.fail("the flattened input or the MatMul result has other users")
    # MatMul broadcasts a 2-D matrix over x's leading dims: the same rows times the same matrix
    mm.replace_input_with(0, x)
    mm.outputs[0].shape = None
    return declined(substitute(node, mm.outputs[0]))


def _slice_squeeze_gather(node: ir.Node, ctx: Context) -> Match:
    """Slice of one element + Squeeze of its axis became a Gather"""
    sl = _producer(node.inputs[0], "Slice")
    if sl is None:
        return NO_MATCH
    args = _slice_args(sl)
    axes = node_axes(node)
    dims = ctx.dims.get(sl.inputs[0])
    if args is None or axes is None or len(axes) != 1 or len(args[0]) != 1 or args[3] != [1]:
        return NO_MATCH
    (start,), (end,), sl_axes = args[0], args[1], args[2] if args[2] is not None else [0]
    rank = len(dims) if dims is not None else None
    a, b = sl_axes[0], axes[0]
    if (a < 0 or b < 0) and rank is None:
        return Match.fail("negative axes and the rank is unknown")
    if rank is not None:
        a, b = a % rank, b % rank
    if a != b:
        return NO_MATCH
    # one element, or an empty result whose Squeeze fails like the Gather's index does
    if not ((start >= 0 and end == start + 1) or (start < 0 and end == start + 1 and end < 0) or (start == -1 and end >= INT_MAX_LIKE)):
        return Match.fail("the Slice does not take exactly one element")
    if not _only_use(node.inputs[0], node):
        return Match.fail("the Slice result has other users")
    index = add_initializer(node.graph, ctx.names.value(f"{node.name or 'squeeze'}_index"), np.array(start, np.int64))
    gather = ir.Node("", "Gather", [sl.inputs[0], index], attributes=[ir.AttrInt64("axis", a)],
                     name=ctx.names.node(f"{node.name or 'squeeze'}_gather"), num_outputs=1)
    gather.outputs[0].name = ctx.names.value(f"{node.outputs[0].name or 'squeeze'}_gathered")
    node.graph.insert_before(node, gather)
    reason = substitute(node, gather.outputs[0])
    if reason:
        node.graph.remove(gather, safe=True)
        return Match.fail(reason)
    sl.graph.remove(sl, safe=True)
    return Match.ok()


def _absorbing_mask(node: ir.Node, ctx: Context) -> Match:
    """And with all-false / Or with all-true constant became a constant"""
    absorbing = {"And": False, "Or": True}[node.op_type]
    x, c = (list(node.inputs) + [None, None])[:2]
    if constant(c) is None:
        x, c = c, x
    arr = constant(c)
    if arr is None or x is None or arr.size == 0 or not np.all(arr == absorbing):
        return NO_MATCH
    out = node.outputs[0]
    dims = ctx.dims.get(out)
    static = [d for d in dims if isinstance(d, int)] if dims is not None else []
    if dims is None or len(static) != len(dims):
        return Match.fail("the result's dims are not all static")
    if out.is_graph_output():
        return Match.fail("the result is a graph output")
    if int(np.prod(static)) > 1 << 16:
        return Match.fail("the constant would be large")
    replace_with_initializer(out, np.full(tuple(static), absorbing, dtype=np.bool_))
    inputs = [v for v in node.inputs if v is not None]
    node.graph.remove(node, safe=True)
    remove_dead_producers(inputs)
    return Match.ok()

#: see Simplify's ``size_rules``
SIZE_RULES = frozenset({_unsqueeze_chain, _reshape_roundtrip, _parallel_matmuls, _where_never_equal, _reshape_own_dims,
                        _concat_flatten, _slice_merge, _shape_runs, _repeat_as_resize, _resize_chain,
                        _matmul_reshape_roundtrip, _slice_squeeze_gather})

RULES: dict[str, tuple[Rule, ...]] = {
    "Add": (_identity_arith, _matmul_add_gemm),
    "Sub": (_identity_arith,),
    "Mul": (_identity_arith,),
    "Div": (_identity_arith,),
    "Transpose": (_transpose,),
    "Reshape": (_reshape, _reshape_roundtrip, _reshape_own_dims, _repeat_as_resize, _matmul_reshape_roundtrip),
    "Squeeze": (_squeeze_pair, _slice_squeeze_gather),
    "Unsqueeze": (_squeeze_pair, _unsqueeze_chain),
    "And": (_identity_arith, _absorbing_mask),
    "Or": (_identity_arith, _absorbing_mask),
    "Cast": (_cast,),
    "Concat": (_noop, _concat_flatten, _shape_runs),
    "Expand": (_noop,),
    "Tile": (_noop,),
    "Slice": (_noop, _slice_merge),
    "Pad": (_noop,),
    "Resize": (_noop, _resize_chain),
    "Upsample": (_noop,),
    "Conv": (_pad_into_conv,),
    "MaxPool": (_pad_into_pool,),
    "AveragePool": (_pad_into_pool,),
    "MatMul": (_parallel_matmuls,),
    "Where": (_where_never_equal,),
    "LSTM": (_rnn_zero_state,),
    "GRU": (_rnn_zero_state,),
    "RNN": (_rnn_zero_state,),
}

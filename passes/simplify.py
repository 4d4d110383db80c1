"""simplify: small algebraic and structural rewrites, each a pattern / check / rewrite rule."""

from __future__ import annotations

import collections
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
    remove_dead_producers,
    substitute,
)
from onnxopt.passes import fold_shapes
from onnxopt.rewrites.chains import (
    absorbing_mask,
    concat_flatten,
    matmul_reshape_roundtrip,
    repeat_as_resize,
    resize_chain,
    shape_runs,
    slice_merge,
    slice_squeeze_gather,
)
from onnxopt.rewrites.common import (
    INT_MAX_LIKE,
    Context,
    broadcast_keeps,
    only_use,
    producer_op,
)
from onnxopt.rewrites.structure import (
    matmul_add_gemm,
    pad_into_conv,
    pad_into_pool,
    parallel_matmuls,
    reshape_own_dims,
    rnn_zero_state,
    where_never_equal,
)

# A rule returns NO_MATCH (pattern absent), Match.ok() (rewritten) or Match.fail(reason) (declined).
Rule = Callable[[ir.Node, "Context"], Match]


FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


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
      Reshape/Concat/Cast... of such: ``is_zeros``) of LSTM/GRU/RNN -> the input left out (the
      operators' default is zeros); the Shape chain computing it dies;
    - ``Concat(.., Concat(a, b), ..)`` on the same axis, the inner one used only there -> one Concat;
    - ``Slice(Slice(x))`` with constant arguments -> one Slice (disjoint axes; on a shared axis only
      with steps 1 and non-negative bounds, where ``x[s1:e1][s2:e2] = x[s1+s2 : min(e1, s1+e2)]``);
    - adjacent parts of a 1-D Concat that are consecutive slices of one ``Shape(x)`` (``[Shape(x)[i]]``
      as Unsqueeze/Gather, Slice or Shape with start/end) -> one ``Shape(x, start, end)`` (opset >= 15;
      not in a Reshape target, which fold-shapes and reshape_own_dims turn into copies);
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

    def __init__(self, size_rules: bool = True, skip: str = ""):
        super().__init__()
        # off: fuse-transformer's preparation (fusion patterns match the exporter's Q/K/V and mask form)
        self.size_rules = size_rules
        #: rules left out, "+"-separated names (rule_names()): optimize's rollback of one rule
        self.skip = frozenset(n for n in skip.split("+") if n)

    @classmethod
    def rule_names(cls) -> list[str]:
        """The names ``skip`` takes, one per rule."""
        return sorted({rule.__name__.strip("_") for rules in RULES.values() for rule in rules})

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
                    if rule.__name__.strip("_") in self.skip:
                        continue
                    rule(node, ctx).tally(changed, skipped, rule.__doc__.strip().splitlines()[0], rule.__name__.strip("_"))
            if sum(changed.values()) == before:
                break
        return self.result(model, changed, skipped)


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
        if not broadcast_keeps(ctx.dims.get(x), arr.shape):
            return Match.fail("the constant would broadcast x to a larger shape (or x's shape is unknown)")
        if ctx.dims.dtype(x) != c.const_value.dtype:
            return Match.fail("dtype differs")
        return declined(substitute(node, x))
    return NO_MATCH


def _neutral_fill(value: ir.Value | None, neutral) -> bool:
    """``Expand(c, shape)`` of a constant c, or ``ConstantOfShape`` with a fill, that is all ``neutral``
    (tf2onnx's ``ones_like`` masks: ``And(Expand(true, Shape(x)), m)``)."""
    producer = producer_op(value, "Expand", "ConstantOfShape")
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
    inner = producer_op(node.inputs[0], "Transpose")
    if inner is None or inner.attributes.get("perm") is None:
        return NO_MATCH
    if not only_use(node.inputs[0], node):
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
    inner = producer_op(node.inputs[0], "Reshape", "Flatten", "Squeeze", "Unsqueeze")
    if inner is None:
        return NO_MATCH
    if copies and (target.count(0) != 1 or any(t < 0 for t in target)):
        return Match.fail("target copies several dims of the intermediate (0 entries) or has a -1 too")
    if not only_use(node.inputs[0], node):
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
    inner = producer_op(node.inputs[0], other)
    if inner is None:
        return NO_MATCH
    a, b = node_axes(node), node_axes(inner)
    a, b = (sorted(a) if a is not None else None), (sorted(b) if b is not None else None)
    if a is None or b is None or a != b or any(x < 0 for x in a):
        return Match.fail("axes differ or are not constant non-negative")
    return declined(substitute(node, inner.inputs[0]))


def _unsqueeze_chain(node: ir.Node, ctx: Context) -> Match:
    """Unsqueeze chain merged into one Unsqueeze"""
    inner = producer_op(node.inputs[0], "Unsqueeze")
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
    inner = producer_op(x, "Cast")
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
        if shape is None or not broadcast_keeps(x_dims, [int(s) for s in shape]):
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
            # an inferred empty axis is no fact: onnx inference and ORT disagree on some (a negative-step
            # Slice with out-of-range bounds: 0 rows inferred, 1 on ORT), and [0:0] empties a real one
            full_end = e >= INT_MAX_LIKE or (isinstance(dim, int) and dim > 0 and e >= dim)
            if st != 1 or s != 0 or not full_end:
                return NO_MATCH
        return declined(substitute(node, x))
    return NO_MATCH


#: see Simplify's ``size_rules``
SIZE_RULES = frozenset({_unsqueeze_chain, _reshape_roundtrip, parallel_matmuls, where_never_equal, reshape_own_dims,
                        concat_flatten, slice_merge, shape_runs, repeat_as_resize, resize_chain,
                        matmul_reshape_roundtrip, slice_squeeze_gather})


RULES: dict[str, tuple[Rule, ...]] = {
    "Add": (_identity_arith, matmul_add_gemm),
    "Sub": (_identity_arith,),
    "Mul": (_identity_arith,),
    "Div": (_identity_arith,),
    "Transpose": (_transpose,),
    "Reshape": (_reshape, _reshape_roundtrip, reshape_own_dims, repeat_as_resize, matmul_reshape_roundtrip),
    "Squeeze": (_squeeze_pair, slice_squeeze_gather),
    "Unsqueeze": (_squeeze_pair, _unsqueeze_chain),
    "And": (_identity_arith, absorbing_mask),
    "Or": (_identity_arith, absorbing_mask),
    "Cast": (_cast,),
    "Concat": (_noop, concat_flatten, shape_runs),
    "Expand": (_noop,),
    "Tile": (_noop,),
    "Slice": (_noop, slice_merge),
    "Pad": (_noop,),
    "Resize": (_noop, resize_chain),
    "Upsample": (_noop,),
    "Conv": (pad_into_conv,),
    "MaxPool": (pad_into_pool,),
    "AveragePool": (pad_into_pool,),
    "MatMul": (parallel_matmuls,),
    "Where": (where_never_equal,),
    "LSTM": (rnn_zero_state,),
    "GRU": (rnn_zero_state,),
    "RNN": (rnn_zero_state,),
}

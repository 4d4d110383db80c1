"""simplify's rules on Concat, Slice and Shape chains, element repeats and mask fills (issue 22)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    NO_MATCH,
    Match,
    add_initializer,
    constant,
    declined,
    graph_of,
    node_axes,
    present,
    producer_of,
    remove_dead_producers,
    replace_with_initializer,
    substitute,
)
from onnxopt.passes import fold_shapes
from onnxopt.rewrites.common import (
    INT_MAX_LIKE,
    Context,
    only_use,
    producer_op,
)

INT64_MAX = 2**63 - 1


def set_inputs(node: ir.Node, values: list) -> None:
    """Give ``node`` exactly ``values`` as inputs (in order)."""
    if len(values) > len(node.inputs):
        node.resize_inputs(len(values))
    for i, v in enumerate(values):
        if node.inputs[i] is not v:
            node.replace_input_with(i, v)
    if len(values) < len(node.inputs):
        node.resize_inputs(len(values))


def concat_axis(node: ir.Node, ctx: Context, value: ir.Value | None = None) -> int | None:
    """A Concat's axis, made non-negative with the rank of ``value`` (or its output) when needed."""
    attr = node.attributes.get("axis")
    if attr is None:
        return None
    axis = attr.as_int()
    if axis >= 0:
        return axis
    dims = ctx.dims.get(value if value is not None else node.outputs[0])
    return axis + len(dims) if dims is not None and axis + len(dims) >= 0 else None


def concat_flatten(node: ir.Node, ctx: Context) -> Match:
    """nested Concat on the same axis flattened"""
    axis = concat_axis(node, ctx)
    nested = []
    for v in node.inputs:
        inner = producer_op(v, "Concat")
        if inner is None or inner in nested:
            continue
        a = concat_axis(inner, ctx)
        if a is None or axis is None:
            return Match.fail("negative Concat axis and the rank is unknown")
        if a != axis:
            continue
        if present(v).is_graph_output() or any(u.node is not node for u in present(v).uses()):
            return Match.fail("the inner Concat has other users")
        nested.append(inner)
    if not nested:
        return NO_MATCH
    flat: list = []
    for v in node.inputs:
        flat.extend(producer_of(v).inputs if v is not None and v.producer() in nested else [v])
    old: list[ir.Value | None] = [n.outputs[0] for n in nested]
    set_inputs(node, flat)
    remove_dead_producers(old)
    return Match.ok()


def slice_args(node: ir.Node) -> tuple[list[int], list[int], list[int] | None, list[int]] | None:
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


def slice_merge(node: ir.Node, ctx: Context) -> Match:
    """consecutive Slices merged into one"""
    inner = producer_op(node.inputs[0], "Slice")
    if inner is None:
        return NO_MATCH
    a, b = slice_args(inner), slice_args(node)
    if a is None or b is None:
        return Match.fail("Slice arguments are not constant")
    if not only_use(present(node.inputs[0]), node):
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
    graph, base = graph_of(node), node.name or node.outputs[0].name or "slice"
    values = [add_initializer(graph, ctx.names.value(f"{base}_{what}"), np.array([merged[ax][i] for ax in order], np.int64))
              for i, what in ((0, "starts"), (1, "ends"))]
    values.append(add_initializer(graph, ctx.names.value(f"{base}_axes"), np.array(order, np.int64)))
    values.append(add_initializer(graph, ctx.names.value(f"{base}_steps"), np.array([merged[ax][2] for ax in order], np.int64)))
    set_inputs(node, [x, *values])
    graph.remove(inner, safe=True)
    return Match.ok()


def shape_range(part: ir.Value, ctx: Context) -> tuple[ir.Value, int, int] | None:
    """(x, a, b) when ``part`` is provably the 1-D vector ``Shape(x)[a:b]`` (0 <= a < b <= rank): a
    Shape (with start/end), ``Unsqueeze(Gather(Shape(x), i), 0)``, ``Gather(Shape(x), [i])`` or a
    step-1 ``Slice`` of a Shape, with constant indices; x's rank must be known."""
    unsq = producer_op(part, "Unsqueeze")
    if unsq is not None and node_axes(unsq) not in ([0], [-1]):
        return None
    node = producer_op(unsq.inputs[0] if unsq is not None else part, "Gather", "Slice", "Shape")
    if node is None:
        return None
    shape = node if node.op_type == "Shape" else producer_op(node.inputs[0], "Shape")
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
        args = slice_args(node)
        if unsq is not None or args is None or len(args[0]) != 1 or args[3] != [1] or args[2] not in (None, [0], [-1]):
            return None
        (s,), (e,) = args[0], args[1]
        s = max(0, min(s + length if s < 0 else s, length))
        e = max(0, min(e + length if e < 0 else e, length))
        a, b = s0 + s, s0 + e
    return (present(x), a, b) if 0 <= a < b <= rank else None


def shape_runs(node: ir.Node, ctx: Context) -> Match:
    """adjacent Shape slices in a Concat merged into one Shape(start, end)"""
    if ctx.opset < 15 or concat_axis(node, ctx) != 0:
        return NO_MATCH
    # a Reshape target is left to fold-shapes and reshape_own_dims (a copied dim, 0, beats a Shape slice)
    if any(u.node.op_type == "Reshape" and u.idx == 1 for u in node.outputs[0].uses()):
        return NO_MATCH
    ranges = [shape_range(v, ctx) if v is not None else None for v in node.inputs]
    runs, k = [], 0
    while k < len(ranges):
        j = k
        while (ranges[k] is not None and j + 1 < len(ranges) and ranges[j + 1] is not None
               and present(ranges[j + 1])[0] is present(ranges[k])[0] and present(ranges[j + 1])[1] == present(ranges[j])[2]):
            j += 1
        r = ranges[k]
        single_plain = j == k and (r is None or producer_op(node.inputs[k], "Shape") is not None)
        if r is not None and not single_plain:
            runs.append((k, j))
        k = j + 1
    if not runs:
        return NO_MATCH
    graph, inputs, old = graph_of(node), list(node.inputs), []
    for k, j in reversed(runs):
        x, a, b = present(ranges[k])[0], present(ranges[k])[1], present(ranges[j])[2]
        shape = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("start", a), ir.AttrInt64("end", b)],
                        name=ctx.names.node(f"{node.name or 'concat'}_shape_{a}_{b}"), num_outputs=1)
        shape.outputs[0].name = ctx.names.value(f"{x.name or 'x'}_shape_{a}_{b}")
        graph.insert_before(node, shape)
        old += inputs[k:j + 1]
        inputs[k:j + 1] = [shape.outputs[0]]
    set_inputs(node, inputs)
    remove_dead_producers(old)
    if len(node.inputs) == 1:
        substitute(node, present(node.inputs[0]))  # declined (graph output): a single-input Concat stays, still correct
    return Match.ok()


NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}


RESIZE_DEFAULTS = {"exclude_outside": 0, "antialias": 0, "keep_aspect_ratio_policy": "stretch", "extrapolation_value": 0.0,
                    "cubic_coeff_a": -0.75}


def power_of_two(r: int) -> bool:
    return r >= 2 and r & (r - 1) == 0


def repeat_as_resize(node: ir.Node, ctx: Context) -> Match:
    """element repeat (Unsqueeze+Tile+Reshape) became a nearest Resize"""
    from onnxopt.passes.transpose_push import _resolve_target, _target
    tile = producer_op(node.inputs[0], "Tile")
    unsq = producer_op(tile.inputs[0], "Unsqueeze") if tile is not None else None
    if unsq is None:
        return NO_MATCH
    x = unsq.inputs[0]
    dims = ctx.aliased.dims(x)
    axes, reps = node_axes(unsq), constant(present(tile).inputs[1]) if len(present(tile).inputs) > 1 else None
    if dims is None or axes is None or len(axes) != 1 or reps is None or reps.size != len(dims) + 1:
        return Match.fail("the repeat's rank, axis or repeats are unknown")
    b = axes[0] % (len(dims) + 1)
    reps = [int(r) for r in reps.reshape(-1)]
    r = reps[b]
    if b == 0 or any(v != 1 for i, v in enumerate(reps) if i != b) or not power_of_two(r):
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
    if not only_use(present(present(tile).inputs[0]), present(tile)) or not only_use(present(node.inputs[0]), node):
        return Match.fail("the Unsqueeze or Tile result has other users")
    scales = np.ones(len(dims), np.float32)
    scales[a] = r
    graph = graph_of(node)
    value = add_initializer(graph, ctx.names.value(f"{node.name or 'repeat'}_scales"), scales)
    resize = ir.Node("", "Resize", [x, None, value], attributes=[ir.AttrString(k, v) for k, v in NEAREST.items()],
                     name=ctx.names.node(f"{node.name or 'repeat'}_resize"), num_outputs=1)
    resize.outputs[0].name = ctx.names.value(f"{node.outputs[0].name or 'repeat'}_resized")
    graph.insert_before(node, resize)
    reason = substitute(node, resize.outputs[0])
    if reason:
        graph.remove(resize, safe=True)
        return Match.fail(reason)
    remove_dead_producers([present(tile).outputs[0]])
    return Match.ok()


def nearest_floor(node: ir.Node) -> np.ndarray | None:
    """Scales of a Resize that repeats elements (nearest, asymmetric, floor, default otherwise, constant
    power-of-two or 1 scales, no roi or sizes), else None."""
    if any(node.attributes[k].as_string() != v if k in node.attributes else True for k, v in NEAREST.items()):
        return None
    for k, v in RESIZE_DEFAULTS.items():
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
    if any(not (float(v) == 1.0 or (float(v).is_integer() and power_of_two(int(v)))) for v in scales.reshape(-1)):
        return None
    return scales.reshape(-1)


def resize_chain(node: ir.Node, ctx: Context) -> Match:
    """nearest Resize repeats merged into one"""
    inner = producer_op(node.inputs[0], "Resize")
    if inner is None:
        return NO_MATCH
    outer_scales, inner_scales = nearest_floor(node), nearest_floor(inner)
    if outer_scales is None or inner_scales is None:
        return NO_MATCH
    if outer_scales.size != inner_scales.size:
        return Match.fail("rank mismatch")
    if not only_use(present(node.inputs[0]), node):
        return Match.fail("the inner Resize has other users")
    # x[floor(floor(i / s2) / s1)] = x[floor(i / (s1 * s2))] for integer scales
    scales = (outer_scales.astype(np.float64) * inner_scales.astype(np.float64)).astype(np.float32)
    node.replace_input_with(2, add_initializer(graph_of(node), ctx.names.value(f"{node.name or 'resize'}_scales"), scales))
    node.replace_input_with(0, inner.inputs[0])
    graph_of(node).remove(inner, safe=True)
    return Match.ok()


def matmul_reshape_roundtrip(node: ir.Node, ctx: Context) -> Match:
    """Reshape round trip around a MatMul by a constant matrix removed"""
    from onnxopt.passes.transpose_push import _resolve_target, _target
    mm = producer_op(node.inputs[0], "MatMul")
    inner = producer_op(mm.inputs[0], "Reshape") if mm is not None else None
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
    if not only_use(present(present(mm).inputs[0]), present(mm)) or not only_use(present(node.inputs[0]), node):
        return Match.fail("the flattened input or the MatMul result has other users")
    # MatMul broadcasts a 2-D matrix over x's leading dims: the same rows times the same matrix
    present(mm).replace_input_with(0, x)
    present(mm).outputs[0].shape = None
    return declined(substitute(node, present(mm).outputs[0]))


def slice_squeeze_gather(node: ir.Node, ctx: Context) -> Match:
    """Slice of one element + Squeeze of its axis became a Gather"""
    sl = producer_op(node.inputs[0], "Slice")
    if sl is None:
        return NO_MATCH
    args = slice_args(sl)
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
    if not only_use(present(node.inputs[0]), node):
        return Match.fail("the Slice result has other users")
    index = add_initializer(graph_of(node), ctx.names.value(f"{node.name or 'squeeze'}_index"), np.array(start, np.int64))
    gather = ir.Node("", "Gather", [sl.inputs[0], index], attributes=[ir.AttrInt64("axis", a)],
                     name=ctx.names.node(f"{node.name or 'squeeze'}_gather"), num_outputs=1)
    gather.outputs[0].name = ctx.names.value(f"{node.outputs[0].name or 'squeeze'}_gathered")
    graph_of(node).insert_before(node, gather)
    reason = substitute(node, gather.outputs[0])
    if reason:
        graph_of(node).remove(gather, safe=True)
        return Match.fail(reason)
    graph_of(sl).remove(sl, safe=True)
    return Match.ok()


def absorbing_mask(node: ir.Node, ctx: Context) -> Match:
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
    inputs: list[ir.Value | None] = [v for v in node.inputs if v is not None]
    graph_of(node).remove(node, safe=True)
    remove_dead_producers(inputs)
    return Match.ok()

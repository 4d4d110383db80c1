"""simplify's rules on pads, pools, matmuls, RNN states, guards and a Reshape's own dims."""

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
    is_standard,
    node_axes,
    nonnegative,
    present,
    remove_dead_producers,
    substitute,
)
from onnxopt.rewrites.common import (
    Context,
    broadcast_keeps,
    only_use,
    producer_op,
)


def pad_args(pad: ir.Node) -> tuple[list[int], float] | str:
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


def pad_before(node: ir.Node) -> tuple[ir.Node, list[int], float] | Match:
    """The Pad feeding ``node``'s data input with its (pads, fill) (:func:`pad_args`), or NO_MATCH
    (no Pad there) / the decline saying why it does not qualify."""
    pad = producer_op(node.inputs[0], "Pad")
    if pad is None:
        return NO_MATCH
    args = pad_args(pad)
    if isinstance(args, str):
        return Match.fail(args)
    return pad, *args


def merged_pads(node: ir.Node, pads: list[int]) -> list[int]:
    rank = len(pads) // 2
    k = rank - 2
    own = list(node.attributes["pads"].as_ints()) if "pads" in node.attributes else [0] * (2 * k)
    return [own[i] + pads[2 + i] for i in range(k)] + [own[k + i] + pads[rank + 2 + i] for i in range(k)]


def pad_into_conv(node: ir.Node, ctx: Context) -> Match:
    """Pad folded into Conv"""
    found = pad_before(node)
    if isinstance(found, Match):
        return found
    pad, pads, value = found
    if value != 0:
        return Match.fail("Pad value is not zero")
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return Match.fail("Conv uses auto_pad")
    if not only_use(present(node.inputs[0]), node):
        return Match.fail("Pad output has other users")
    node.attributes["pads"] = ir.AttrInt64s("pads", merged_pads(node, pads))
    node.replace_input_with(0, pad.inputs[0])
    return Match.ok()


#: float ops whose output is >= 0 whatever their input (NaN aside)
NONNEG_OPS = frozenset({"Relu", "Sigmoid", "Softplus", "Abs", "Exp", "Softmax", "HardSigmoid"})


#: ops whose output is >= 0 when their first input is (they move, select or pool its elements)
NONNEG_KEEP = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Transpose", "Reshape",
                          "Identity", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Tile",
                          "DepthToSpace", "SpaceToDepth", "Dropout"})


def nonnegative_float(value: ir.Value | None, depth: int = 8) -> bool:
    """True when every element of the float ``value`` is provably >= 0 (or NaN): a constant, Relu/
    Sigmoid/Softplus/Abs/Exp/Softmax/HardSigmoid, Clip with a constant min >= 0, Max with one such
    input, Add/Mul/Concat/Min of such inputs, and moves or pools of such a value (``NONNEG_KEEP``;
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
    if op in NONNEG_OPS:
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
        return any(nonnegative_float(v, depth - 1) for v in node.inputs)
    if op in ("Add", "Mul", "Concat", "Min", "Sum", "Mean"):
        return all(nonnegative_float(v, depth - 1) for v in node.inputs)
    if op == "Pad":
        args = pad_args(node)
        fill_ok = not isinstance(args, str) and args[1] >= 0
        return fill_ok and nonnegative_float(node.inputs[0], depth - 1)
    if op in NONNEG_KEEP:
        return nonnegative_float(node.inputs[0], depth - 1)
    return False


def pad_into_pool(node: ir.Node, ctx: Context) -> Match:
    """Pad folded into MaxPool/AveragePool"""
    found = pad_before(node)
    if isinstance(found, Match):
        return found
    pad, pads, value = found
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return Match.fail("the pool uses auto_pad")
    if "ceil_mode" in node.attributes and node.attributes["ceil_mode"].as_int():
        return Match.fail("ceil_mode: windows past the padding would differ")
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Match.fail("MaxPool's Indices output is used (indices count the padded tensor)")
    if not only_use(present(node.inputs[0]), node):
        return Match.fail("Pad output has other users")
    merged = merged_pads(node, pads)
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
        if not (value == -np.inf or (value == 0 and nonnegative_float(pad.inputs[0]))):
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


def matmul_add_gemm(node: ir.Node, ctx: Context) -> Match:
    """MatMul+Add fused into Gemm"""
    if ctx.opset < 11:
        return NO_MATCH
    for i in (0, 1):
        mm = producer_op(node.inputs[i], "MatMul")
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
        if not only_use(present(node.inputs[i]), node):
            return Match.fail("MatMul result has other users")
        gemm = ir.Node("", "Gemm", [a, b, bias], name=ctx.names.node((mm.name or "gemm") + "_gemm"), num_outputs=1)
        graph_of(node).insert_before(node, gemm)
        gemm.outputs[0].name = ctx.names.value((mm.outputs[0].name or "gemm") + "_gemm")
        reason = substitute(node, gemm.outputs[0])
        if reason:
            graph_of(node).remove(gemm, safe=True)
            return Match.fail(reason)
        return Match.ok()
    return NO_MATCH


def matmul_siblings(node: ir.Node) -> list[ir.Node]:
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
                or b.shape[0] != w.shape[0] or b.dtype != w.dtype or len(present(other.inputs[1]).uses()) != 1
                or other.outputs[0].is_graph_output() or present(other.inputs[1]).is_graph_output()):
            continue
        found.append(other)
    order = {id(n): i for i, n in enumerate(graph_of(node))}
    return sorted(found, key=lambda n: order[id(n)])


def parallel_matmuls(node: ir.Node, ctx: Context) -> Match:
    """parallel MatMuls on one input merged into one MatMul + Split"""
    siblings = matmul_siblings(node)
    if len(siblings) < 2 or siblings[0] is not node:
        return NO_MATCH  # rewritten from the first sibling only
    weights = [constant(n.inputs[1]) for n in siblings]
    graph, x = graph_of(node), node.inputs[0]
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
ZERO_KEEP = frozenset({"Expand", "Tile", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose", "Slice",
                        "Gather", "Cast", "Dropout"})


def is_zeros(value: ir.Value | None, depth: int = 12) -> bool:
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
    if producer.op_type in ZERO_KEEP:
        return is_zeros(producer.inputs[0], depth - 1)
    if producer.op_type == "Concat":
        return bool(producer.inputs) and all(is_zeros(v, depth - 1) for v in producer.inputs)
    return False


def rnn_zero_state(node: ir.Node, ctx: Context) -> Match:
    """zero initial state of LSTM/GRU/RNN left to its default"""
    slots = (5, 6) if node.op_type == "LSTM" else (5,)  # initial_h (and initial_c): default 0
    zeros = [i for i in slots if i < len(node.inputs) and node.inputs[i] is not None and is_zeros(node.inputs[i])]
    if not zeros:
        return NO_MATCH
    if any(present(node.inputs[i]).is_graph_input() for i in zeros):
        return Match.fail("the initial state is a graph input")
    old = [node.inputs[i] for i in zeros]
    for i in zeros:
        node.replace_input_with(i, None)
    while node.inputs and node.inputs[-1] is None:  # trailing omitted inputs are dropped
        node.resize_inputs(len(node.inputs) - 1)
    remove_dead_producers(old)  # the run-time chain that built the zeros
    return Match.ok()


def where_never_equal(node: ir.Node, ctx: Context) -> Match:
    """Expand shape guard Where(Equal(s, -1), 1, s) removed (s provably >= 0)"""
    cond, a, s = node.inputs if len(node.inputs) == 3 else (None, None, None)
    equal = producer_op(cond, "Equal")
    if equal is None or s not in equal.inputs:
        return NO_MATCH
    c = constant(equal.inputs[1] if equal.inputs[0] is s else equal.inputs[0])
    if c is None or not np.all(c < 0):
        return NO_MATCH
    dims, a_shape = ctx.dims.get(s), ctx.dims.get(a)
    if a_shape is None or not broadcast_keeps(dims, list(c.shape)) or not broadcast_keeps(dims, list(a_shape)):
        return Match.fail("the condition or the other branch may broadcast s to a larger shape")
    if not nonnegative(s):
        return Match.fail("s is not provably >= 0")
    reason = substitute(node, present(s))
    if reason is None:
        remove_dead_producers([cond])
    return declined(reason)


def own_dim(part: ir.Value, x: ir.Value, ctx: Context) -> int | None:
    """i when ``part`` is the one-element vector [x.shape[i]]: ``Unsqueeze(Gather(Shape(x), i), 0)``
    or ``Gather(Shape(x), [i])`` with a constant i (a negative i only with x's rank known)."""
    unsq = producer_op(part, "Unsqueeze")
    gather = producer_op(unsq.inputs[0] if unsq is not None else part, "Gather")
    if gather is None or (unsq is not None and node_axes(unsq) not in ([0], [-1])):
        return None
    shape = producer_op(gather.inputs[0], "Shape")
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


def reshape_own_dims(node: ir.Node, ctx: Context) -> Match:
    """Reshape target entries read back from the data's own shape became 0 (copy)"""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return NO_MATCH
    allowzero = node.attributes.get("allowzero")
    concat = producer_op(node.inputs[1], "Concat")
    if concat is None or (allowzero is not None and allowzero.as_int()) or \
            ("axis" in concat.attributes and concat.attributes["axis"].as_int() not in (0, -1)):
        return NO_MATCH
    hits, position = [], 0
    for k, part in enumerate(concat.inputs):
        i = own_dim(part, present(node.inputs[0]), ctx) if part is not None else None
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
    if not only_use(present(node.inputs[1]), node):
        return Match.fail("the target has other users")
    zero = add_initializer(graph_of(node), ctx.names.value(f"{node.name or 'reshape'}_copy_dim"), np.array([0], np.int64))
    old = [concat.inputs[k] for k in hits]
    for k in hits:
        concat.replace_input_with(k, zero)
    remove_dead_producers(old)
    return Match.ok()

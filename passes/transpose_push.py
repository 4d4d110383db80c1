"""transpose-push: move Transposes down through layout-agnostic ops until they cancel or merge."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import NO_MATCH, FreshNames, Match, OptPass, add_initializer, constant, is_standard, node_axes, substitute
from onnxopt.passes import fold_shapes
from onnxopt.passes.fold_shapes import Expr

#: Rounds (each with fresh shapes) until one changes nothing: a pass must be idempotent.
MAX_ROUNDS = 8
#: ops a path may cross at most (a path that does not end at a Transpose is not taken)
MAX_PATH = 64

UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Neg", "Abs", "Exp", "Log", "Sqrt",
                   "Reciprocal", "Erf", "Gelu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Floor",
                   "Ceil", "Round", "Sign", "Not", "Cast", "Identity", "IsNaN", "IsInf", "Sin", "Cos", "ThresholdedRelu",
                   "Shrink", "Dropout", "Clip"})
#: elementwise ops with (multidirectional) broadcasting over all their inputs
BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal",
                       "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Where", "Mod", "PRelu", "BitShift",
                       "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
#: Reduce ops whose axes moved from an attribute to an input (opset 18; ReduceSum at 13)
_AXES_INPUT_SINCE = {op: (13 if op == "ReduceSum" else 18) for op in REDUCE}



def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


@dataclasses.dataclass
class Step:
    """How one op on the path is rewritten: ``apply(node, graph)`` makes it read the source layout;
    ``perm`` is the Transpose that then follows it (None: the layouts agree, no Transpose is needed)."""

    node: ir.Node
    perm: list[int] | None
    apply: Callable[[], None]
    dims: list[Expr] | None  # the op's output dims in the source layout (for the next step), when known


def _target(dims: fold_shapes.Aliased, reshape: ir.Node) -> list[Expr] | None:
    """A Reshape's target element by element (None when one is unknown, or is a copying 0 or -1)."""
    if len(reshape.inputs) < 2 or reshape.inputs[1] is None:
        return None
    sym = fold_shapes._sym(reshape.inputs[1], dims, {})
    if sym is None or sym.scalar or any(e is None or (not e[1] and e[0] <= 0) for e in sym.elems):
        return None
    return list(sym.elems)


@dataclasses.dataclass(frozen=True)
class Context:
    dims: fold_shapes.Aliased
    opset: int
    names: FreshNames


class TransposePush(OptPass):
    """Move Transposes down through layout-agnostic ops until they cancel, merge or vanish.

    A Transpose whose result has a single user is followed along a path of single-user ops it can
    cross: unary elementwise ops; broadcasting elementwise ops whose other inputs are constants (of at
    most its rank: they are transposed with the inverse permutation) or Transposes of the same
    permutation (each used only there: they merge); Concat (same condition on its other inputs; the
    axis is remapped); Pad, Tile and Resize with constant pads/repeats/scales or sizes (remapped; no
    ``axes``, no tf_crop_and_resize); Softmax/LogSoftmax/Hardmax (opset >= 13; axis remapped); Reduce*
    with constant non-empty axes (remapped; with keepdims=0 the Transpose after it loses the reduced
    axes and disappears when the rest keep their order: NHWC ``ReduceMean`` over H, W); Unsqueeze with
    constant axes (the new axes go last in the source layout); Reshape that only merges dims, each
    group of merged dims provably consecutive in the source layout too (dims and target known as
    products of symbols from onnxopt.shapes and fold-shapes' evaluation; the target is reordered with
    a Gather, or as a constant).  The path is taken only when it ends at another Transpose (the two
    merge; inverse permutations cancel) or where the Transpose vanishes, so the number of Transposes
    never grows; values that are graph outputs are never crossed (the interface keeps its layout).
    Each crossing is exact (a permutation of the same elements), so outputs are bit-identical.
    A run-time Reshape target is reordered with a Gather and the Reshape gets allowzero=1 (each
    element is its merged dims' product, so a 0 there is a literal 0): the result differs from the
    original's copy-a-dim reading of a 0 only in runs where two or more dims are 0 (then the
    original's own output shape is not the merged one).
    Standard domain only; recurses into subgraphs.  Rounds repeat (with fresh shapes) until one
    changes nothing, so a second run is a no-op.  Cost: per round one shape inference plus
    O(Transposes x MAX_PATH).
    """

    name = "transpose-push"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        for _ in range(MAX_ROUNDS):
            before = sum(changed.values())
            skipped.clear()
            ctx = Context(fold_shapes.Aliased(shape_inference.infer(model), model), model.opset_imports.get("", 1), names)
            for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
                if node.graph is None or node.op_type != "Transpose" or not is_standard(node):
                    continue
                _push(node, ctx).tally(changed, skipped, "Transpose moved down until it cancelled, merged or vanished")
            if sum(changed.values()) == before:
                break
        return self.result(model, changed, skipped)


# ---------------------------------------------------------------- the path

def _perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _push(t: ir.Node, ctx: Context) -> Match:
    perm = _perm(t)
    if perm is None or sorted(perm) != list(range(len(perm))):
        return NO_MATCH
    x = t.inputs[0]
    src = ctx.dims.dims(x)
    dims = None if src is None else src
    steps: list[Step] = []
    value, cur = t.outputs[0], perm
    end: ir.Node | None = None
    for _ in range(MAX_PATH):
        if value.is_graph_output() or len(value.uses()) != 1:
            break
        use = next(iter(value.uses()))
        user, index = use.node, use.idx
        if not is_standard(user) or user.graph is not t.graph:
            break
        if user.op_type == "Transpose" and _perm(user) is not None and len(_perm(user)) == len(cur):
            end = user
            break
        step = _plan(user, index, cur, dims, ctx)
        if isinstance(step, str):
            if steps or user.op_type in _CROSSABLE:
                return Match.fail(step)
            return NO_MATCH
        if step.perm is not None and any(o.is_graph_output() for o in user.outputs):
            return Match.fail("a graph output on the path (the interface keeps its layout)")
        steps.append(step)
        if step.perm is None:
            break
        value, cur, dims = user.outputs[0], step.perm, step.dims
    else:
        return Match.fail("the path is too long")
    if end is None and (not steps or steps[-1].perm is not None):
        return NO_MATCH if not steps else Match.fail("the path ends at neither a Transpose nor an op that drops it")
    # every crossing below is exact on its own: apply them in order, moving the Transpose down
    current = t
    for step in steps:
        for i, v in enumerate(step.node.inputs):
            if v is current.outputs[0]:
                step.node.replace_input_with(i, current.inputs[0])
        step.apply()
        current = _move_below(current, step, ctx)
    if end is not None and current is not None:
        _merge(current, end)
    return Match.ok()


def _move_below(t: ir.Node, step: Step, ctx: Context) -> ir.Node | None:
    """After ``step`` made its node read t's input: drop t and put the step's Transpose after the node."""
    node, graph = step.node, step.node.graph
    if t.graph is not None and not t.outputs[0].uses():
        t.graph.remove(t, safe=True)
    if step.perm is None:
        return None
    out = node.outputs[0]
    uses = list(out.uses())
    new = ir.Node("", "Transpose", [out], attributes=[ir.AttrInt64s("perm", step.perm)],
                  name=ctx.names.node(f"{node.name or 'node'}_transposed"), num_outputs=1)
    new.outputs[0].name = ctx.names.value(f"{out.name or 'value'}_transposed")
    graph.insert_after(node, new)
    for use in uses:
        use.node.replace_input_with(use.idx, new.outputs[0])
    out.shape = None  # the node's result is in the source layout now
    return new


def _merge(t: ir.Node, end: ir.Node) -> None:
    p1, p2 = _perm(t), _perm(end)
    combined = [p1[p] for p in p2]
    end.replace_input_with(0, t.inputs[0])
    end.attributes["perm"] = ir.AttrInt64s("perm", combined)
    if not t.outputs[0].uses():
        t.graph.remove(t, safe=True)
    if combined == list(range(len(combined))):
        substitute(end, end.inputs[0])  # declined (a graph output fed by a graph input): an identity Transpose stays


# ---------------------------------------------------------------- the crossings

_CROSSABLE = UNARY | BROADCAST | REDUCE | {"Concat", "Pad", "Tile", "Resize", "Softmax", "LogSoftmax", "Hardmax",
                                           "Unsqueeze", "Reshape"}


def _new_const(node: ir.Node, ctx: Context, what: str, array: np.ndarray) -> ir.Value:
    return add_initializer(node.graph, ctx.names.value(f"{node.name or node.op_type}_{what}"), array)


def _transposed_operand(v: ir.Value, perm: list[int]) -> tuple[str, object] | None:
    """How another input of a broadcasting op crosses: ("same", producer Transpose) or ("const", array)."""
    producer = v.producer()
    if producer is not None and producer.op_type == "Transpose" and is_standard(producer) and _perm(producer) == perm \
            and len(v.uses()) == 1 and not v.is_graph_output():
        return "same", producer
    arr = constant(v)
    if arr is not None and arr.ndim <= len(perm):
        padded = arr.reshape((1,) * (len(perm) - arr.ndim) + arr.shape)
        return "const", np.ascontiguousarray(np.transpose(padded, _inverse(perm)))
    return None


def _plan(node: ir.Node, index: int, perm: list[int], dims: list[Expr] | None, ctx: Context) -> Step | str:
    """The crossing of ``node`` by a Transpose ``perm`` feeding its input ``index``, or why it cannot."""
    op, rank = node.op_type, len(perm)
    if len(node.outputs) != 1 and op != "Dropout":
        return "several outputs"
    if op == "Dropout" and (len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output())):
        return "Dropout's mask is used"
    if op in UNARY:
        if index != 0:
            return "the Transpose feeds an argument"
        return Step(node, perm, lambda: None, dims)
    if op in BROADCAST or op == "Concat":
        return _plan_multi(node, index, perm, ctx)
    if index != 0:
        return "the Transpose feeds an argument"
    if op == "Pad":
        return _plan_pad(node, perm, dims, ctx)
    if op == "Tile":
        reps = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if reps is None or reps.size != rank:
            return "Tile repeats are not constant"
        new = np.array([int(reps.reshape(-1)[_inverse(perm)[k]]) for k in range(rank)], np.int64)
        out = None if dims is None else [fold_shapes._mul(d, fold_shapes._const(int(r))) for d, r in zip(dims, new)]
        return Step(node, perm, lambda: node.replace_input_with(1, _new_const(node, ctx, "repeats", new)), out)
    if op == "Resize":
        return _plan_resize(node, perm, ctx)
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        if ctx.opset < 13:
            return "Softmax before opset 13 flattens the trailing axes"
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        axis = perm[axis % rank]
        return Step(node, perm, lambda: node.attributes.__setitem__("axis", ir.AttrInt64("axis", axis)), dims)
    if op in REDUCE:
        return _plan_reduce(node, perm, dims, ctx)
    if op == "Unsqueeze":
        return _plan_unsqueeze(node, perm, dims, ctx)
    if op == "Reshape":
        return _plan_reshape(node, perm, dims, ctx)
    return f"{op} is not layout-agnostic"


def _plan_multi(node: ir.Node, index: int, perm: list[int], ctx: Context) -> Step | str:
    rank = len(perm)
    plans: list[tuple[int, tuple[str, object]]] = []
    for i, v in enumerate(node.inputs):
        if v is None:
            return "an omitted input"
        if i == index:
            continue  # the input the Transpose being moved feeds
        how = _transposed_operand(v, perm)
        if how is None:
            return "another input is neither a constant nor a Transpose of the same permutation used only here"
        if node.op_type == "Concat" and how[0] == "const" and np.asarray(constant(v)).ndim != rank:
            return "a constant Concat input of another rank"
        plans.append((i, how))
    if node.op_type == "Concat":
        axis = node.attributes["axis"].as_int()
        if not -rank <= axis < rank:
            return "Concat axis out of range"
        new_axis = perm[axis % rank]
    seen: set = set()

    def apply() -> None:
        for i, (kind, obj) in plans:
            if kind == "same":
                if obj is not node.inputs[i].producer() or id(obj) in seen:
                    continue
                node.replace_input_with(i, obj.inputs[0])
                if not obj.outputs[0].uses():
                    obj.graph.remove(obj, safe=True)
                seen.add(id(obj))
            else:
                node.replace_input_with(i, _new_const(node, ctx, f"in{i}_transposed", np.asarray(obj)))
        if node.op_type == "Concat":
            node.attributes["axis"] = ir.AttrInt64("axis", new_axis)
    return Step(node, perm, apply, None)


def _plan_pad(node: ir.Node, perm: list[int], dims, ctx: Context) -> Step | str:
    rank = len(perm)
    if "pads" in node.attributes:
        return "Pad before opset 11 (pads attribute)"
    pads = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None or pads.size != 2 * rank:
        return "Pad pads are not constant"
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
        return "Pad value is not constant"
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return "Pad with axes"
    pads = [int(p) for p in pads.reshape(-1)]
    inv = _inverse(perm)
    new = np.array([pads[inv[k]] for k in range(rank)] + [pads[rank + inv[k]] for k in range(rank)], np.int64)
    return Step(node, perm, lambda: node.replace_input_with(1, _new_const(node, ctx, "pads", new)), None)


def _plan_resize(node: ir.Node, perm: list[int], ctx: Context) -> Step | str:
    rank = len(perm)
    if ctx.opset < 11:
        return "Resize before opset 11"
    if "axes" in node.attributes:
        return "Resize with axes"
    mode = node.attributes.get("coordinate_transformation_mode")
    if mode is not None and mode.as_string() == "tf_crop_and_resize":
        return "tf_crop_and_resize reads roi"
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    inv = _inverse(perm)
    changes = []
    for i, what in ((2, "scales"), (3, "sizes")):
        v = inputs[i]
        if v is None:
            continue
        arr = constant(v)
        if arr is None:
            return f"Resize {what} are not constant"
        if arr.size == 0:
            continue
        if arr.size != rank:
            return f"Resize {what} of another rank"
        changes.append((i, what, np.ascontiguousarray(arr.reshape(-1)[inv])))

    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "nearest":
        # ORT interpolates linearly/cubically only over the innermost (or the middle) two of 4 axes:
        # keep the source layout's resized axes to the innermost two
        moved = {k for _, what, arr in changes for k in range(rank)
                 if (what == "scales" and float(arr[k]) != 1.0) or what == "sizes"}
        if not moved <= {rank - 2, rank - 1} or any(what == "sizes" for _, what, _ in changes):
            return "a linear/cubic Resize whose resized axes would not be the innermost two"

    def apply() -> None:
        for i, what, arr in changes:
            node.replace_input_with(i, _new_const(node, ctx, what, arr))
    return Step(node, perm, apply, None)


def _plan_reduce(node: ir.Node, perm: list[int], dims, ctx: Context) -> Step | str:
    rank = len(perm)
    axes_input = ctx.opset >= _AXES_INPUT_SINCE[node.op_type]
    axes = node_axes(node)
    if axes is None or not axes:
        return "Reduce axes are not constant (or reduce all)"
    if any(not -rank <= a < rank for a in axes):
        return "Reduce axis out of range"
    axes = sorted({a % rank for a in axes})
    new_axes = sorted(perm[a] for a in axes)
    keep = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
    if keep:
        new_perm: list[int] | None = perm
        out = None if dims is None else [fold_shapes._const(1) if k in new_axes else d for k, d in enumerate(dims)]
    else:
        rest = [perm[i] for i in range(rank) if i not in axes]  # source axes left, in the moved layout's order
        order = sorted(rest)
        new_perm = [order.index(s) for s in rest]
        out = None if dims is None else [d for k, d in enumerate(dims) if k not in new_axes]
        if new_perm == list(range(len(new_perm))):
            new_perm = None

    def apply() -> None:
        if axes_input:
            node.replace_input_with(1, _new_const(node, ctx, "axes", np.array(new_axes, np.int64)))
        else:
            node.attributes["axes"] = ir.AttrInt64s("axes", new_axes)
    if new_perm is not None and not new_perm:
        new_perm = None
    return Step(node, new_perm, apply, out)


def _plan_unsqueeze(node: ir.Node, perm: list[int], dims, ctx: Context) -> Step | str:
    rank = len(perm)
    axes = node_axes(node)
    if axes is None:
        return "Unsqueeze axes are not constant"
    out_rank = rank + len(axes)
    if any(not -out_rank <= a < out_rank for a in axes) or len({a % out_rank for a in axes}) != len(axes):
        return "Unsqueeze axes out of range or repeated"
    inserted = sorted(a % out_rank for a in axes)
    # the new axes go after the source's last axis; the moved layout takes them where they were asked
    new_perm, k = [], 0
    for j in range(out_rank):
        if j in inserted:
            new_perm.append(rank + inserted.index(j))
        else:
            new_perm.append(perm[k])
            k += 1
    new_axes = list(range(rank, out_rank))
    out = None if dims is None else list(dims) + [fold_shapes._const(1)] * len(axes)

    def apply() -> None:
        if ctx.opset >= 13:
            node.replace_input_with(1, _new_const(node, ctx, "axes", np.array(new_axes, np.int64)))
        else:
            node.attributes["axes"] = ir.AttrInt64s("axes", new_axes)
    return Step(node, new_perm, apply, out)


def _plan_reshape(node: ir.Node, perm: list[int], dims, ctx: Context) -> Step | str:
    """Reshape(T(x), t) -> T'(Reshape(x, t')) when t only merges runs of T(x)'s dims that are runs of
    x's dims in the same order."""
    if dims is None:
        return "the source dims are unknown"
    allowzero = node.attributes.get("allowzero")
    moved = [dims[p] for p in perm]  # T(x)'s dims
    target = _target(ctx.dims, node)
    const = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    copies = not (allowzero is not None and allowzero.as_int())
    if target is None:
        if const is None or np.count_nonzero(const == -1) > 1 or np.any(const < -1):
            return "the Reshape target is not known element by element"
        target = _resolve_target([int(t) for t in const.reshape(-1)], moved, copies)
        if target is None:
            return "the Reshape target's -1 or copied dims are not provably products of the input's dims"
    groups = _merge_groups(moved, target)
    if groups is None:
        return "the Reshape does not provably only merge dims"
    # dims of 1 hold no layout: the other (real) dims of each group must be a run, in order, of the
    # source's real dims; the groups then go in the order of their first real dim (groups of 1s
    # right after the group before them)
    ones = {i for i, d in enumerate(dims) if d == (1, ())}
    position = {a: k for k, a in enumerate(i for i in range(len(dims)) if i not in ones)}
    keys: list[tuple[int, int]] = []
    for g in groups:
        real = [position[perm[i]] for i in g if perm[i] not in ones]
        if real and real != list(range(real[0], real[0] + len(real))):
            return "merged dims are not consecutive in the source layout"
        keys.append((real[0], 0) if real else (keys[-1][0], keys[-1][1] + 1) if keys else (-1, 0))
    order = sorted(range(len(groups)), key=lambda k: (keys[k], k))  # output groups in source order
    new_perm = _inverse(order)  # moved-layout output k is the source-layout output where group k went
    out = [target[k] for k in order]
    t = node.inputs[1]
    if const is not None:
        arr = _reordered_target([int(v) for v in const.reshape(-1)], order, out, dims, copies)
        if arr is None:
            return "a copied dim of the Reshape target moves to another position"
    elif ctx.opset < 14:
        return "a run-time Reshape target before opset 14 (no allowzero)"

    def apply() -> None:
        if const is not None:
            node.replace_input_with(1, _new_const(node, ctx, "shape", arr))
            return
        index = _new_const(node, ctx, "shape_order", np.array(order, np.int64))
        gather = ir.Node("", "Gather", [t, index], attributes=[ir.AttrInt64("axis", 0)],
                         name=ctx.names.node(f"{node.name or 'reshape'}_shape_order"), num_outputs=1)
        gather.outputs[0].name = ctx.names.value(f"{t.name or 'shape'}_reordered")
        node.graph.insert_before(node, gather)
        node.replace_input_with(1, gather.outputs[0])
        # each element is its merged dims' product: a 0 is a literal 0 (its copy would read another dim)
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)
    if new_perm == list(range(len(new_perm))):
        return Step(node, None, apply, out)
    return Step(node, new_perm, apply, out)


def _div(a: Expr, b: Expr) -> Expr:
    """a / b for products of symbols, when exact (b's coefficient divides a's, b's symbols are a's)."""
    if a is None or b is None or b[0] == 0 or a[0] % b[0]:
        return None
    rest = list(a[1])
    for s in b[1]:
        if s not in rest:
            return None
        rest.remove(s)
    return (a[0] // b[0], tuple(rest))


def _resolve_target(target: list[int], moved: list[Expr], copies: bool) -> list[Expr] | None:
    """A constant target as Exprs: a 0 copies the input dim at its position (unless allowzero), the
    one -1 is the element count divided by the others'."""
    exprs: list[Expr] = []
    for i, t in enumerate(target):
        if t == 0 and copies:
            exprs.append(moved[i] if i < len(moved) else None)
        else:
            exprs.append(fold_shapes._const(t))
    if any(e is None for e in exprs) or any(e is None for e in moved):
        return None
    if -1 in target:
        total, rest = (1, ()), (1, ())
        for e in moved:
            total = fold_shapes._mul(total, e)
        for t, e in zip(target, exprs):
            if t != -1:
                rest = fold_shapes._mul(rest, e)
        exprs[target.index(-1)] = _div(total, rest)
    return None if any(e is None for e in exprs) else exprs


def _reordered_target(target: list[int], order: list[int], out: list[Expr], dims: list[Expr], copies: bool) -> np.ndarray | None:
    """The constant target in the source layout's order: literals and the -1 move along; a copying 0
    stays a 0 only where the source input has the same dim at its new position, else it becomes the
    -1 when there is none yet."""
    new, minus = [], -1 in target
    for m, k in enumerate(order):
        t = target[k]
        if t == 0 and copies and not (m < len(dims) and dims[m] == out[m]):
            if minus:
                return None
            t, minus = -1, True
        new.append(t)
    return np.array(new, np.int64)


def _merge_groups(moved: list[Expr], target: list[Expr]) -> list[list[int]] | None:
    """Runs of ``moved`` whose products are the target's elements, in order (each run non-empty;
    dims of 1 join the run before them, or the next one at the start), or None."""
    if any(e is None for e in moved) or any(e is None for e in target):
        return None
    groups: list[list[int]] = []
    i = 0
    for k, want in enumerate(target):
        run: list[int] = []
        prod: Expr = (1, ())
        while i < len(moved) and (not run or prod != want):
            run.append(i)
            prod = fold_shapes._mul(prod, moved[i])
            i += 1
            if prod == want and (i >= len(moved) or moved[i] != (1, ()) or k == len(target) - 1):
                break
        if prod != want or not run:
            return None
        groups.append(run)
    while i < len(moved) and moved[i] == (1, ()) and groups:  # trailing dims of 1 join the last run
        groups[-1].append(i)
        i += 1
    return groups if i == len(moved) else None

"""fold-shapes: evaluate Shape->Gather/Slice->Unsqueeze->Concat chains symbolically."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt import shapes as shape_inference
from onnxopt.base import (
    NO_MATCH,
    Match,
    OptPass,
    add_initializer,
    is_constant,
    is_standard,
    node_axes,
    remove_dead_producers,
    replace_with_initializer,
)

# A shape element: coef * product(symbols), e.g. (4, ("batch",)) is 4*batch; None is unknown.
Expr = tuple[int, tuple[str, ...]] | None
_INT_TYPES = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32}
#: Rounds (each with fresh shapes) until one changes nothing: a pass must be idempotent.
MAX_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class SymValue:
    """A small integer tensor (scalar or 1-D) whose elements are known symbolically."""

    elems: tuple[Expr, ...]
    scalar: bool
    dtype: ir.DataType = ir.DataType.INT64

    @property
    def constant(self) -> bool:
        return all(e is not None and not e[1] for e in self.elems)

    def array(self) -> np.ndarray:
        arr = np.array([e[0] for e in self.elems], dtype=_INT_TYPES[self.dtype])
        return arr.reshape(()) if self.scalar else arr


def _const(c: int) -> Expr:
    return (int(c), ())


def _mul(a: Expr, b: Expr) -> Expr:
    if a is None or b is None:
        return None
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def _binary(op: str, a: Expr, b: Expr) -> Expr:
    if op == "Mul":
        return _mul(a, b)
    if a is None or b is None:
        return None
    if op in ("Add", "Sub") and a[1] == b[1] and (not a[1] or (op == "Sub" and a[0] == b[0])):
        coef = a[0] + b[0] if op == "Add" else a[0] - b[0]
        return (coef, a[1]) if coef else (0, ())
    if op == "Div" and not b[1] and b[0] != 0 and a[0] % b[0] == 0:
        return (a[0] // b[0], a[1])
    if op in ("Max", "Min") and not a[1] and not b[1]:
        return _const(max(a[0], b[0]) if op == "Max" else min(a[0], b[0]))
    return None


class FoldShapes(OptPass):
    """Fold shape computations using symbolic dims; rewrite dynamic Reshape targets to constants.

    Shapes come from onnx inference with declared intermediate and output shapes ignored (see
    onnxopt.shapes).  A small integer tensor computed from Shape by Gather/Slice/Concat/
    Unsqueeze/Squeeze/Reshape/Cast/Identity/Add/Sub/Mul/Div/Max/Min is tracked element by
    element as a product of an integer and symbolic dims.  Rewrites: (1) such a tensor that is
    fully static becomes an initializer; (2) ``Reshape(data, shape)`` whose shape is known
    symbolically gets a constant shape where every element is a number, ``0`` (copy data's dim at
    that position, when it is provably the same dim) or a single ``-1`` (the one element not
    otherwise expressible); ``allowzero=1`` becomes 0 only when no literal zero remains.
    Declines (with a reason) when more than one element is unknown.  Nodes reading values that are
    graph outputs are handled the same way, but graph outputs themselves are never replaced.
    Recurses into subgraphs (names from outer scopes resolve through the same table).
    Nodes a fold leaves without users are removed.  Rounds repeat (with fresh shapes) until one
    changes nothing, so a second run is a no-op.
    Contract: outputs bit-identical.  Cost: per round one shape inference plus O(nodes); at most
    MAX_ROUNDS rounds (in practice 1-2).
    """

    name = "fold-shapes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        for _ in range(MAX_ROUNDS):  # a folded value can make a later shape provable (TopK k, ...)
            before = sum(changed.values())
            skipped.clear()  # the last round's declines are the ones that stand
            self._round(model, changed, skipped)
            if sum(changed.values()) == before:
                break
        return self.result(model, changed, skipped)

    def _round(self, model: ir.Model, changed: collections.Counter, skipped: collections.Counter) -> None:
        dims = Aliased(shape_inference.infer(model), model, reshapes=False)
        syms: dict[int, SymValue | None] = {}
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.graph is None or not is_standard(node):
                continue
            if node.op_type == "Reshape":
                self._reshape(node, dims, syms).tally(changed, skipped, "Reshape shape made constant", "Reshape kept")
                continue
            if len(node.outputs) != 1 or node.outputs[0].is_graph_output():
                continue
            value = _evaluate(node, dims, syms)
            if value is None or not value.constant or node.op_type == "Constant":
                continue
            if all(v is not None and v.const_value is not None for v in node.inputs):
                continue  # all-constant: fold-constants' job (and its size guard)
            new = replace_with_initializer(node.outputs[0], value.array())
            inputs = list(node.inputs)
            node.graph.remove(node, safe=True)
            remove_dead_producers(inputs)  # e.g. the Shape chain nobody reads now (ORT would still run it)
            syms[id(new)] = value
            changed[f"{node.op_type} folded to a constant"] += 1

    def _reshape(self, node: ir.Node, dims: Aliased, syms: dict) -> Match:
        if len(node.inputs) < 2 or node.inputs[1] is None or is_constant(node.inputs[1]):
            return NO_MATCH
        target = _sym(node.inputs[1], dims, syms)
        if target is None or target.scalar:
            return Match.fail("target shape not known symbolically")
        data_dims = dims.get(node.inputs[0])
        data_syms = [_resolved(dims, node.inputs[0], i, d) for i, d in enumerate(data_dims)] if data_dims else []
        # the same comparison on the names as inferred: a dim matches when either form does (both are facts)
        raw = _sym(node.inputs[1], dims.table, {}) if isinstance(dims, Aliased) else None
        raw_elems = raw.elems if raw is not None and len(raw.elems) == len(target.elems) else (None,) * len(target.elems)
        data_raw = [_dim_expr(node.inputs[0], i, d) for i, d in enumerate(data_dims)] if data_dims else []
        allowzero_attr = node.attributes.get("allowzero")
        allowzero = allowzero_attr.as_int() if allowzero_attr is not None else 0
        new, unknown = [], 0
        for i, (e, r) in enumerate(zip(target.elems, raw_elems)):
            if (e is None or e[1]) and r is not None and not r[1]:
                e = r  # a literal in the inferred form
            if e is not None and not e[1]:
                if e[0] == 0 and allowzero:
                    return Match.fail("literal zero with allowzero=1")
                if e[0] == -1:
                    unknown += 1
                new.append(e[0])
            elif i < len(data_syms) and ((e is not None and e == data_syms[i]) or (r is not None and r == data_raw[i])):
                new.append(0)
            else:
                unknown += 1
                new.append(-1)
        if unknown > 1:
            return Match.fail("more than one dim unknown")
        shape_value = add_initializer(node.graph, f"{node.name or node.outputs[0].name}_shape",
                                      np.array(new, dtype=np.int64))
        node.replace_input_with(1, shape_value)
        if allowzero:
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        return Match.ok()


class Aliased:
    """onnxopt.shapes' dims, with the names onnx inference makes up for dims it cannot express
    resolved where they provably are a product of known dims: below a ``Tile`` with constant repeats
    (output dim = input dim x repeat; inference names ``N x 1`` anew) and (unless ``reshapes`` is
    False) a ``Reshape`` whose target is known element by element (output dim = target element, no
    0 or -1 in it, and a run-time 0 would copy an equal dim).  Built in graph
    order, each alias resolved when learnt (so chains are short and cannot cycle).  O(nodes)."""

    def __init__(self, table: shape_inference.Shapes, model: ir.Model | None = None, reshapes: bool = True):
        """``reshapes=False``: Tile aliases only.  fold-shapes uses that: a Reshape alias can make a
        target provable one round early with its -1 on a dim whose name inference would otherwise
        have carried on (BERT's ``[-1, 0, 64]`` instead of ``[0, -1, 64]`` lost ``batch`` downstream)."""
        self.table = table
        self.alias: dict[str, Expr] = {}
        if model is None:
            return
        syms: dict = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not is_standard(node) or node.op_type not in ("Tile", "Reshape") or len(node.inputs) < 2 or \
                    (node.op_type == "Reshape" and not reshapes):
                continue
            out = table.get(node.outputs[0])
            if out is None:
                continue
            exprs: list[Expr]
            if node.op_type == "Tile":
                reps, data = _const_ints(node.inputs[1]), table.get(node.inputs[0])
                if reps is None or data is None or not len(reps) == len(data) == len(out):
                    continue
                exprs = [_mul(_resolved(self, node.inputs[0], i, d), _const(r)) for i, (d, r) in enumerate(zip(data, reps))]
            else:
                target = _sym(node.inputs[1], self, syms)
                if target is None or target.scalar or len(target.elems) != len(out) or \
                        any(e is None or (not e[1] and e[0] <= 0) for e in target.elems):
                    continue
                exprs = list(target.elems)
                allowzero = node.attributes.get("allowzero")
                if not (allowzero is not None and allowzero.as_int()):
                    # a run-time 0 copies the data's dim: an element is its output dim in every run only
                    # when it is 0 exactly when that dim is (a nonzero multiple of it)
                    resolved = self.dims(node.inputs[0]) or []
                    exprs = [e if i < len(resolved) and _multiple(e, resolved[i]) else None for i, e in enumerate(exprs)]
            for name, e in zip(out, exprs):
                if isinstance(name, str) and name not in self.alias and e is not None:
                    e = self.resolve(e)
                    if e is not None and name not in e[1]:
                        self.alias[name] = e

    def get(self, value: ir.Value | None):
        return self.table.get(value)

    def dtype(self, value: ir.Value | None):
        return self.table.dtype(value)

    def resolve(self, e: Expr, depth: int = 8) -> Expr:
        if e is None or depth == 0 or not any(s in self.alias for s in e[1]):
            return e
        out: Expr = (e[0], ())
        for s in e[1]:
            out = _mul(out, self.resolve(self.alias[s], depth - 1) if s in self.alias else (1, (s,)))
        return out

    def dims(self, value: ir.Value | None) -> list[Expr] | None:
        """``value``'s dims as resolved Exprs (None when its rank is unknown)."""
        dims = self.get(value)
        return None if dims is None else [_resolved(self, value, i, d) for i, d in enumerate(dims)]


def _multiple(e: Expr, d: Expr) -> bool:
    """True when e = k * d for a nonzero integer k (both products of symbols)."""
    if e is None or d is None or d[0] == 0 or e[0] % d[0] or sorted(e[1]) != sorted(d[1]):
        return False
    return e[0] // d[0] != 0


def _resolved(dims, value: ir.Value, axis: int, d) -> Expr:
    e = _dim_expr(value, axis, d)
    return dims.resolve(e) if isinstance(dims, Aliased) else e


def _dim_expr(value: ir.Value, axis: int, d) -> Expr:
    if isinstance(d, int):
        return _const(d)
    if isinstance(d, str):
        return (1, (d,))
    return (1, (f"?{value.name}:{axis}",))  # unknown but stable: the same tensor's same axis


def _sym(value: ir.Value | None, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    if value is None:
        return None
    key = id(value)
    if key in syms:
        return syms[key]
    result = None
    tensor = value.const_value
    if is_constant(value):
        if tensor.dtype in _INT_TYPES and len(tensor.shape) <= 1 and tensor.size <= 64:
            arr = tensor.numpy()
            result = SymValue(tuple(_const(int(v)) for v in arr.reshape(-1)), arr.ndim == 0, tensor.dtype)
    elif tensor is None and value.producer() is not None and is_standard(value.producer()) and len(value.producer().outputs) == 1:
        result = _evaluate(value.producer(), dims, syms)
    syms[key] = result
    return result


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if not is_constant(value) or value.const_value.dtype not in _INT_TYPES:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _evaluate(node: ir.Node, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    """Symbolic value of node's single output, or None when not a tracked shape computation (each
    tracked op's semantics on SymValues, by kind: Shape, Identity/Cast, selections, reshapes, arithmetic)."""
    for evaluate in (_eval_shape, _eval_cast, _eval_select, _eval_reshape, _eval_arith):
        if node.op_type in _EVALUATES[evaluate]:
            return evaluate(node, list(node.inputs), dims, syms)
    return None


def _eval_shape(node: ir.Node, ins: list, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    op = node.op_type
    if op == "Shape":
        d = dims.get(ins[0])
        if d is None:
            return None
        start = node.attributes.get("start")
        end = node.attributes.get("end")
        rank = len(d)
        s = start.as_int() if start is not None else 0
        e = end.as_int() if end is not None else rank
        s, e = (s + rank if s < 0 else s), (e + rank if e < 0 else e)
        s, e = max(0, min(s, rank)), max(0, min(e, rank))
        return SymValue(tuple(_resolved(dims, ins[0], i, d[i]) for i in range(s, e)), False)
    return None


def _eval_cast(node: ir.Node, ins: list, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    op = node.op_type
    if op in ("Identity", "Cast"):
        src = _sym(ins[0], dims, syms)
        if src is None:
            return None
        if op == "Cast":
            to = ir.DataType(node.attributes["to"].as_int())
            if to not in _INT_TYPES:
                return None
            return SymValue(src.elems, src.scalar, to)
        return src
    return None


def _eval_select(node: ir.Node, ins: list, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    op = node.op_type
    if op == "Gather":
        data, idx = _sym(ins[0], dims, syms), ins[1]
        axis = node.attributes.get("axis")
        if data is None or data.scalar or (axis is not None and axis.as_int() not in (0, -1)):
            return None
        indices = _const_ints(idx)
        if indices is None:
            return None
        n = len(data.elems)
        try:
            picked = tuple(data.elems[i if i >= 0 else i + n] for i in indices)
        except IndexError:
            return None
        return SymValue(picked, len(idx.const_value.shape) == 0, data.dtype)
    if op == "Slice":
        data = _sym(ins[0], dims, syms)
        if data is None or data.scalar:
            return None
        starts, ends = _const_ints(ins[1]), _const_ints(ins[2])
        axes = _const_ints(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
        steps = _const_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
            return None
        return SymValue(tuple(data.elems[slice(starts[0], ends[0], steps[0])]), False, data.dtype)
    if op == "Concat":
        parts = [_sym(v, dims, syms) for v in ins]
        if any(p is None or p.scalar for p in parts):
            return None
        return SymValue(tuple(e for p in parts for e in p.elems), False, parts[0].dtype)
    return None


def _eval_reshape(node: ir.Node, ins: list, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    op = node.op_type
    if op == "Unsqueeze":
        src = _sym(ins[0], dims, syms)
        if src is None or not src.scalar or node_axes(node) not in ([0], [-1]):
            return None
        return SymValue(src.elems, False, src.dtype)
    if op == "Squeeze":
        src = _sym(ins[0], dims, syms)
        if src is None or src.scalar or len(src.elems) != 1:
            return None
        axes = node_axes(node)
        if axes not in (None, [0], [-1]):
            return None
        return SymValue(src.elems, True, src.dtype)
    if op == "Reshape":
        src, target = _sym(ins[0], dims, syms), _const_ints(ins[1])
        if src is None or target is None or len(src.elems) != 1:
            return None
        if target in ([-1], [1]):
            return SymValue(src.elems, False, src.dtype)
        if target == []:
            return SymValue(src.elems, True, src.dtype)
        return None
    return None


def _eval_arith(node: ir.Node, ins: list, dims: shape_inference.Shapes | Aliased, syms: dict) -> SymValue | None:
    op = node.op_type
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min") and len(ins) == 2:
        a, b = _sym(ins[0], dims, syms), _sym(ins[1], dims, syms)
        if a is None or b is None or a.dtype != b.dtype:
            return None
        la, lb = len(a.elems), len(b.elems)
        if (la != lb and 1 not in (la, lb)) or 0 in (la, lb):
            return None  # not broadcastable, or an empty vector (nothing worth tracking)
        n = max(la, lb)
        elems = tuple(_binary(op, a.elems[i if la > 1 else 0], b.elems[i if lb > 1 else 0]) for i in range(n))
        return SymValue(elems, a.scalar and b.scalar, a.dtype)
    return None


_EVALUATES = {_eval_shape: ("Shape",), _eval_cast: ("Identity", "Cast"), _eval_select: ("Gather", "Slice", "Concat"),
              _eval_reshape: ("Unsqueeze", "Squeeze", "Reshape"), _eval_arith: ("Add", "Sub", "Mul", "Div", "Max", "Min")}

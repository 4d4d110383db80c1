"""fuse-activations: decomposed GELU, HardSwish and LayerNorm back into their ONNX ops."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    FreshNames,
    OptPass,
    add_initializer,
    constant,
    is_constant,
    is_standard,
    node_axes,
    remove_dead_producers,
    substitute,
)

SQRT2 = float(np.sqrt(2.0))


class FuseActivations(OptPass):
    """Fuse exporter-decomposed GELU (erf form), HardSwish and LayerNorm into single ONNX ops.

    Patterns (constants compared within 1e-5 relative):
    - GELU, opset >= 20: ``0.5 * x * (1 + Erf(x / sqrt(2)))`` (or ``x * 0.7071...``, the 0.5
      applied to x or to the product) -> ``Gelu(x)``;
    - HardSwish, opset >= 14: ``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` and
      ``x * Clip(x + 3, 0, 6) / 6`` -> ``HardSwish(x)``;
    - LayerNorm, opset >= 17: ``ReduceMean -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div``
      over the last axis, optionally followed by ``Mul gamma`` and ``Add beta`` (constants) ->
      ``LayerNormalization(x, gamma, beta, axis=-1, epsilon)``.
    Check: every intermediate is used only inside the pattern and is not a graph output; reasons
    are recorded when a match fails late (e.g. opset too old).  SiLU (``x * Sigmoid(x)``) has no
    ONNX op below opset 24 and is left alone.  Outputs within float rounding.  Cost: O(nodes).
    """

    name = "fuse-activations"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        opset = model.opset_imports.get("", 1)
        names = FreshNames(model)
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.graph is None or not is_standard(node):
                continue
            for op, fuse, min_opset in ((("Erf",), _gelu, 20), (("HardSigmoid", "Clip"), _hardswish, 14),
                                        (("Sqrt",), _layernorm, 17)):
                if node.op_type not in op:
                    continue
                outcome = fuse(node)
                if outcome is None:
                    continue
                name, apply = outcome
                if opset < min_opset:
                    skipped[f"{name} pattern found but opset {opset} < {min_opset}"] += 1
                    continue
                reason = apply(names)
                if reason:
                    skipped[f"{name}: {reason}"] += 1
                else:
                    changed[f"{name} fused"] += 1
        return self.result(model, changed, skipped)


# ---------------------------------------------------------------- matching helpers

def _const_scalar(value: ir.Value | None) -> float | None:
    arr = constant(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-5 * max(1.0, abs(b))


def _single_user(value: ir.Value, op: str | tuple[str, ...]) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    user = next(iter(uses)).node
    ops = (op,) if isinstance(op, str) else op
    return user if user.op_type in ops and is_standard(user) else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    ins = list(node.inputs)
    if len(ins) != 2 or value not in ins:
        return None
    return ins[1] if ins[0] is value else ins[0]


def _replace(names: FreshNames, last: ir.Node, op: str, inputs: list, attrs: list | None = None) -> str | None:
    """Insert ``op(inputs)`` before ``last``, make it produce what ``last`` produced, and remove the
    pattern's now-dead nodes (a second run must not match the leftovers again)."""
    fused = ir.Node("", op, inputs, attributes=attrs or [], name=names.node((last.name or op) + "_fused"), num_outputs=1)
    last.graph.insert_before(last, fused)
    fused.outputs[0].name = names.value((last.outputs[0].name or op) + "_fused")
    pattern_inputs = list(last.inputs)
    reason = substitute(last, fused.outputs[0])
    if reason:
        last.graph.remove(fused, safe=True)
    else:
        remove_dead_producers(pattern_inputs)
    return reason


# ---------------------------------------------------------------- patterns

def _gelu(erf: ir.Node):
    pre = erf.inputs[0].producer() if erf.inputs[0] is not None else None
    if pre is None or pre.op_type not in ("Div", "Mul") or not is_standard(pre):
        return None
    x, c = pre.inputs
    scale = _const_scalar(c)
    if not (_close(scale, SQRT2) if pre.op_type == "Div" else _close(scale, 1 / SQRT2)):
        return None
    add = _single_user(erf.outputs[0], "Add")
    if add is None or not _close(_const_scalar(_other(add, erf.outputs[0])), 1.0):
        return None
    mul = _single_user(add.outputs[0], "Mul")
    if mul is None:
        return None
    partner = _other(mul, add.outputs[0])
    if partner is x:  # 0.5 applied after: Mul(Mul(x, 1+erf), 0.5)
        last = _single_user(mul.outputs[0], "Mul")
        if last is None or not _close(_const_scalar(_other(last, mul.outputs[0])), 0.5):
            return None
    else:  # 0.5 applied to x first: Mul(Mul(x, 0.5), 1+erf)
        half = partner.producer() if partner is not None else None
        if half is None or half.op_type != "Mul" or _other(half, x) is None \
                or not _close(_const_scalar(_other(half, x)), 0.5) or len(partner.uses()) != 1:
            return None
        last = mul
    return "GELU", lambda names: _replace(names, last, "Gelu", [x])


def _hardswish(node: ir.Node):
    if node.op_type == "HardSigmoid":
        x = node.inputs[0]
        alpha, beta = node.attributes.get("alpha"), node.attributes.get("beta")
        if alpha is None or beta is None or not _close(alpha.as_float(), 1 / 6) or not _close(beta.as_float(), 0.5):
            return None
        mul = _single_user(node.outputs[0], "Mul")
        if mul is None or _other(mul, node.outputs[0]) is not x:
            return None
        return "HardSwish", lambda names: _replace(names, mul, "HardSwish", [x])
    # Clip(x + 3, 0, 6): opset >= 11 gives min/max as inputs
    add = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or len(node.inputs) < 3:
        return None
    lo, hi = _const_scalar(node.inputs[1]), _const_scalar(node.inputs[2])
    x = next((v for v in add.inputs if _const_scalar(v) is None), None)
    if x is None or not _close(_const_scalar(_other(add, x)), 3.0) or not _close(lo, 0.0) or not _close(hi, 6.0):
        return None
    mul = _single_user(node.outputs[0], "Mul")
    if mul is None or _other(mul, node.outputs[0]) is not x:
        return None
    div = _single_user(mul.outputs[0], "Div")
    if div is None or div.inputs[0] is not mul.outputs[0] or not _close(_const_scalar(div.inputs[1]), 6.0):
        return None
    return "HardSwish", lambda names: _replace(names, div, "HardSwish", [x])


def _last_axis_mean(node: ir.Node | None) -> ir.Value | None:
    """The input of ReduceMean over the last axis with keepdims, else None."""
    if node is None or node.op_type != "ReduceMean" or not is_standard(node):
        return None
    keep = node.attributes.get("keepdims")
    if keep is not None and keep.as_int() == 0:
        return None
    return node.inputs[0] if node_axes(node) == [-1] else None


def _layernorm(sqrt: ir.Node):
    add_eps = sqrt.inputs[0].producer()
    if add_eps is None or add_eps.op_type != "Add":
        return None
    var_node = next((v.producer() for v in add_eps.inputs if v is not None and v.producer() is not None), None)
    eps = next((_const_scalar(v) for v in add_eps.inputs if _const_scalar(v) is not None), None)
    pow_out = _last_axis_mean(var_node)
    pow_node = pow_out.producer() if pow_out is not None else None
    if eps is None or pow_node is None or pow_node.op_type != "Pow" or not _close(_const_scalar(pow_node.inputs[1]), 2.0):
        return None
    sub = pow_node.inputs[0].producer()
    if sub is None or sub.op_type != "Sub":
        return None
    x, mean = sub.inputs
    if mean is None or _last_axis_mean(mean.producer()) is not x:
        return None
    div = _single_user(sqrt.outputs[0], "Div")
    if div is None or div.inputs[0] is not sub.outputs[0] or len(sub.outputs[0].uses()) != 2:
        return None
    last, gamma, beta = div, None, None
    mul = _single_user(div.outputs[0], "Mul")
    if mul is not None and is_constant(g := _other(mul, div.outputs[0])):
        last, gamma = mul, g
        add = _single_user(mul.outputs[0], "Add")
        if add is not None and is_constant(b := _other(add, mul.outputs[0])):
            last, beta = add, b

    def apply(names: FreshNames):
        dtype = x.dtype or (gamma.const_value.dtype if gamma is not None else None)
        if dtype is None:
            return "input dtype unknown"
        graph = last.graph
        width = None
        for p in (gamma, beta):
            if p is not None and len(p.const_value.shape) != 1:
                return "gamma/beta are not 1-D"
            if p is not None:
                width = p.const_value.shape[0]
        if width is None:
            return "needs gamma to know the normalized width"
        np_dtype = dtype.numpy()
        g = gamma if gamma is not None else add_initializer(graph, "ln_gamma", np.ones(width, np_dtype))
        b = beta if beta is not None else add_initializer(graph, "ln_beta", np.zeros(width, np_dtype))
        return _replace(names, last, "LayerNormalization", [x, g, b],
                        [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", float(eps))])
    return "LayerNorm", apply

"""The transformer fusion rules of our own that ``fuse-transformer`` (onnxopt.passes.fuse_transformer)
applies beside the ORT/onnxscript fusion engines: FastGelu (the tanh GELU), SimplifiedLayerNormalization
(RMSNorm, TorchScript's opset-17 form and the scale-less form after simplify) and RotaryEmbedding
(transformers 5's Mul-form angles, caches computed in the graph).  Each rule is a function of a
node and its graph returning a ``Match`` (declined with a reason unless it holds for every shape)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    NO_MATCH,
    Match,
    add_initializer,
    constant,
    is_constant,
    node_axes,
    nonnegative,
    present,
    remove_dead_producers,
    substitute,
    tensor_of,
)

_TANH_GELU = (0.5, math.sqrt(2.0 / math.pi), 0.044715)  # 0.5 x (1 + tanh(c (x + k x^3)))


def _factors(value: ir.Value, top: bool = True) -> list[ir.Value]:
    """The operands of a product tree of Mul nodes ending at ``value`` (inner products single-use)."""
    node = value.producer()
    if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or (not top and len(value.uses()) != 1):
        return [value]
    return [f for v in node.inputs for f in _factors(present(v), top=False)]


def _split_constants(values: list[ir.Value]) -> tuple[float | None, list[ir.Value]]:
    """(product of the scalar constants, the other values); None when a constant is not a scalar."""
    product, rest = 1.0, []
    for v in values:
        arr = tensor_of(v).numpy() if is_constant(v) else None
        if arr is None:
            rest.append(v)
        elif arr.size != 1:
            return None, rest
        else:
            product *= float(arr.reshape(-1)[0])
    return product, rest


def _single_use_producer(value: ir.Value, op: str) -> ir.Node | None:
    node = value.producer()
    ok = node is not None and node.op_type == op and node.domain in ("", "ai.onnx")
    return node if ok and len(value.uses()) == 1 and not value.is_graph_output() else None


def _add_operands(node: ir.Node | None, wanted_constant: float | None) -> list[ir.Value] | None:
    """An Add's inputs; with ``wanted_constant``, the non-constant one after checking the other."""
    if node is None or len(node.inputs) != 2:
        return None
    if wanted_constant is None:
        return [present(v) for v in node.inputs]
    scale, rest = _split_constants([present(v) for v in node.inputs])
    return rest if scale is not None and len(rest) == 1 and math.isclose(scale, wanted_constant, rel_tol=1e-4) else None


def fuse_fast_gelu(node: ir.Node, graph: ir.Graph) -> Match:
    """Pattern: the tanh GELU ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` in any
    association of its products and sums (HF GPT-2's ``gelu_new``; onnxscript 0.7's rule matches
    one order only), cubes as ``Pow(x, 3)``.  Check: the constants within 1e-4 relative, every
    intermediate used once, x float.  Rewrite: com.microsoft ``FastGelu(x)``."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return NO_MATCH
    half, rest = _split_constants(_factors(node.outputs[0]))
    if half is None or len(rest) != 2 or not math.isclose(half, _TANH_GELU[0], rel_tol=1e-4):
        return NO_MATCH
    for x, s in (rest, rest[::-1]):
        one_plus = _add_operands(_single_use_producer(s, "Add"), 1.0)
        tanh = _single_use_producer(one_plus[0], "Tanh") if one_plus else None
        if tanh is None:
            continue
        scale, inner = _split_constants(_factors(present(tanh.inputs[0]), top=False))
        if scale is None or len(inner) != 1 or not math.isclose(scale, _TANH_GELU[1], rel_tol=1e-4):
            return Match.fail("tanh argument is not sqrt(2/pi) * (...)")
        terms = _add_operands(_single_use_producer(inner[0], "Add"), None)
        if terms is None or x not in terms:
            return Match.fail("tanh argument is not x + k x^3")
        k, cube = _split_constants(_factors(terms[1] if terms[0] is x else terms[0], top=False))
        power = _single_use_producer(cube[0], "Pow") if len(cube) == 1 else None
        exponent = tensor_of(power.inputs[1]).numpy() if power is not None and is_constant(power.inputs[1]) else None
        if (k is None or not math.isclose(k, _TANH_GELU[2], rel_tol=1e-4) or power is None or power.inputs[0] is not x
                or exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 3.0):
            return Match.fail("the cubic term is not 0.044715 * Pow(x, 3)")
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, None):
            return Match.fail("x is not float")
        gelu = ir.node("FastGelu", [x], domain="com.microsoft", name=f"{node.name or 'gelu'}_fast_gelu")
        return _replace_with(node, graph, gelu)
    return NO_MATCH


def _std(value: ir.Value | None, *ops: str) -> ir.Node | None:
    """The producer of ``value`` when it is one of the standard-domain ``ops``, else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type in ops and node.domain in ("", "ai.onnx") else None


def _skip_float_cast(value: ir.Value | None) -> ir.Value | None:
    """``value`` with one Cast to float32 of a float32 value (a no-op the exporters write) skipped."""
    cast = _std(value, "Cast")
    to = cast.attributes.get("to") if cast is not None else None
    if to is not None and to.as_int() == ir.DataType.FLOAT and present(present(cast).inputs[0]).dtype == ir.DataType.FLOAT:
        return present(cast).inputs[0]
    return value


def _rms_input(inv_rms: ir.Value | None) -> tuple[ir.Value, float] | str | None:
    """(x, epsilon) when ``inv_rms`` is 1 / sqrt(mean(x^2, last axis, keepdims) + epsilon), written
    as Reciprocal(Sqrt(.)) or Div(1, Sqrt(.)); None when it is no 1/sqrt(a + b); else why not."""
    recip = _std(inv_rms, "Reciprocal", "Div")
    if recip is None or (recip.op_type == "Div" and not _is_scalar(recip.inputs[0], 1.0)):
        return None
    sqrt = _std(recip.inputs[-1], "Sqrt")
    add = _std(sqrt.inputs[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    eps, rest = _split_constants([present(v) for v in add.inputs])
    mean = _std(rest[0], "ReduceMean") if eps is not None and len(rest) == 1 else None
    keep = mean.attributes.get("keepdims") if mean is not None else None
    if mean is None or (keep is not None and not keep.as_int()):
        return "no mean(x^2) + epsilon with keepdims"
    pow_ = _std(mean.inputs[0], "Pow")
    if pow_ is None or not _is_scalar(pow_.inputs[1], 2.0):
        return "mean of something other than x^2"
    x = present(pow_.inputs[0])
    rank = len(x.shape) if x.shape is not None else None
    axes = node_axes(mean)
    if axes is None or len(axes) != 1 or (axes[0] != -1 and (rank is None or axes[0] != rank - 1)):
        return "the mean is not over the last axis only"
    return x, float(present(eps))


def _is_scalar(value: ir.Value | None, wanted: float) -> bool:
    arr = constant(value)
    return arr is not None and arr.size == 1 and float(arr.reshape(-1)[0]) == wanted


def fuse_simplified_layer_norm(node: ir.Node, graph: ir.Graph) -> Match:
    """Pattern: RMSNorm as HF Llama's ``LlamaRMSNorm`` reaches ONNX through either exporter,
    ``scale * (x * 1/sqrt(mean(x^2) + eps))`` (either Mul order; without the scale once our
    simplify has folded it into the next MatMuls), 1/sqrt as Reciprocal(Sqrt) or Div(1, Sqrt),
    ReduceMean's axes as attribute (opset < 18) or input, float32 Casts of float32 values around the
    normalization skipped.  Check: x float32, the mean over the last axis only with keepdims, the
    exponent exactly 2, epsilon and scale constants, scale 1-D of x's last dim (when known; ones of
    x's static last dim without a scale); a scale-less match whose user is a Mul by a constant
    declines (that Mul is the root).  Rewrite: ORT's ``SimplifiedLayerNormalization(x, scale,
    axis=-1, epsilon, stash_type=float)`` (registered by ORT in the ONNX domain).  onnxscript's
    RMSNorm rule (0.7) needs opset 18's ReduceMean and Reciprocal, so it misses the TorchScript
    exporter's form; its SkipSimplifiedLayerNormalization rule then fuses the residual Adds into ours."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return NO_MATCH
    options: list[tuple[ir.Value | None, ir.Node]] = []
    for scale, normalized in (node.inputs, node.inputs[::-1]):
        inner = _std(_skip_float_cast(normalized), "Mul")
        if constant(scale) is not None and inner is not None:
            options.append((scale, inner))
    options.append((None, node))
    reason = None
    for scale, inner in options:
        for xc, inv in (inner.inputs, inner.inputs[::-1]):
            found = _rms_input(inv)
            if isinstance(found, tuple) and _skip_float_cast(found[0]) is _skip_float_cast(xc):
                return _rewrite_rms(node, graph, present(_skip_float_cast(xc)), scale, found[1])
            reason = reason or (found if isinstance(found, str) else None)
    return Match.fail(reason) if reason else NO_MATCH


def _rewrite_rms(node: ir.Node, graph: ir.Graph, x: ir.Value, scale: ir.Value | None, eps: float) -> Match:
    last = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if x.dtype != ir.DataType.FLOAT:
        return Match.fail("not float32")
    if scale is None:
        if any(u.node.op_type == "Mul" and any(constant(v) is not None for v in u.node.inputs) for u in node.outputs[0].uses()):
            return Match.fail("its user multiplies by a constant (that Mul is the root)")
        if not isinstance(last, int):
            return Match.fail("no scale and the last dim is not static")
        scale = add_initializer(graph, f"{node.name or 'rms'}_ones", np.ones(last, np.float32))
    weight = constant(scale)
    if weight is None or weight.dtype != np.float32 or weight.ndim != 1 or (isinstance(last, int) and weight.shape[0] != last):
        return Match.fail("scale is not a float32 1-D constant over the last axis")
    norm = ir.node("SimplifiedLayerNormalization", [x, scale], name=f"{node.name or 'rms'}_simplified_ln",
                   attributes={"axis": -1, "epsilon": eps, "stash_type": 1})
    norm.outputs[0].dtype, norm.outputs[0].shape = x.dtype, x.shape
    return _replace_with(node, graph, norm)


def _replace_with(node: ir.Node, graph: ir.Graph, fused: ir.Node) -> Match:
    """Put ``fused`` (output typed like ``node``'s) before ``node`` and make it take ``node``'s
    place; the producers only ``node`` read die.  Declined (``fused`` removed) when ``node``'s
    output cannot be substituted."""
    graph.insert_before(node, fused)
    inputs = list(node.inputs)
    reason = substitute(node, fused.outputs[0])
    if reason:
        graph.remove(fused, safe=True)
        return Match.fail(reason)
    remove_dead_producers(inputs)
    return Match.ok()


def _is_integer(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_integer()


def _rotate_half_of(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(x, half) when ``value`` is Concat(-x[..., half:], x[..., :half]) on the last axis of a 4-D x."""
    concat = _std(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg, first = _std(concat.inputs[0], "Neg"), _std(concat.inputs[1], "Slice")
    second = _std(neg.inputs[0], "Slice") if neg is not None else None
    if first is None or second is None or first.inputs[0] is not second.inputs[0]:
        return None
    bounds = [[constant(v) if v is not None else None for v in s.inputs[1:5]] for s in (first, second)]
    if any(b is None or b.size != 1 for s in bounds for b in s[:3]) or any(s[3] is not None and s[3].tolist() != [1] for s in bounds):
        return None
    (s1, e1, a1, _), (s2, e2, a2, _) = [[int(b.reshape(-1)[0]) if b is not None else 1 for b in s] for s in bounds]
    half = e1
    if s1 != 0 or s2 != half or e2 < 2 * half or a1 not in (-1, 3) or a2 not in (-1, 3) or half <= 0:
        return None
    return present(first.inputs[0]), half


def _trig_of(value: ir.Value | None, op: str) -> ir.Value | None:
    """emb when ``value`` is Unsqueeze(op(emb), [1]) (op Cos or Sin)."""
    unsq = _std(value, "Unsqueeze")
    trig = _std(unsq.inputs[0], op) if unsq is not None and node_axes(unsq) == [1] else None
    return trig.inputs[0] if trig is not None else None


def _angles(emb: ir.Value) -> tuple[ir.Value, np.ndarray] | str:
    """(positions, inv_freq) when ``emb`` is Concat(f, f, last axis) with f = float(pos[..., None]) *
    inv_freq, pos int [seq] or [1|batch, seq]; else why not."""
    concat = _std(emb, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1] or \
            concat.attributes.get_int("axis", 0) not in (-1, 2):
        return "cos/sin of something other than Concat(f, f)"
    mul = _std(concat.inputs[0], "Mul")
    for a, b in ((mul.inputs, mul.inputs[::-1]) if mul is not None else ()):
        inv, cast = constant(b), _std(a, "Cast")
        unsq = _std(cast.inputs[0], "Unsqueeze") if cast is not None and cast.attributes.get_int("to", 0) == ir.DataType.FLOAT else None
        if inv is None or unsq is None:
            continue
        pos, axes = present(unsq.inputs[0]), node_axes(unsq)
        rank = len(pos.shape) if pos.shape is not None else None
        if inv.dtype != np.float32 or inv.ndim != 1 or not _is_integer(pos) or rank not in (1, 2) or axes is None:
            return "angles are not float(int positions) * a float32 1-D constant"
        if sorted(a % 3 for a in axes) != ([0, 2] if rank == 1 else [2]):
            return "positions are not unsqueezed to [1|batch, seq, 1]"
        return pos, inv
    return "angles are not positions * inv_freq"


def fuse_rotary_embedding(node: ir.Node, graph: ir.Graph, shared: dict) -> Match:
    """Pattern: HF's ``apply_rotary_pos_emb`` on one of q/k, ``x * cos + rotate_half(x) * sin`` with
    cos/sin = Unsqueeze(Cos/Sin(Concat(f, f)), [1]), f = float(pos[..., None]) * inv_freq (both
    exporters' form of transformers 5's rotary embedding), rotate_half(x) = Concat(-x[..., h:],
    x[..., :h]).  Check: x 4-D [batch, heads, seq, 2h] with static heads and 2h, inv_freq a float32
    constant of h values, positions int [seq] or [1|batch, seq] whose seq dim is x's (same inferred
    dim), provably >= 0 (:func:`nonnegative`: they index the cache), opset >= 15.  Rewrite:
    com.microsoft ``RotaryEmbedding(x, positions expanded to [batch, seq], cos_cache, sin_cache)``,
    the caches [max(pos) + 1, h] computed in the graph (``Range`` * inv_freq, Cos/Sin: exact for
    any length) and shared by every rotary of the same positions through ``shared``.  onnxscript's
    rules (0.7) expect transformers 4's MatMul/Transpose angles and give positions [1, seq], which
    ORT's kernel refuses for batch > 1."""
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return NO_MATCH
    for a, b in (node.inputs, node.inputs[::-1]):
        m1, m2 = _std(a, "Mul"), _std(b, "Mul")
        if m1 is None or m2 is None:
            continue
        for x, cos4 in (m1.inputs, m1.inputs[::-1]):
            for rot, sin4 in (m2.inputs, m2.inputs[::-1]):
                half = _rotate_half_of(rot)
                emb = _trig_of(cos4, "Cos")
                if half is None or half[0] is not x or emb is None or _trig_of(sin4, "Sin") is not emb:
                    continue
                return _rewrite_rope(node, graph, shared, x, half[1], emb)
    return NO_MATCH


def _same_dim(a, b) -> bool:
    """Two dims known equal: the same int, or the same named symbolic dim (inferred from the ops)."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _rewrite_rope(node: ir.Node, graph: ir.Graph, shared: dict, x: ir.Value, half: int, emb: ir.Value) -> Match:
    found = _angles(emb)
    if isinstance(found, str):
        return Match.fail(found)
    pos, inv = found
    dims = list(x.shape) if x.shape is not None else []
    if len(dims) != 4 or not isinstance(dims[1], int) or dims[3] != 2 * half or inv.shape[0] != half:
        return Match.fail("x is not [batch, heads, seq, 2 * len(inv_freq)] with static heads")
    if x.dtype != ir.DataType.FLOAT or not _same_dim(present(pos.shape)[-1], dims[2]) or \
            (len(present(pos.shape)) == 2 and present(pos.shape)[0] != 1 and not _same_dim(present(pos.shape)[0], dims[0])):
        return Match.fail("cannot prove the positions span x's batch and sequence axes")
    if not nonnegative(pos):
        return Match.fail("positions not provably >= 0")
    if graph.opset_imports.get("", 0) < 15:
        return Match.fail("opset < 15")
    key = (id(pos), inv.tobytes(), str(dims[0]))
    if key not in shared:
        shared[key] = _rope_inputs(node, graph, pos, x, inv)
    positions, cos_cache, sin_cache = shared[key]
    rope = ir.node("RotaryEmbedding", [x, positions, cos_cache, sin_cache], domain="com.microsoft",
                   attributes={"interleaved": 0, "num_heads": dims[1]}, name=f"{node.name or 'rope'}_rotary")
    rope.outputs[0].dtype, rope.outputs[0].shape = x.dtype, x.shape
    return _replace_with(node, graph, rope)


def _rope_inputs(node: ir.Node, graph: ir.Graph, pos: ir.Value, x: ir.Value, inv: np.ndarray) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(positions [batch, seq], cos cache, sin cache [max(pos) + 1, h]), nodes inserted before ``node``."""
    base = node.name or "rope"

    def const(suffix: str, array) -> ir.Value:
        return add_initializer(graph, f"{base}_{suffix}", np.asarray(array))

    def add(op: str, inputs: list, **attributes) -> ir.Value:
        new = ir.node(op, inputs, attributes=attributes, name=f"{base}_{op.lower()}_{len(added)}")
        added.append(new)
        return new.outputs[0]

    added: list[ir.Node] = []
    one, zero = const("one", np.int64(1)), const("zero", np.int64(0))
    count = add("Add", [add("Cast", [add("ReduceMax", [pos], keepdims=0)], to=ir.DataType.INT64), one])
    rows = add("Cast", [add("Unsqueeze", [add("Range", [zero, count, one]), const("axis1", np.array([1], np.int64))])],
               to=ir.DataType.FLOAT)
    angles = add("Mul", [rows, const("inv_freq", inv)])
    cos_cache, sin_cache = add("Cos", [angles]), add("Sin", [angles])
    pos2 = pos if len(present(pos.shape)) == 2 else add("Unsqueeze", [pos, const("axis0", np.array([0], np.int64))])
    shape = add("Concat", [add("Shape", [x], start=0, end=1), add("Shape", [pos2], start=1, end=2)], axis=0)
    positions = add("Expand", [add("Cast", [pos2], to=ir.DataType.INT64), shape])
    for new in added:
        graph.insert_before(node, new)
    return positions, cos_cache, sin_cache

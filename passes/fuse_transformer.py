"""fuse-transformer: attention/LayerNorm/GELU fusions into ONNX Runtime's com.microsoft ops, on the
exports of both PyTorch exporters, validated like every pass."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io as io_mod
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from onnxopt import io
from onnxopt.base import (
    NO_MATCH,
    FunctionalOptPass,
    Match,
    add_initializer,
    constant,
    count_nodes,
    is_constant,
    node_axes,
    nonnegative,
    op_histogram,
    remove_dead_producers,
    substitute,
)
from onnxopt.errors import BadInputError, UsageError

logger = logging.getLogger(__name__)

#: com.microsoft ops that hold a whole attention block (what "attention fused" counts)
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                           "PackedMultiHeadAttention"})
#: com.microsoft ops that only a transformer fusion creates (a candidate must create one of them)
TRANSFORMER_OPS = ATTENTION_OPS | {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
                                   "BiasGelu", "FastGelu", "Gelu", "RotaryEmbedding", "SimplifiedLayerNormalization"}
#: the canonicalization below turns a one-element 1-D constant into a scalar in these ops
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater"})
#: our passes that run on a copy before the second fusion attempt (sound on every model; they
#: fold the TorchScript exporter's shape arithmetic, which hides attention from the matchers)
PREPARE = "cleanup,fold-constants,fold-shapes,simplify{size-rules=false}"


#: our model types that ORT's ``optimize_model`` does not know -> the type it is given (it has no
#: Llama type: its gpt2 fusions are the ones that apply, SkipSimplifiedLayerNormalization)
ORT_MODEL_TYPE = {"llama": "gpt2"}
#: model types ``--model-type`` accepts besides ORT's own
OWN_MODEL_TYPES = frozenset(ORT_MODEL_TYPE)


def detect_heads(model: ir.Model) -> tuple[int, int]:
    """(num_heads, hidden_size) from a past key input declared [batch, heads, past, head_dim] with
    static heads and head_dim; (0, 0) (let ORT's optimizer detect them) otherwise.  With grouped-query
    attention the past holds the key/value heads only: the caller passes (0, 0) for ``llama``."""
    for v in model.graph.inputs:
        dims = list(v.shape) if v.shape is not None else []
        if "past" in (v.name or "") and len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
            return dims[1], dims[1] * dims[3]
    return 0, 0


def detect_model_type(model: ir.Model) -> str:
    """Model type from the graph interface: ``vit`` for an image input (4-D float, or named
    pixel_values), ``llama`` for past/present key-value inputs or outputs and rotary position
    embeddings (Cos and Sin ops in the graph), ``gpt2`` for past/present without them, else ``bert``."""
    names = [v.name or "" for v in (*model.graph.inputs, *model.graph.outputs)]
    if any("past" in n or "present" in n for n in names):
        ops = {n.op_type for n in model.graph if n.domain in ("", "ai.onnx")}
        return "llama" if {"Cos", "Sin"} <= ops else "gpt2"
    for v in model.graph.inputs:
        if v.name == "pixel_values" or (v.dtype == ir.DataType.FLOAT and v.shape is not None and len(v.shape) == 4):
            return "vit"
    return "bert"


def scalarize_broadcast_constant(node: ir.Node, index: int, graph: ir.Graph) -> Match:
    """Pattern: a broadcasting op (Add, Mul, Where, ...) reads a constant of shape [1].  Check: another
    input's rank is known and >= 1 (then [1] and a scalar broadcast to the same shape: the result
    is unchanged).  Rewrite: read a scalar initializer with the same value.  The attention matchers
    of onnxscript expect the scalar ``Where(IsNaN(p), 0.0, p)`` the TorchScript exporter writes as [1]."""
    value = node.inputs[index]
    if node.op_type not in _BROADCASTING or node.domain not in ("", "ai.onnx") or not is_constant(value):
        return NO_MATCH
    if tuple(value.const_value.shape) != (1,):
        return NO_MATCH
    others = [v for i, v in enumerate(node.inputs) if i != index and v is not None]
    if not any(v.shape is not None and len(v.shape) >= 1 for v in others):
        return Match.fail("no other input of known rank >= 1 (a [1] constant may set the output's rank)")
    node.replace_input_with(index, add_initializer(graph, f"{value.name}_scalar", value.const_value.numpy().reshape(())))
    return Match.ok()


def _canonicalize(model: ir.Model, skipped: collections.Counter) -> int:
    done = 0
    for node in list(model.graph):
        for index in range(len(node.inputs)):
            m = scalarize_broadcast_constant(node, index, model.graph)
            done += m.succeeded
            m.tally(collections.Counter(), skipped, "", prefix="scalar constant")
    return done


def _with_inferred_shapes(model: ir.Model) -> ir.Model:
    """The model with shapes from ORT's symbolic shape inference, computed from the graph inputs'
    declarations and the ops only: declared intermediate and output shapes are removed first
    (onnxopt never trusts them; see onnxopt/shapes.py).  Symbolic inference proves, e.g., that a
    present key's batch dim is the query's, which onnxscript's attention check needs."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - e.g. a Constant with value_ints; onnxscript infers shapes itself
        logger.debug("fuse-transformer: ORT symbolic shape inference failed", exc_info=True)
        inferred = None
    return ir.from_proto(inferred if inferred is not None else proto)


def flatten_gemm_input(node: ir.Node, graph: ir.Graph) -> Match:
    """Pattern: a Gemm whose A input comes from a fused attention op (3-D [batch, seq, hidden]).
    Check: B is a constant 2-D weight.  Rewrite: Reshape A to [-1, K] (K = B's reduction dim)
    before the Gemm, as the exporter's own Reshape did.  onnxscript's MultiHeadAttention rule
    (0.7) absorbs that Reshape of the dynamo exporter's [batch*seq, hidden] Gemm input and leaves
    a Gemm ONNX Runtime refuses (rank 3); this restores it."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return NO_MATCH
    producer = node.inputs[0].producer()
    if producer is None or producer.domain != "com.microsoft" or producer.op_type not in ATTENTION_OPS:
        return NO_MATCH
    weight = node.inputs[1].const_value if is_constant(node.inputs[1]) else None
    if weight is None or len(weight.shape) != 2:
        return Match.fail("weight is not a constant 2-D tensor")
    trans_a = node.attributes.get("transA")
    if trans_a is not None and trans_a.as_int():
        return Match.fail("transA is set")
    trans_b = node.attributes.get("transB")
    k = weight.shape[1] if trans_b is not None and trans_b.as_int() else weight.shape[0]
    shape = add_initializer(graph, f"{node.name}_flatten_shape", np.array([-1, k], np.int64))
    reshape = ir.node("Reshape", [node.inputs[0], shape], name=f"{node.name}_flatten")
    graph.insert_before(node, reshape)
    node.replace_input_with(0, reshape.outputs[0])
    return Match.ok()


_TANH_GELU = (0.5, math.sqrt(2.0 / math.pi), 0.044715)  # 0.5 x (1 + tanh(c (x + k x^3)))


def _factors(value: ir.Value, top: bool = True) -> list[ir.Value]:
    """The operands of a product tree of Mul nodes ending at ``value`` (inner products single-use)."""
    node = value.producer()
    if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or (not top and len(value.uses()) != 1):
        return [value]
    return [f for v in node.inputs for f in _factors(v, top=False)]


def _split_constants(values: list[ir.Value]) -> tuple[float | None, list[ir.Value]]:
    """(product of the scalar constants, the other values); None when a constant is not a scalar."""
    product, rest = 1.0, []
    for v in values:
        arr = v.const_value.numpy() if is_constant(v) else None
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
        return list(node.inputs)
    scale, rest = _split_constants(list(node.inputs))
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
        scale, inner = _split_constants(_factors(tanh.inputs[0], top=False))
        if scale is None or len(inner) != 1 or not math.isclose(scale, _TANH_GELU[1], rel_tol=1e-4):
            return Match.fail("tanh argument is not sqrt(2/pi) * (...)")
        terms = _add_operands(_single_use_producer(inner[0], "Add"), None)
        if terms is None or x not in terms:
            return Match.fail("tanh argument is not x + k x^3")
        k, cube = _split_constants(_factors(terms[1] if terms[0] is x else terms[0], top=False))
        power = _single_use_producer(cube[0], "Pow") if len(cube) == 1 else None
        exponent = power.inputs[1].const_value.numpy() if power is not None and is_constant(power.inputs[1]) else None
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


def _skip_float_cast(value: ir.Value) -> ir.Value:
    """``value`` with one Cast to float32 of a float32 value (a no-op the exporters write) skipped."""
    cast = _std(value, "Cast")
    to = cast.attributes.get("to") if cast is not None else None
    if to is not None and to.as_int() == ir.DataType.FLOAT and cast.inputs[0].dtype == ir.DataType.FLOAT:
        return cast.inputs[0]
    return value


def _rms_input(inv_rms: ir.Value) -> tuple[ir.Value, float] | str | None:
    """(x, epsilon) when ``inv_rms`` is 1 / sqrt(mean(x^2, last axis, keepdims) + epsilon), written
    as Reciprocal(Sqrt(.)) or Div(1, Sqrt(.)); None when it is no 1/sqrt(a + b); else why not."""
    recip = _std(inv_rms, "Reciprocal", "Div")
    if recip is None or (recip.op_type == "Div" and not _is_scalar(recip.inputs[0], 1.0)):
        return None
    sqrt = _std(recip.inputs[-1], "Sqrt")
    add = _std(sqrt.inputs[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    eps, rest = _split_constants(list(add.inputs))
    mean = _std(rest[0], "ReduceMean") if eps is not None and len(rest) == 1 else None
    keep = mean.attributes.get("keepdims") if mean is not None else None
    if mean is None or (keep is not None and not keep.as_int()):
        return "no mean(x^2) + epsilon with keepdims"
    pow_ = _std(mean.inputs[0], "Pow")
    if pow_ is None or not _is_scalar(pow_.inputs[1], 2.0):
        return "mean of something other than x^2"
    x = pow_.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    axes = node_axes(mean)
    if axes is None or len(axes) != 1 or (axes[0] != -1 and (rank is None or axes[0] != rank - 1)):
        return "the mean is not over the last axis only"
    return x, float(eps)


def _is_scalar(value: ir.Value, wanted: float) -> bool:
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
                return _rewrite_rms(node, graph, _skip_float_cast(xc), scale, found[1])
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


def _rotate_half_of(value: ir.Value) -> tuple[ir.Value, int] | None:
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
    return first.inputs[0], half


def _trig_of(value: ir.Value, op: str) -> ir.Value | None:
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
        pos, axes = unsq.inputs[0], node_axes(unsq)
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
    if x.dtype != ir.DataType.FLOAT or not _same_dim(pos.shape[-1], dims[2]) or \
            (len(pos.shape) == 2 and pos.shape[0] != 1 and not _same_dim(pos.shape[0], dims[0])):
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
    pos2 = pos if len(pos.shape) == 2 else add("Unsqueeze", [pos, const("axis0", np.array([0], np.int64))])
    shape = add("Concat", [add("Shape", [x], start=0, end=1), add("Shape", [pos2], start=1, end=2)], axis=0)
    positions = add("Expand", [add("Cast", [pos2], to=ir.DataType.INT64), shape])
    for new in added:
        graph.insert_before(node, new)
    return positions, cos_cache, sin_cache


def _onnxscript(model: ir.Model, model_type: str, num_heads: int, hidden_size: int, sdpa_first: bool = False) -> ir.Model:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions._core import _pre_optimize
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    from onnxopt.passes.simplify import Simplify

    work = _with_inferred_shapes(model)
    _canonicalize(work, collections.Counter())
    for node in list(work.graph):
        if node.graph is not None:
            fuse_simplified_layer_norm(node, work.graph)
    if sdpa_first:
        # SDPA first, then our simplify: the TorchScript exporter's 3-D attention leaves a Reshape that
        # is a no-op once SDPA is fused, and it keeps onnxscript's MultiHeadAttention rules from matching
        _pre_optimize(work)
        if fuse_sdpa(work, apply_shape_inference=True):
            Simplify(size_rules=False)(work)
    fused, _ = optimize_for_ort(work)
    shared: dict = {}
    for node in list(fused.graph):
        if node.graph is not None:
            flatten_gemm_input(node, fused.graph)
        if node.graph is not None:
            fuse_fast_gelu(node, fused.graph)
        if node.graph is not None:
            fuse_rotary_embedding(node, fused.graph, shared)
    return fused


def _onnxscript_sdpa_first(model: ir.Model, model_type: str, num_heads: int, hidden_size: int) -> ir.Model:
    return _onnxscript(model, model_type, num_heads, hidden_size, sdpa_first=True)


def _onnxruntime(model: ir.Model, model_type: str, num_heads: int, hidden_size: int) -> ir.Model:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(ir.to_proto(model), model_type=ORT_MODEL_TYPE.get(model_type, model_type), num_heads=num_heads,
                               hidden_size=hidden_size, opt_level=0)
    return ir.serde.deserialize_model(optimized.model)


#: name -> fusion engine (model, model_type, num_heads, hidden_size) -> fused copy
ENGINES: dict[str, Callable[[ir.Model, str, int, int], ir.Model]] = {
    "onnxscript": _onnxscript,
    "onnxscript-sdpa-first": _onnxscript_sdpa_first,
    "onnxruntime": _onnxruntime,
}


@contextlib.contextmanager
def _quiet_libraries():
    """The fusion libraries log every step at INFO (onnx_ir's passes) and ORT's optimizer prints to
    stdout; both go to our debug log instead."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("fusion_", "onnx_model", "optimizer"))]
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "onnxruntime", *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR if not logger.isEnabledFor(logging.DEBUG) else lg.level)
    printed = io_mod.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if printed.getvalue().strip():
            logger.debug("fusion library output: %s", printed.getvalue().strip())


#: engines tried on the model as exported and after PREPARE (SDPA-first matters only once the
#: TorchScript exporter's shape arithmetic is folded; each onnxscript run costs seconds)
ENGINES_ON = {"as": ("onnxscript", "onnxruntime"), "after": ("onnxscript-sdpa-first", "onnxruntime")}


@dataclasses.dataclass
class Candidate:
    label: str
    model: ir.Model
    attention: int
    softmax: int
    nodes: int

    def key(self) -> tuple[int, int, int]:
        return (-self.attention, self.softmax, self.nodes)


def _fused_ops(model: ir.Model, kinds: frozenset | set) -> int:
    return sum(n for op, n in op_histogram(model).items() if op.startswith("com.microsoft::") and op.split("::")[1] in kinds)


def _describe(model: ir.Model) -> tuple[int, int, int]:
    return _fused_ops(model, ATTENTION_OPS), op_histogram(model).get("Softmax", 0), count_nodes(model)


def _restore_interface(original: ir.Model, fused: ir.Model) -> str | None:
    """Give ``fused`` the original's graph input/output declarations, opsets and metadata; None on
    success, else why the candidate cannot keep the interface."""
    if [v.name for v in fused.graph.inputs] != [v.name for v in original.graph.inputs]:
        return "the fusion changed the graph inputs"
    if [v.name for v in fused.graph.outputs] != [v.name for v in original.graph.outputs]:
        return "the fusion changed the graph outputs"
    for old, new in zip((*original.graph.inputs, *original.graph.outputs), (*fused.graph.inputs, *fused.graph.outputs)):
        new.type, new.shape = old.type, old.shape
    for domain, version in original.opset_imports.items():
        if fused.opset_imports.get(domain, version) != version:
            return f"the fusion changed the opset of domain '{domain or 'ai.onnx'}'"
        fused.opset_imports[domain] = version
    fused.opset_imports.setdefault("com.microsoft", 1)
    for node in ir.traversal.RecursiveGraphIterator(fused.graph):  # inferred, not proven: not kept
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    fused.metadata_props.clear()
    fused.metadata_props.update(original.metadata_props)
    fused.producer_name, fused.producer_version = original.producer_name, original.producer_version
    fused.doc_string, fused.graph.name = original.doc_string, original.graph.name
    return None


class FuseTransformer(FunctionalOptPass):
    """Fuse attention, LayerNorm, GELU and bias patterns into ONNX Runtime's com.microsoft ops.

    Tries fusion engines (``ENGINES_ON``) on the model as it is and on a copy first simplified by our sound
    passes (``PREPARE``: cleanup, fold-constants, fold-shapes, simplify without its size-only rules;
    they fold the TorchScript exporter's shape arithmetic that hides attention): ``onnxscript`` (onnxscript.rewriter.ort_fusions, whose
    pattern/check/rewrite rules match the dynamo exporter's SDPA decompositions, opset-18
    LayerNormalization and Erf-GELU, into Attention/MultiHeadAttention, SkipLayerNormalization,
    BiasGelu/FastGelu), run after our canonicalization (scalar ``[1]`` constants, ORT symbolic
    shapes computed from the ops, never from declared intermediate shapes), followed by our
    FastGelu rule; ``onnxscript-sdpa-first`` (the same with SDPA fused first and our simplify run
    before the MultiHeadAttention rules: TorchScript exports) and ``onnxruntime``
    (``optimize_model`` with ``opt_level=0``).  Each candidate is checked on the validation's
    inputs (the pipeline's ``feeds``; else two synthesized points).  An engine that raises (ORT's fusion raises
    IndexError on dynamo GPT-2 exports) is skipped with its error as the reason (the traceback at
    debug level, ``-vv``).  A candidate that diverges from this pass's input (tolerance as
    validation's) is skipped with the first diverging output.  The kept candidate
    fuses the most attention blocks, then leaves the fewest Softmax, then has the fewest nodes.
    ``model-type`` ``auto`` detects bert/gpt2/llama/vit from the graph interface (see
    :func:`detect_model_type`).  Runs first in any pipeline (``runs_first``), before passes that
    would rewrite the subgraphs the fusions match, so ``default,fuse-transformer`` and
    ``fuse-transformer,default`` give the same model.  The result uses com.microsoft ops: it runs
    only on ONNX Runtime (CPU and GPU EPs), so the pass is opt-in, never in the default pipeline.
    Keeps graph inputs/outputs (names, types, declared dims), opsets (adds com.microsoft), metadata.
    Declines models whose weights exceed 2 GB.  Cost: a few fusion runs and ORT sessions on the model.
    """

    name = "fuse-transformer"
    #: the pipeline moves this pass to the front (see onnxopt.pipeline.parse)
    runs_first = True

    def __init__(self, model_type: str = "auto", num_heads: int = 0, hidden_size: int = 0,
                 feeds: list[dict[str, np.ndarray]] | None = None):
        super().__init__()
        self.feeds = feeds  # the pipeline's validation inputs (a pipeline argument, not an option)
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        if model_type != "auto" and model_type not in MODEL_TYPES and model_type not in OWN_MODEL_TYPES:
            raise UsageError(f"fuse-transformer: unknown model-type '{model_type}' "
                             f"(known: auto, {', '.join(sorted({*MODEL_TYPES, *OWN_MODEL_TYPES}))})")
        self.model_type = model_type
        self.num_heads = num_heads
        self.hidden_size = hidden_size

    def _prepared(self, model: ir.Model) -> ir.Model:
        from onnxopt import pipeline

        return pipeline.run(ir.from_proto(ir.to_proto(model)), pipeline.parse(PREPARE)).model

    def _candidates(self, work: ir.Model, model_type: str, heads: int, hidden: int,
                    skipped: collections.Counter) -> list[Candidate]:
        out = []
        for where, source in (("as exported", lambda: work), ("after " + PREPARE, lambda: self._prepared(work))):
            base = source()
            for engine in ENGINES_ON[where.split(" ")[0]]:
                fuse, label = ENGINES[engine], f"{engine} ({where})"
                try:
                    with _quiet_libraries():
                        fused = fuse(ir.from_proto(ir.to_proto(base)), model_type, heads, hidden)
                except Exception as e:  # noqa: BLE001 - an external fusion failing is a skip, never a crash
                    logger.debug("fuse-transformer: %s failed", label, exc_info=True)
                    skipped[f"{label} failed ({type(e).__name__}: {e})"] += 1
                    continue
                reason = _restore_interface(work, fused)
                if reason:
                    skipped[f"{label}: {reason}"] += 1
                    continue
                out.append(Candidate(label, fused, *_describe(fused)))
        return out

    def _points(self, work: ir.Model, skipped: collections.Counter) -> list[tuple[dict, dict]] | None:
        """(feeds, reference outputs of this pass's input) per input point: the pipeline's validation
        points when it has them (the user's --data), else two synthesized points; None when the
        model cannot run on synthesized inputs (token ids out of range: only the caller's data can say)."""
        from onnxopt import runtime
        from onnxopt import validation as validate

        blob = ir.to_proto(work).SerializeToString()
        try:
            if self.feeds is None:
                checker = validate.Validator(blob, tolerance=validate.default_tolerance(work))
                return [(p.feeds, p.reference) for p in checker.points if p.reference is not None]
            sess = runtime.session(blob)
            return [(f, runtime.run(sess, f)) for f in self.feeds]
        except BadInputError as e:
            skipped[f"candidates not checked in the pass (the model fails on synthesized inputs: {e}); "
                    "the pipeline's validation checks the result"] += 1
            return None

    def _check(self, work: ir.Model, candidates: list[Candidate], skipped: collections.Counter) -> Candidate | None:
        """The best candidate whose outputs match this pass's input at every point."""
        from onnxopt import runtime
        from onnxopt import validation as validate

        points = self._points(work, skipped)
        if points is None:
            return candidates[0]
        tolerance = validate.default_tolerance(work)
        for c in candidates:
            try:
                sess = runtime.session(ir.to_proto(c.model).SerializeToString())
                bad = [r for feeds, ref in points
                       for r in validate.compare(ref, runtime.run_candidate(sess, feeds, list(ref)), tolerance) if not r.ok]
            except BadInputError as e:
                skipped[f"{c.label}: ONNX Runtime cannot run the result ({e})"] += 1
                continue
            if not bad:
                return c
            skipped[f"{c.label}: outputs diverge ({bad[0].name}: {bad[0].reason})"] += 1
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        skipped: collections.Counter = collections.Counter()
        if io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD:
            skipped["weights over 2 GB: the fusions need an in-memory protobuf"] += 1
            return self.result(model.clone(), collections.Counter(), skipped)
        work = model.clone()
        ir_external_data.load_to_model(work)
        # a clone shares tensors, whose names the libraries' passes rename: copy through a protobuf
        work = ir.from_proto(ir.to_proto(work))
        model_type = detect_model_type(work) if self.model_type == "auto" else self.model_type
        heads, hidden = (self.num_heads, self.hidden_size) if self.num_heads or model_type == "llama" else detect_heads(work)
        before = _describe(work)
        fused_before = _fused_ops(work, TRANSFORMER_OPS)
        candidates = [c for c in self._candidates(work, model_type, heads, hidden, skipped)
                      if c.key() < (-before[0], before[1], before[2]) and _fused_ops(c.model, TRANSFORMER_OPS) > fused_before]
        candidates.sort(key=Candidate.key)
        chosen = self._check(work, candidates, skipped) if candidates else None
        if chosen is None:
            return self.result(work, collections.Counter(), skipped)
        logger.info("fuse-transformer: kept %s (model type %s): %d attention fused, %d Softmax left, %d nodes",
                    chosen.label, model_type, chosen.attention, chosen.softmax, chosen.nodes)
        old, new = op_histogram(work), op_histogram(chosen.model)
        changed = collections.Counter({f"{op} created": n - old.get(op, 0) for op, n in new.items() if n > old.get(op, 0)})
        changed[f"fused by {chosen.label}; com.microsoft ops: runs on ONNX Runtime only"] += 1
        return self.result(chosen.model, changed, skipped)

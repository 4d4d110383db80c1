"""convert-fp16: mixed-precision float16 for GPU execution providers, float32 where fp16 would break.

Every node that computes in float32 is *coloured* fp16 or fp32 (in this order, the first rule
that applies wins; ``Conversion.kept`` records it):

- an op of a custom domain (``com.microsoft``, ``ai.onnx.ml``...) stays fp32 (its kernels have fixed
  type constraints we do not know);
- a node holding subgraphs (If, Loop, Scan) stays fp32 at its edges; its bodies are converted with
  float32 inputs/outputs and Casts inside, unless the node itself is fp32 for an overflow range
  (then the whole body stays fp32: no ranges are observed inside subgraphs);
- an op in the op block list (``DEFAULT_OP_BLOCK_LIST``: shape/index-typed ops, random ops and
  numerically fragile reductions), a node in the node block list;
- **type constraint**: the op's ONNX schema (``onnx.defs.get_schema`` at the model's opset) allows
  float16 in none of its float slots (Celu, IsInf before opset 20, TfIdfVectorizer's output); a slot
  whose own constraint lacks float16 (Resize's scales, LayerNormalization's Mean) stays float32 in
  an fp16 node;
- **overflow range**: a float input or output whose observed magnitude (``ranges``: max |x| per
  tensor name, from calibration data; constants and initializers are measured exactly) exceeds
  ``limit`` (default 65504 / 4: fp16's largest finite value with a safety margin of 4, for inputs
  the data did not cover), or an op that squares its input internally (LayerNormalization,
  ReduceL2, ...) whose max |x|^2 exceeds it;
- **boundary**: an elementwise-cost node whose float inputs all come from fp32 nodes and whose
  float outputs all go to fp32 nodes (two Casts for one cheap op; converting it gains nothing);
- everything else is fp16; then a Constant/ConstantOfShape read by both fp16 and float32 nodes (or
  a float32 graph output) is kept float32 (**shared constant**), like a shared initializer.

Then, without raising halfway (all decisions are made before the first mutation): fp16 nodes'
float32 outputs become float16 (``to``/``dtype``/``output_datatype`` attributes, a float32 default
made explicit, and Constant/ConstantOfShape values follow, their flushed/subnormal values counted);
an initializer whose every consumer is fp16 is stored as float16 (values that round to
0 or to a subnormal are counted), one read by both kinds stays float32 and is cast where needed;
a Cast is inserted wherever a value's type differs from what its consumer needs (one per value,
type and graph); graph outputs keep their names (a value listed twice gets one Cast); the main graph's inputs/outputs keep float32
(``keep_io_types``, else they become float16); subgraph inputs/outputs always keep their types.
Finally Cast pairs are folded only when the pair is lossless: Cast(fp16->fp32)->Cast(fp32->fp16)
is removed (unless a Cast is named in the node block list), Cast(fp32->fp16)->Cast(fp16->fp32) (a
rounding) is kept.

Preserves: graph input/output names (and their types with ``keep_io_types``), integer/bool/string
tensors, shape-typed inputs (Resize/Range are blocked, Resize scales stay float32 even when
unblocked), opset imports, metadata.  Never touches: models that are already float16 or
quantized (declined with the reason; this also makes the pass idempotent), custom-domain ops.
Cost: O(nodes + weights); one onnx shape inference (``onnxopt.shapes.infer``) to type untyped values.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import shapes
from onnxopt.base import FreshNames, OptPass, graph_of, is_standard, present, producer_of
from onnxopt.quantization.qdq import quant_ops

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive subnormal; smaller magnitudes round to 0
FP16_NORMAL = 2.0 ** -14  # smallest positive normal
DEFAULT_LIMIT = FP16_MAX / 4
#: Ops kept in float32 by default: shape/index-typed or integer-like semantics (Resize, Range,
#: TopK, NonMaxSuppression, RoiAlign, CumSum), random ops, reductions that users keep in
#: fp32 because they overflow or lose precision in fp16 (sums of squares, products, log-sum-exp),
#: and MelWeightMatrix (its schema allows a float16 output_datatype, ONNX Runtime 1.32 has no kernel for it).
DEFAULT_OP_BLOCK_LIST = ("Resize", "Upsample", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "CumSum",
                         "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "LpNormalization",
                         "MelWeightMatrix")
#: Input slots that accept any type (no Cast is inserted for them)
ANY_TYPE_SLOTS = {"Shape": {0}, "Size": {0}, "Cast": {0}, "CastLike": {0}}
#: Input slots that stay float32 even in an fp16 node (shape-typed float inputs)
FP32_SLOTS = {"Resize": {1, 2}, "Upsample": {1}}
#: Output slots that stay float32 in an fp16 node (LayerNormalization's Mean/InvStdDev: stash_type)
FLOAT_OUTPUTS = {"LayerNormalization": {1, 2}}
#: Ops whose kernels square their input internally (variance, L2 norm): max|x|^2 must fit too
SQUARING_OPS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization", "ReduceL2",
                          "ReduceSumSquare", "LpNormalization", "RMSNormalization"})
#: Ops worth a Cast on each side even alone between fp32 nodes (the boundary rule spares them)
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "LSTM", "GRU", "RNN", "Attention"})
LOSSLESS_WIDENING = frozenset({(HALF, FLOAT), (HALF, ir.DataType.DOUBLE), (FLOAT, ir.DataType.DOUBLE)})
#: Integer attributes naming an output's element type (a float32 default is made explicit as float16)
DTYPE_ATTRS = ("to", "dtype", "output_datatype")
CONSTANT_OPS = ("Constant", "ConstantOfShape")


@functools.cache
def _schema(op_type: str, opset: int, domain: str):
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _half_allowed(schema, params, index: int) -> bool:
    """Whether the schema lets slot ``index`` of ``params`` (inputs or outputs) be float16."""
    if index >= len(params) and not (params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic):
        return True
    param = params[min(index, len(params) - 1)]
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}.get(param.type_str, [param.type_str])
    return any("(float16)" in t for t in allowed)  # tensor(float16), seq(tensor(float16)), optional(...)


def schema_fixed_slots(op_type: str, opset: int, domain: str, n_in: int, n_out: int) -> tuple[set[int], set[int]]:
    """(input slots, output slots) whose ONNX type constraints forbid float16 (literal ``tensor(float)``
    slots such as Resize's scales, LayerNormalization's stash-typed Mean, Celu's whole signature)."""
    schema = _schema(op_type, opset, "" if domain == "ai.onnx" else domain or "")
    if schema is None:
        return set(), set()
    return ({i for i in range(n_in) if not _half_allowed(schema, schema.inputs, i)},
            {i for i in range(n_out) if not _half_allowed(schema, schema.outputs, i)})


def to_half(arr: np.ndarray, counts: dict[str, int]) -> np.ndarray:
    """float16 copy of a constant, counting the values that flush to 0, turn subnormal or clamp."""
    arr = np.asarray(arr, np.float32)
    a = np.abs(arr)
    counts["flushed to zero (|x| < 2^-24)"] += int(np.count_nonzero((a > 0) & (a < FP16_TINY)))
    counts["subnormal in fp16 (|x| < 2^-14)"] += int(np.count_nonzero((a >= FP16_TINY) & (a < FP16_NORMAL)))
    counts["clamped to +-65504"] += int(np.count_nonzero(a > FP16_MAX))
    return np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)


def parse_list(text: str | Iterable[str] | None, defaults: Iterable[str] = ()) -> tuple[str, ...]:
    """``"default,Softmax"`` -> the defaults plus Softmax; separators ``, ; |`` (``|`` in pipeline
    text, where ``,`` separates options)."""
    items = re.split(r"[,;|]", text) if isinstance(text, str) else list(text or ())
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item == "default":
            out.extend(defaults)
        elif item:
            out.append(item)
    return tuple(dict.fromkeys(out))


@dataclasses.dataclass
class Kept:
    """A node left in float32: where, what, the kind of reason and the reason."""

    node: str
    op: str
    kind: str  # custom domain / control flow / op/node block list / accuracy budget / type constraint / overflow
    #            range / boundary / shared constant / unknown type
    reason: str
    graph: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Conversion:
    """What :func:`convert_model` did (``declined``: why it did nothing)."""

    declined: str = ""
    fp16_nodes: int = 0
    kept: list[Kept] = dataclasses.field(default_factory=list)
    casts_inserted: int = 0
    casts_folded: int = 0
    lossy_pairs_kept: int = 0
    initializers: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    notes: list[str] = dataclasses.field(default_factory=list)

    def kinds(self) -> dict[str, int]:
        return dict(collections.Counter(k.kind for k in self.kept))

    def to_dict(self) -> dict:
        return {"declined": self.declined or None, "fp16_nodes": self.fp16_nodes, "fp32_nodes": len(self.kept),
                "kept_fp32_by_kind": self.kinds(), "kept_fp32": [k.to_dict() for k in self.kept],
                "casts_inserted": self.casts_inserted, "casts_folded": self.casts_folded,
                "lossy_cast_pairs_kept": self.lossy_pairs_kept, "initializers": dict(self.initializers),
                "notes": self.notes}


def decline_reason(model: ir.Model) -> str:
    """Why a model is not converted ("" when it is): already float16, quantized, or no float32."""
    q = quant_ops(model)
    if q:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(q.items()))
        return f"the model is quantized ({ops}); convert the float model to fp16, or keep this one as it is"
    g = model.graph
    low = (HALF, ir.DataType.BFLOAT16)
    edge = [v for v in (*g.inputs, *g.outputs, *g.initializers.values()) if v.dtype in low]
    if edge:
        return (f"the model is already float16/bfloat16 ({len(edge)} of its inputs, outputs or weights, e.g. "
                f"'{edge[0].name}'); nothing to convert")
    inside = [v for node in ir.traversal.RecursiveGraphIterator(g) for v in node.outputs if v.dtype in low]
    if inside:
        return (f"the model already computes in float16/bfloat16 ({len(inside)} tensors, e.g. '{inside[0].name}'; "
                f"converted before?); convert the float32 original")
    if not any(v.dtype == FLOAT for node in ir.traversal.RecursiveGraphIterator(g)
               for v in (*node.inputs, *node.outputs) if v is not None):
        return "the model has no float32 tensors; nothing to convert"
    return ""


def _const_magnitude(value: ir.Value) -> float | None:
    """max |x| of an initializer or Constant-node output (known exactly), else None."""
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and is_standard(producer):
        attr = producer.attributes.get("value") or producer.attributes.get("value_float") \
            or producer.attributes.get("value_floats")
        if attr is None:
            return None
        tensor = attr.value
    if tensor is None:
        return None
    arr = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float64)
    return float(np.max(np.abs(arr))) if arr.size else 0.0


class _Planner:
    """Colours nodes (fp16 / kept fp32 with a reason); no mutation."""

    def __init__(self, model: ir.Model, op_block: frozenset, node_block: frozenset, limit: float,
                 ranges: Mapping[str, float], budget: Mapping[str, str] | None = None):
        self.model, self.op_block, self.node_block, self.limit = model, op_block, node_block, limit
        self.ranges, self.budget = ranges, budget or {}
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.kept: dict[ir.Node, Kept] = {}
        self.fp16: set[ir.Node] = set()

    def fixed_slots(self, node: ir.Node) -> tuple[set[int], set[int]]:
        """(input, output) slots that stay float32 even when ``node`` is fp16."""
        ins, outs = schema_fixed_slots(node.op_type, self.opset, node.domain, len(node.inputs), len(node.outputs)) \
            if is_standard(node) else (set(), set())
        return ins | FP32_SLOTS.get(node.op_type, set()), outs | FLOAT_OUTPUTS.get(node.op_type, set())

    def type_constraint(self, node: ir.Node) -> str:
        """Why the schema forbids float16 in every float slot of ``node`` ("" when one allows it)."""
        fixed_in, fixed_out = self.fixed_slots(node)
        ins, _ = self.float_slots(node)
        outs = [i for i, v in enumerate(node.outputs) if v.dtype == FLOAT]
        if not (ins or outs) or any(i not in fixed_in for i, _ in ins) or any(i not in fixed_out for i in outs):
            return ""
        return f"the ONNX schema of {node.op_type} (opset {self.opset}) does not allow float16 there"

    def need(self, node: ir.Node, slot: int) -> ir.DataType | None:
        """The type ``node`` wants at input ``slot`` when that input was float32 (None: any)."""
        if slot in ANY_TYPE_SLOTS.get(node.op_type, set()):
            return None
        if node in self.fp16 and slot not in self.fixed_slots(node)[0]:
            return HALF
        return FLOAT

    def magnitude(self, v: ir.Value) -> float | None:
        exact = _const_magnitude(v)
        if exact is not None:
            return exact
        if v.graph is self.model.graph or (v.producer() is not None and producer_of(v).graph is self.model.graph):
            return self.ranges.get(v.name or "")
        return None

    @staticmethod
    def float_slots(node: ir.Node) -> tuple[list[tuple[int, ir.Value]], list[ir.Value]]:
        """The node's float32 inputs (slot, value) that take part in its compute, and float32 outputs."""
        any_type = ANY_TYPE_SLOTS.get(node.op_type, set())
        ins = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.dtype == FLOAT and i not in any_type]
        return ins, [v for v in node.outputs if v.dtype == FLOAT]

    def is_float_node(self, node: ir.Node) -> bool:
        ins, outs = self.float_slots(node)
        return bool(ins or outs) or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                        for a in node.attributes.values())

    def overflow(self, node: ir.Node) -> str:
        ins, outs = self.float_slots(node)
        for v in [v for _, v in ins] + outs:
            m = self.magnitude(v)
            if m is None:
                continue
            if _const_magnitude(v) is not None:  # known exactly: no margin needed
                if m > FP16_MAX:
                    return f"constant '{v.name}' holds |x| = {m:.4g} > {FP16_MAX:g} (fp16's largest)"
            elif m > self.limit:
                return f"tensor '{v.name}' reaches |x| = {m:.4g} > {self.limit:g}"
        if node.op_type in SQUARING_OPS and ins:
            m = self.magnitude(ins[0][1])
            if node.op_type == "ReduceL2" and outs and self.magnitude(outs[0]) is not None:
                m = self.magnitude(outs[0])
            if m is not None and m * m > self.limit:
                return f"{node.op_type} squares its input internally: max |x|^2 = {m * m:.4g} > {self.limit:g}"
        return ""

    def rule(self, node: ir.Node) -> tuple[str, str] | None:
        """(kind, reason) when the node stays fp32, else None."""
        if not is_standard(node):
            return "custom domain", f"op of the custom domain '{node.domain}'"
        overflow = self.overflow(node)
        subgraphs = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        if subgraphs:
            if overflow:
                return "overflow range", overflow + " (its subgraphs stay float32 too)"
            return "control flow", "holds subgraphs: its edges stay float32, the bodies are converted inside"
        if node.op_type in self.op_block:
            return "op block list", f"{node.op_type} is in the op block list"
        if node.name in self.node_block:
            return "node block list", "named in the node block list"
        if node.name and node.name in self.budget:
            return "accuracy budget", self.budget[node.name]
        constraint = self.type_constraint(node)
        if constraint:
            return "type constraint", constraint
        if overflow:
            return "overflow range", overflow
        if any(v is not None and v.dtype is None for v in (*node.inputs, *node.outputs)):
            return "unknown type", "a tensor's type is unknown (shape inference could not type it)"
        return None

    def colour(self, graph: ir.Graph, inherited: str = "") -> None:
        for node in graph:
            if not self.is_float_node(node):
                continue
            found = ("overflow range", f"inside a subgraph of a node kept float32: {inherited}") if inherited else self.rule(node)
            if found is None:
                self.fp16.add(node)
            else:
                self.kept[node] = Kept(node.name or "", node.op_type, found[0], found[1], graph.name or "")
            for attr in node.attributes.values():
                bodies = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else \
                    list(attr.as_graphs()) if attr.type == ir.AttributeType.GRAPHS else []
                for body in bodies:
                    whole = found is not None and found[0] == "overflow range"
                    self.colour(body, inherited or (present(found)[1] if whole else ""))

    def needs_fp32(self, value: ir.Value) -> bool:
        """Whether ``value`` will be float32 whatever its consumers are (an fp32 producer, a kept
        graph input); constants follow their consumers, so they do not count."""
        producer = value.producer()
        if producer is not None:
            return producer in self.kept or producer.op_type == "Constant"
        return True

    def boundary(self, keep_io: bool) -> None:
        """Demote fp16 nodes that only add Casts: an elementwise node whose float inputs all come
        from fp32 nodes (constants follow their consumers) and whose float outputs all go to fp32
        nodes or float32 graph outputs.  Repeated until nothing changes (a demotion can free a
        neighbour)."""
        changed = True
        while changed:
            changed = False
            for node in [n for n in ir.traversal.RecursiveGraphIterator(self.model.graph) if n in self.fp16]:
                if node.op_type not in HEAVY_OPS and self.squeezed(node, keep_io):
                    self.fp16.discard(node)
                    why = ("a constant read only by float32 nodes" if node.op_type in ("Constant", "ConstantOfShape")
                           else "between float32 neighbours: in fp16 it would only add Casts")
                    self.kept[node] = Kept(node.name or "", node.op_type, "boundary", why,
                                           node.graph.name or "" if node.graph is not None else "")
                    changed = True

    def shared_constants(self, keep_io: bool) -> None:
        """A Constant read by both fp16 and float32 nodes (or a float32 graph output) stays float32,
        like a shared initializer; its fp16 readers get a Cast."""
        for node in [n for n in self.fp16 if n.op_type in CONSTANT_OPS]:
            out = node.outputs[0]
            wants = {self.need(u.node, u.idx) for u in out.uses()} - {None}
            if out.is_graph_output():
                wants.add(HALF if node.graph is self.model.graph and not keep_io else FLOAT)
            if FLOAT in wants:
                self.fp16.discard(node)
                self.kept[node] = Kept(node.name or "", node.op_type, "shared constant",
                                       "a constant read by float32 nodes too: kept float32 (cast for its fp16 readers)",
                                       node.graph.name or "" if node.graph is not None else "")

    def squeezed(self, node: ir.Node, keep_io: bool) -> bool:
        ins, outs = self.float_slots(node)
        if not outs or not all(self.needs_fp32(v) for _, v in ins):
            return False
        if not keep_io and any(v.is_graph_input() and v.graph is self.model.graph for _, v in ins):
            return False
        main_out = any(v.is_graph_output() for v in outs) and node.graph is self.model.graph
        if main_out and not keep_io:
            return False
        consumers = [u.node for v in outs for u in v.uses()]
        if not consumers and not any(v.is_graph_output() for v in outs):
            return False
        return all(c in self.kept or not self.is_float_node(c) for c in consumers)


def convert_model(model: ir.Model, *, keep_io_types: bool = True, op_block_list: Iterable[str] = DEFAULT_OP_BLOCK_LIST,
                  node_block_list: Iterable[str] = (), limit: float = DEFAULT_LIMIT,
                  ranges: Mapping[str, float] | None = None, budget: Mapping[str, str] | None = None) -> Conversion:
    """Convert ``model`` in place (see module docstring); returns what was done, or why not.
    ``budget``: node name -> why the accuracy budget keeps it float32 (``onnxopt.precision.budget``)."""
    reason = decline_reason(model)
    if reason:
        return Conversion(declined=reason)
    untyped = [v for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs if v.type is None]
    if untyped:  # onnx inference types them (sequences stay untyped: their nodes are kept as "unknown type")
        inferred = shapes.infer(model, ort_fallback=False)
        for v in untyped:
            dtype = inferred.dtype(v)
            if dtype is not None:
                v.dtype = dtype
    planner = _Planner(model, frozenset(op_block_list), frozenset(node_block_list), limit, ranges or {}, budget)
    planner.colour(model.graph)
    planner.boundary(keep_io_types)
    planner.shared_constants(keep_io_types)
    result = Conversion(fp16_nodes=len(planner.fp16), kept=list(planner.kept.values()))
    _Rewriter(model, planner, keep_io_types, result).run()
    return result


class _Rewriter:
    """Applies a plan: retypes values, converts constants, inserts and folds Casts."""

    def __init__(self, model: ir.Model, planner: _Planner, keep_io: bool, result: Conversion):
        self.model, self.plan, self.keep_io, self.result = model, planner, keep_io, result
        self.names = FreshNames(model)
        self.casts: dict[tuple[int, ir.DataType, int], ir.Value] = {}
        self.inserted: set[ir.Node] = set()

    def need(self, node: ir.Node, slot: int) -> ir.DataType | None:
        return self.plan.need(node, slot)

    def run(self) -> None:
        originally_float = {id(v) for g in self.model.graphs() for v in self._values(g) if v.dtype == FLOAT}
        self.convert_initializers()
        for node in self.plan.fp16:
            self.retype_node(node)
        if not self.keep_io:
            for v in self.model.graph.inputs:
                if v.dtype == FLOAT and v.const_value is None:
                    v.dtype = HALF
        for graph in list(self.model.graphs()):
            self.insert_casts(graph, originally_float)
        self.fold_pairs()

    @staticmethod
    def _values(graph: ir.Graph):
        yield from graph.inputs
        yield from graph.initializers.values()
        for node in graph:
            yield from (v for v in node.inputs if v is not None)
            yield from node.outputs

    def convert_initializers(self) -> None:
        counts = self.result.initializers
        for graph in self.model.graphs():
            for v in list(graph.initializers.values()):
                if v.dtype != FLOAT or v.const_value is None:
                    continue
                if v.is_graph_input():  # a default the user may override at run time: its type is the interface
                    counts["kept float32 (graph input)"] += 1
                    continue
                slots = [(u.node, u.idx) for u in v.uses()]
                wants = {self.need(n, i) for n, i in slots} - {None}
                if not wants or wants != {HALF} or v.is_graph_output():
                    counts["kept float32"] += 1
                    continue
                half = to_half(v.const_value.numpy(), counts)
                v.const_value = ir.tensor(half, name=v.name)
                v.dtype = HALF
                counts["converted"] += 1

    def retype_node(self, node: ir.Node) -> None:
        fixed = self.plan.fixed_slots(node)[1]
        retyped = [i for i, out in enumerate(node.outputs) if out.dtype == FLOAT and i not in fixed]
        for i in retyped:
            node.outputs[i].dtype = HALF
        schema = _schema(node.op_type, self.plan.opset, "") if retyped and is_standard(node) else None
        for key in DTYPE_ATTRS:
            attr = node.attributes.get(key)
            default = schema.attributes[key].default_value if schema is not None and key in schema.attributes else None
            if attr is not None and attr.type == ir.AttributeType.INT and attr.as_int() == FLOAT.value:
                node.attributes[key] = ir.AttrInt64(key, HALF.value)
            elif attr is None and default is not None and default.HasField("i") and default.i == FLOAT.value:
                node.attributes[key] = ir.AttrInt64(key, HALF.value)  # the float32 default made float16
        if node.op_type in CONSTANT_OPS:
            self.retype_constant(node)

    def retype_constant(self, node: ir.Node) -> None:
        attr = node.attributes.get("value") or node.attributes.get("value_float") or node.attributes.get("value_floats")
        if attr is None:  # ConstantOfShape's default value is a float32 zero
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float16)))
            return
        if attr.type == ir.AttributeType.TENSOR:
            arr = attr.as_tensor().numpy()
            if arr.dtype != np.float32:
                return
        else:
            arr = np.asarray(attr.value, np.float32)
        for key in ("value_float", "value_floats"):
            node.attributes.pop(key, None)
        half = to_half(arr, self.result.initializers)
        self.result.initializers["converted (Constant nodes)"] += 1
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(half, name=node.outputs[0].name))

    def cast_of(self, value: ir.Value, to: ir.DataType, graph: ir.Graph, before: ir.Node | None) -> ir.Value:
        key = (id(value), to, id(graph))
        if key not in self.casts:
            base = (value.name or "v") + ("_fp16" if to == HALF else "_fp32")
            cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", to.value)], name=self.names.node(base + "_cast"),
                           num_outputs=1)
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = self.names.value(base), to, value.shape
            if before is None:
                graph.append(cast)
            else:
                graph.insert_before(before, cast)
            self.inserted.add(cast)
            self.result.casts_inserted += 1
            self.casts[key] = out
        return self.casts[key]

    def insert_casts(self, graph: ir.Graph, originally_float: set[int]) -> None:
        for node in list(graph):
            if node in self.inserted:
                continue
            for slot, v in enumerate(node.inputs):
                if v is None or id(v) not in originally_float:
                    continue
                want = self.need(node, slot)
                if want is not None and v.dtype != want:
                    node.replace_input_with(slot, self.cast_of(v, want, graph, node))
        main = graph is self.model.graph
        want = FLOAT if (self.keep_io or not main) else HALF
        done: dict[int, ir.Value] = {}  # a value listed twice as an output gets one Cast
        for index, v in enumerate(list(graph.outputs)):
            if id(v) in done:
                graph.outputs[index] = done[id(v)]
                continue
            if id(v) not in originally_float or v.dtype == want:
                continue
            if v.is_graph_input() or v.producer() is None:
                continue  # a passed-through input or an initializer output: left as it is
            name, shape = v.name, v.shape
            v.name = self.names.value((name or "out") + ("_fp16" if v.dtype == HALF else "_fp32"))
            cast = ir.Node("", "Cast", [v], [ir.AttrInt64("to", want.value)], name=self.names.node(f"{name}_cast"),
                           num_outputs=1)
            out = cast.outputs[0]
            out.dtype, out.shape = want, shape
            graph.append(cast)
            out.name = name
            graph.outputs[index] = done[id(v)] = out
            self.inserted.add(cast)
            self.result.casts_inserted += 1

    def fold_pairs(self) -> None:
        """Cast(a->b)->Cast(b->a) with a->b lossless widening: the second Cast's users read the
        first's input.  The other direction (a rounding) is kept and counted."""
        for node in list(ir.traversal.RecursiveGraphIterator(self.model.graph)):
            if node.op_type != "Cast" or not is_standard(node) or node.graph is None:
                continue
            first = node.inputs[0].producer() if node.inputs[0] is not None else None
            if first is None or first.op_type != "Cast" or not is_standard(first) or first.inputs[0] is None:
                continue
            a, b, c = first.inputs[0].dtype, first.outputs[0].dtype, node.outputs[0].dtype
            if a is None or b is None or c != a or {first.name, node.name} & self.plan.node_block:
                continue  # a Cast the user named in the node block list stays
            if (a, b) not in LOSSLESS_WIDENING:
                if (a, b) == (FLOAT, HALF):
                    self.result.lossy_pairs_kept += 1
                continue
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(first.inputs[0])
            graph_of(node).remove(node, safe=True)
            self.result.casts_folded += 1
            if not first.outputs[0].uses() and not first.outputs[0].is_graph_output():
                graph_of(first).remove(first, safe=True)
                self.result.casts_folded += 1


class ConvertFloat16(OptPass):
    """Mixed-precision fp16 (float32 I/O kept, block list, overflowing tensors in float32; lossy: validate with fp16 tolerances).

    In a pipeline (data-free): ranges only from constants and initializers, which are known
    exactly; ``optimize`` checks it with the fp16 tolerances and, on the CPU EP, the fp16-faithful
    check (``onnxopt.precision.convert.Fp16Check``); ``onnxopt convert --fp16 --data`` adds ranges observed on
    data.  Options:
    ``keep-io-types``, ``op-block-list`` (``|``-separated op types, ``default`` = the defaults),
    ``node-block-list`` (``|``-separated names), ``limit`` (largest |x| kept in fp16).  See the
    module docstring for the full contract.
    """

    name = "convert-fp16"

    def __init__(self, keep_io_types: bool = True, op_block_list: str = "default", node_block_list: str = "",
                 limit: float = DEFAULT_LIMIT):
        super().__init__()
        self.keep_io_types = keep_io_types
        self.op_block_list = parse_list(op_block_list, DEFAULT_OP_BLOCK_LIST)
        self.node_block_list = parse_list(node_block_list)
        self.limit = limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        done = convert_model(model, keep_io_types=self.keep_io_types, op_block_list=self.op_block_list,
                             node_block_list=self.node_block_list, limit=self.limit)
        if done.declined:
            return self.result(model, collections.Counter(), collections.Counter({done.declined: 1}))
        changed = collections.Counter({"nodes to fp16": done.fp16_nodes, "casts inserted": done.casts_inserted,
                                       "cast pairs folded": done.casts_folded})
        skipped = collections.Counter(f"kept fp32 ({k.kind})" for k in done.kept)
        return self.result(model, changed, skipped)

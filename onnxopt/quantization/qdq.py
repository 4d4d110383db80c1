"""quantize-qdq: insert QuantizeLinear/DequantizeLinear pairs from calibration ranges.

Planning (``plan``) and insertion (``QuantizeQDQ``) are separate so the quantize command can
re-plan cheaply with some layers kept in float (latency guard, accuracy budget) and insert again
on a fresh copy of the prepared float model.

Placement follows the target EP's ``Profile``:

- *primary* ops with a constant weight (Conv, Gemm, 2-D-weight MatMul) are quantized: weights int8
  symmetric per output channel (per tensor below opset 13), the activation input and output
  through Q/DQ, a constant bias as int32 with scale ``s_x * s_w`` (zero point 0);
- a ReLU (or Clip(0, c)) that is the sole user of a quantized output is absorbed into the output's
  Q (asymmetric activations only): the range starts at exactly 0, so the zero point is the lowest
  code and the clamp is exact;
- *secondary* ops the EP runs in int8 (Add, Mul, Concat, pooling) are quantized only when every
  activation input is already quantized, so they never add a float->int8 transition;
- *shared-scale* ops (MaxPool, Reshape, Transpose, ...) whose input is quantized get Q/DQ on the
  output with the *same* scale and zero point, and Concat's inputs and output share one scale, so
  the EP drops the pairs and no requantization appears.  Ranges are unioned over each group.

Only the main graph is quantized; If/Loop bodies and custom-domain ops stay float.
Cost: O(nodes + weights) per plan and per insertion.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.base import OptPass, add_initializer, constant, is_constant, is_standard, name_of, node_name, present, tensor_of
from onnxopt.errors import UsageError

QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                       "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                       "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger",
                       "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention"})
PRIMARY = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a target EP runs in int8 (from ORT's QDQ fusion rules and the EPs' documentation)."""

    name: str
    activation: str = "uint8"  # uint8 (asymmetric) or int8 (symmetric, zero point 0)
    secondary: frozenset = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"})
    shared: frozenset = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
    #: layer kinds left in float from the start because the EP runs them slower in int8
    float_kinds: frozenset = frozenset()
    #: an output gets its Q/DQ pair only where an int8 consumer reads it (OpenVINO: its low-precision
    #: transformations run an op in int8 from the DequantizeLinear on its inputs, NNCF's placement);
    #: False keeps every quantized op's output pair (the CPU EP fuses DQ -> op -> Q into QLinear ops)
    consumed_outputs_only: bool = False

    @property
    def symmetric(self) -> bool:
        return self.activation == "int8"


PROFILES = {
    # ORT CPU EP: u8 activations x s8 weights (MLAS); depthwise QLinearConv is slower than fp32
    # (0.58x measured, issue 6), so depthwise starts in float; the latency guard decides the rest.
    "cpu": Profile("cpu", float_kinds=frozenset({"depthwise"})),
    "openvino": Profile("openvino", consumed_outputs_only=True),
    "cuda": Profile("cuda", activation="int8"),
    "tensorrt": Profile("tensorrt", activation="int8"),
}


def quant_ops(model: ir.Model) -> collections.Counter:
    """Quantization ops already in the model (any graph), by op type."""
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)
                               if n.op_type in QUANT_OPS)


def layer_kind(node: ir.Node) -> str | None:
    """depthwise / pointwise / conv / gemm for a quantizable primary node, else None."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_standard(node) or node.op_type not in PRIMARY or not is_constant(w) or w.dtype != ir.DataType.FLOAT:
        return None
    if is_constant(node.inputs[0]) or (len(node.inputs) > 2 and node.inputs[2] is not None and not is_constant(node.inputs[2])):
        return None
    shape = tensor_of(w).shape
    if node.op_type == "Conv":
        if len(shape) not in (3, 4, 5) or node.attributes.get("auto_pad") is not None and \
                node.attributes["auto_pad"].as_string() not in ("NOTSET", ""):
            return None
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        if group > 1 and shape[1] == 1:
            return "depthwise"
        if group > 1:
            return None
        return "pointwise" if all(k == 1 for k in shape[2:]) else "conv"
    if len(shape) != 2:
        return None
    if node.op_type == "Gemm":
        a = node.attributes
        if (a["transA"].as_int() if "transA" in a else 0) or (a["alpha"].as_float() if "alpha" in a else 1.0) != 1.0:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if (a["beta"].as_float() if "beta" in a else 1.0) != 1.0 or constant(node.inputs[2]).ndim > 1:
                return None
    return "gemm"


def weight_axis(node: ir.Node) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if "transB" in node.attributes and node.attributes["transB"].as_int() else 1
    return 1  # MatMul [K, N]


def absorbable(value: ir.Value, profile: Profile) -> ir.Node | None:
    """The ReLU / Clip(0, c) that alone reads ``value``, when its clamp can live in the Q."""
    if profile.symmetric or value.is_graph_output():
        return None
    users = list(value.uses())
    if len(users) != 1:
        return None
    node = users[0].node
    if not is_standard(node) or node.outputs[0].is_graph_output():
        return None
    if node.op_type == "Relu":
        return node
    if node.op_type == "Clip":
        lo = clip_bound(node, 1, "min")
        if lo is not None and lo == 0.0 and clip_bound(node, 2, "max") is not None:
            return node
    return None


def clip_bound(node: ir.Node, index: int, attr: str) -> float | None:
    if attr in node.attributes:
        return node.attributes[attr].as_float()
    if len(node.inputs) > index and node.inputs[index] is not None:
        arr = constant(node.inputs[index])
        return None if arr is None else float(arr)
    return None


@dataclasses.dataclass
class Plan:
    """Where Q/DQ goes.  ``points``: quantized value name -> (stats name, clamp hi or None, absorbed
    node name or None); ``groups``: value name -> group root (shared scale); ``targets``: primary
    and secondary nodes in graph order; ``kinds``: primary node name -> layer kind."""

    targets: list[str]
    kinds: dict[str, str]
    points: dict[str, tuple[str, float | None, str | None]]
    groups: dict[str, str]
    excluded: frozenset
    alias: dict[str, str] = dataclasses.field(default_factory=dict)

    def stats_names(self) -> list[str]:
        return sorted({s for s, _, _ in self.points.values()})

    def primary(self) -> list[str]:
        return [t for t in self.targets if t in self.kinds]

    def weighted(self) -> list[str]:
        """The primary nodes with a constant weight (not ``attention`` MatMuls)."""
        return [t for t in self.primary() if self.kinds[t] != "attention"]

    def describe(self) -> dict:
        return {"quantized": len(self.targets), "quantized_layers": len(self.primary()),
                "float_layers": sorted(self.excluded), "kinds": dict(collections.Counter(self.kinds.values()))}


def activation_matmul(node: ir.Node) -> bool:
    """A MatMul of two float activations (attention's Q x K^T and P x V): the CPU EP runs it in int8
    when both inputs come through Q/DQ (MatMulIntegerToFloat, or QLinearMatMul)."""
    if node.op_type != "MatMul" or not is_standard(node) or len(node.inputs) != 2:
        return False
    return all(v is not None and not is_constant(v) and (v.dtype is None or v.dtype == ir.DataType.FLOAT)
               for v in node.inputs)


def node_kind(node: ir.Node) -> str | None:
    """layer_kind, or ``attention`` for an activation x activation MatMul."""
    return layer_kind(node) or ("attention" if activation_matmul(node) else None)


def candidates(model: ir.Model) -> dict[str, str]:
    """Primary node name -> layer kind, for every quantizable layer of the main graph."""
    return {node_name(n): k for n in model.graph if (k := node_kind(n)) is not None}


def plan(model: ir.Model, profile: Profile, exclude=frozenset()) -> Plan:
    """Placement for ``model`` (its main graph, every node named) with the primary nodes named in
    ``exclude`` kept in float.  Cost: O(nodes).  (One walk over the graph assigning each node its
    role; kept in one function so the placement rules read in order.)"""
    exclude = frozenset(exclude)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    points: dict[str, tuple[str, float | None, str | None]] = {}
    absorbed: set[str] = set()
    alias: dict[str, str] = {}  # output of an absorbed ReLU -> the quantized value that replaces it
    targets: list[str] = []
    kinds: dict[str, str] = {}

    def point(name: str) -> str | None:
        name = alias.get(name, name)
        return name if name in points else None

    def quantize_output(node: ir.Node) -> None:
        out = node.outputs[0]
        if out.is_graph_output():
            return
        act = absorbable(out, profile)
        if act is None:
            points[name_of(out)] = (name_of(out), None, None)
        else:
            hi = clip_bound(act, 2, "max") if act.op_type == "Clip" else None
            points[name_of(out)] = (name_of(act.outputs[0]), hi, act.name)
            alias[name_of(act.outputs[0])] = name_of(out)
            absorbed.add(node_name(act))

    def floats(node: ir.Node) -> list[ir.Value]:
        return [v for v in node.inputs if v is not None and not is_constant(v)
                and (v.dtype is None or v.dtype == ir.DataType.FLOAT)]

    for node in model.graph:
        if not is_standard(node):
            continue
        kind = node_kind(node)
        if node.name in absorbed:
            continue
        if kind == "attention" and node.name not in exclude:  # both inputs through Q/DQ, the output float
            for x in node.inputs:
                if point(name_of(x)) is None:
                    points[name_of(x)] = (name_of(x), None, None)
            targets.append(node_name(node))
            kinds[node_name(node)] = kind
        elif kind is not None and node.name not in exclude:
            x = node.inputs[0]
            if point(name_of(x)) is None:
                points[name_of(x)] = (name_of(x), None, None)
            targets.append(node_name(node))
            kinds[node_name(node)] = kind
            quantize_output(node)
        elif node.op_type in profile.secondary and all(point(name_of(v)) for v in floats(node)) and floats(node) \
                and len(floats(node)) == len([v for v in node.inputs if v is not None]):
            targets.append(node_name(node))
            quantize_output(node)
            if node.op_type == "Concat":
                for v in node.inputs:  # every input has a point (checked above)
                    union(present(point(name_of(v))), name_of(node.outputs[0]))
        elif node.op_type in profile.shared and node.inputs and node.inputs[0] is not None \
                and point(name_of(node.inputs[0])) and len(node.outputs) == 1 and not node.outputs[0].is_graph_output():
            out = node.outputs[0]
            points[name_of(out)] = (name_of(out), None, None)
            union(name_of(out), present(point(name_of(node.inputs[0]))))  # checked just above
    if profile.consumed_outputs_only:
        _drop_unread_outputs(model, points, set(targets), alias, profile)
    groups = {name: find(name) for name in points}
    return Plan(targets, kinds, points, groups, exclude, alias)


def _drop_unread_outputs(model: ir.Model, points: dict, targets: set[str], alias: dict[str, str],
                         profile: Profile) -> None:
    """Remove the Q/DQ points no int8 op reads: a point stays when a consumer of its value (or of the
    absorbed activation's output that aliases it) is a quantized target, or a shared-scale op whose own
    output point stays.  Walks the graph backwards once: O(nodes + edges)."""
    readers: dict[str, list[ir.Node]] = collections.defaultdict(list)
    for node in model.graph:
        for v in node.inputs:
            if v is not None and v.name:
                readers[alias.get(v.name, v.name)].append(node)
    for node in reversed(list(model.graph)):
        for out in node.outputs:
            name = name_of(out)
            if name not in points:
                continue
            wanted = any(r.name in targets or (r.op_type in profile.shared and r.outputs and
                                              name_of(r.outputs[0]) in points) for r in readers.get(name, ()))
            if not wanted:
                del points[name]


def activation_params(lo: float, hi: float, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32 scalar) and zero point (uint8/int8 scalar) for the range [lo, hi] ∋ 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if profile.symmetric:
        scale = max(abs(lo), abs(hi)) / 127.0 or 1.0
        return np.float32(scale), np.int8(0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


#: environment variable overriding the VNNI check of :func:`weight_qmax`
VNNI_ENV = "ONNXOPT_VNNI"


def weight_qmax(ep: str) -> int:
    """127, or 63 for the CPU EP on x86 CPUs without VNNI: MLAS's u8 x s8 kernel there adds pairs
    of products in int16 (vpmaddubsw), which saturates unless weights fit in 7 bits (measured: a
    QLinearConv with 8-bit weights differed from its QDQ reference by 1.3 on outputs of +-5; with
    7-bit weights they are bit-identical).

    ``ONNXOPT_VNNI=1`` / ``ONNXOPT_VNNI=0`` overrides the CPU check (as on a CPU with / an AVX2 CPU
    without VNNI), so one machine can produce, and the tests can check, either kind of result."""
    if ep != "cpu":
        return 127
    forced = os.environ.get(VNNI_ENV, "").strip()
    if forced in ("0", "1"):
        return 127 if forced == "1" else 63
    if forced:
        raise UsageError(f"{VNNI_ENV}={forced!r}: expected 1 (8-bit weights, as with VNNI) or 0 (7-bit, as without)")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 127
    if "avx2" not in flags:
        return 127
    return 127 if ("avx512_vnni" in flags or "avx_vnni" in flags or "amx" in flags) else 63


def weight_params(w: np.ndarray, axis: int | None, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: (quantized int8 array, float32 scale per channel along ``axis``, or
    a scalar when ``axis`` is None)."""
    if axis is None:
        scale = np.float32(np.abs(w).max() / qmax or 1.0)
        return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8), scale
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=red) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8), scale


class QuantizeQDQ(OptPass):
    """Insert QuantizeLinear/DequantizeLinear pairs per a Plan and calibration ranges (int8 weights, int32 bias)."""

    name = "quantize-qdq"

    def __init__(self, the_plan: Plan, ranges: dict[str, tuple[float, float]], profile: Profile,
                 per_channel: bool = True, qmax: int | None = None, weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        self.plan, self.ranges, self.profile = the_plan, ranges, profile
        self.per_channel = per_channel
        self.weight_qmax = qmax if qmax is not None else weight_qmax(profile.name)
        #: optional pre-quantized int8 weights by node name (rounding chosen by a recovery pass)
        self.weights = weights or {}

    def group_range(self) -> dict[str, tuple[float, float]]:
        out: dict[str, list[float]] = {}
        for name, (stats, hi_clip, absorbed) in self.plan.points.items():
            lo, hi = self.ranges[stats]
            if absorbed is not None:
                lo = 0.0
                hi = min(hi, hi_clip) if hi_clip is not None else hi
            root = self.plan.groups[name]
            r = out.setdefault(root, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return {name: (out[self.plan.groups[name]][0], out[self.plan.groups[name]][1]) for name in self.plan.points}

    def call(self, model: ir.Model):
        graph = model.graph
        changed: collections.Counter = collections.Counter()
        ranges = self.group_range()
        nodes = {n.name: n for n in graph}
        values = {v.name: v for v in graph.inputs}
        for n in graph:
            for o in n.outputs:
                values[o.name] = o
        params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.plan.points:
            params[name] = activation_params(*ranges[name], self.profile)
        # weights and biases first (bias needs the input scale)
        for tname in self.plan.weighted():
            node = nodes[tname]
            s_x = params[self.plan.alias.get(name_of(node.inputs[0]), name_of(node.inputs[0]))][0]
            axis = weight_axis(node) if self.per_channel else None
            w = tensor_of(node.inputs[1]).numpy().astype(np.float32)
            q, s_w = self.weights.get(tname, (None, None))
            if q is None:
                q, s_w = weight_params(w, axis, self.weight_qmax)
            node.replace_input_with(1, self._dq(graph, f"{tname}_w", q, s_w, np.zeros_like(s_w, np.int8), axis, node))
            changed["weights"] += 1
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                b = constant(node.inputs[2]).astype(np.float64).reshape(-1)
                s_b = (np.float64(s_x) * present(s_w).astype(np.float64))  # s_w is set with q
                b_q = np.clip(np.round(b / s_b), -(2**31) + 1, 2**31 - 1).astype(np.int32)
                node.replace_input_with(2, self._dq(graph, f"{tname}_b", b_q, s_b.astype(np.float32),
                                                    np.zeros_like(s_b, np.int32), 0 if np.ndim(s_b) else None, node))
                changed["biases"] += 1
        for name, (_stats, _, absorbed) in self.plan.points.items():
            value = values[name]
            scale, zp = params[name]
            s = add_initializer(graph, f"{name}_scale", np.asarray(scale))
            z = add_initializer(graph, f"{name}_zero_point", np.asarray(zp))
            users = [(u.node, u.idx) for u in value.uses()]  # before the Q below becomes one
            qn = ir.node("QuantizeLinear", [value, s, z], name=f"{name}_QuantizeLinear")
            dq = ir.node("DequantizeLinear", [qn.outputs[0], s, z], name=f"{name}_DequantizeLinear")
            qn.outputs[0].name, dq.outputs[0].name = f"{name}_quantized", f"{name}_dequantized"
            qn.outputs[0].type = ir.TensorType(ir.DataType.UINT8 if zp.dtype == np.uint8 else ir.DataType.INT8)
            dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
            anchor = value.producer()
            if anchor is not None:
                graph.insert_after(anchor, [qn, dq])
            else:
                graph.insert_before(graph[0], [qn, dq])
            for user, idx in users:
                user.replace_input_with(idx, dq.outputs[0])
            if absorbed is not None:
                act = nodes[absorbed]
                act.outputs[0].replace_all_uses_with(dq.outputs[0])
                graph.remove(act, safe=True)
                changed["activations absorbed"] += 1
            changed["qdq pairs"] += 1
        graph.sort()
        return self.result(model, changed)

    def _dq(self, graph, name, q, scale, zp, axis, node) -> ir.Value:
        qv = add_initializer(graph, f"{name}_quantized", q)
        sv = add_initializer(graph, f"{name}_scale", np.asarray(scale))
        zv = add_initializer(graph, f"{name}_zero_point", np.asarray(zp))
        attrs = {"axis": axis} if axis is not None and np.ndim(scale) else {}
        dq = ir.node("DequantizeLinear", [qv, sv, zv], attrs, name=f"{name}_DequantizeLinear")
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = ir.Shape(q.shape)
        graph.insert_before(node, dq)
        return dq.outputs[0]

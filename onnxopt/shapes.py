"""Shape inference that never fails the run and never trusts declared intermediate/output shapes.

``infer(model)`` serializes the model (external weights stay references, nothing is loaded),
*removes* every declared value_info and the declared dims of graph outputs, and runs onnx shape
inference (non-strict, with data propagation).  Declared shapes can be wrong (onnxslim trusted
a wrong declared output shape and changed two real models' outputs); only graph-input
declarations, initializers and the ops themselves are believed.  The result is a side table
name -> dims; the model is not modified.  When inference fails the table is empty and passes
that need shapes simply find nothing to do.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.base import light_proto, name_of

logger = logging.getLogger(__name__)

Dim = int | str | None  # int: static; str: symbolic name; None: unknown


class Shapes:
    """Inferred dims by value name (names are unique per model in valid ONNX)."""

    def __init__(self, table: dict[str, tuple[Dim, ...]], dtypes: dict[str, int] | None = None):
        self._table = table
        self._dtypes = dtypes or {}

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        """Element type: constants and graph inputs as declared, everything else as inferred."""
        if value is None:
            return None
        if value.const_value is not None:
            return value.const_value.dtype
        if value.is_graph_input():
            return value.dtype
        code = self._dtypes.get(name_of(value))
        return ir.DataType(code) if code else None

    def __len__(self) -> int:
        return len(self._table)

    def forget(self, value: ir.Value) -> None:
        """Drop what is known of ``value``'s dims: a rewrite changed them (its rank is unknown from
        now on, until the table is inferred again)."""
        self._table.pop(name_of(value), None)

    def get(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        """Dims of ``value`` (None when its rank is unknown).  Graph inputs use their declaration."""
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        if value.is_graph_input() and value.shape is not None:
            return tuple(_dim(d) for d in value.shape)
        return self._table.get(name_of(value))


def _dim(d) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if value else None


def _proto_dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _strip(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip(g)


def _collect(graph: onnx.GraphProto, table: dict, seen: set, dtypes: dict) -> None:
    for vi in list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            dtypes[vi.name] = vi.type.tensor_type.elem_type
        dims = _proto_dims(vi.type)
        if dims is None:
            continue
        if vi.name in seen and table.get(vi.name) != dims:
            table.pop(vi.name, None)  # same name in two scopes with different shapes: unknown
            continue
        seen.add(vi.name)
        table[vi.name] = dims
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect(attr.g, table, seen, dtypes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _collect(g, table, seen, dtypes)


def infer(model: ir.Model, ort_fallback: bool = True) -> Shapes:
    """onnx inference; main-graph values it leaves without a rank or with unknown dims are filled
    from ORT runs (see :func:`ort_shapes`).  Cost: one serialization and one onnx inference run, plus two ORT
    runs of the model only when onnx inference fails or leaves gaps."""
    table: dict[str, tuple[Dim, ...]] = {}
    dtypes: dict[str, int] = {}
    try:
        proto, _ = light_proto(model)  # inference reads no weights: leaving them out is 4x faster
        _strip(proto.graph)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        _collect(inferred.graph, table, set(), dtypes)
    except Exception as e:  # noqa: BLE001 - inference must never fail the run
        logger.info("onnx shape inference failed (%s)", str(e).splitlines()[0][:200])
    missing = [o.name for n in model.graph for o in n.outputs
               if o.name and (o.name not in table or any(_gap(d) for d in table[o.name]))]
    symbolic = any(not isinstance(d, int) for v in model.graph.inputs if v.shape is not None for d in v.shape)
    if symbolic:  # ORT can only add ranks then (see ort_shapes): ask only about values with none
        missing = [name for name in missing if name not in table]
    if missing and ort_fallback:
        for name, dims in ort_shapes(model, missing).items():
            known = table.get(name)
            if known is not None and len(known) == len(dims):  # keep what onnx knew, fill its gaps
                dims = tuple(k if not _gap(k) or d is None else d for k, d in zip(known, dims))
            table[name] = dims
    return Shapes(table, dtypes)


def _gap(d: Dim) -> bool:
    """Unknown, or a name onnx inference made up ("unk__N") for a dim it could not resolve."""
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


#: Ops whose output dims are a function of their input *dims* and attributes only, never of the
#: values of any input (standard domain unless a domain is given).  An op in neither this table nor
#: SHAPE_INPUTS is treated as data-dependent: a probe run proves nothing about its output dims.
SHAPE_FROM_DIMS = frozenset({
    # elementwise, unary
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "CastLike", "Ceil", "Celu",
    "Clip", "Cos", "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "PRelu", "Reciprocal", "Relu",
    "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
    "ThresholdedRelu", "Trilu", "CumSum", "EyeLike", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
    # elementwise with broadcasting
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "Sub", "Sum",
    "Where", "Xor",
    # linear algebra, convolution, pooling, normalization
    "Conv", "ConvInteger", "ConvTranspose", "QLinearConv", "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm",
    "Einsum", "Det", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "RMSNormalization", "LRN", "Softmax", "LogSoftmax",
    "Hardmax", "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "LSTM", "GRU", "RNN", "GridSample",
    # layout and indexing whose output dims come from input dims (indices' shape, not values)
    "Flatten", "Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Scatter", "ScatterElements",
    "ScatterND", "DepthToSpace", "SpaceToDepth", "ArgMax", "ArgMin", "ReverseSequence", "Shape", "Size",
    "Reshape", "Squeeze", "Unsqueeze",  # with their shape/axes input checked through SHAPE_INPUTS
}) | frozenset(f"com.microsoft:{op}" for op in (
    "FusedConv", "FusedGemm", "FusedMatMul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
    "LayerNormalization", "BiasSoftmax", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearGlobalAveragePool", "QLinearConcat", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"))
#: Inputs whose *values* set the output's dims (or rank).  A probe run proves those dims only when
#: such an input carries no graph-input data (it is computed from constants and static dims).
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Range": (0, 1, 2), "ConstantOfShape": (0,),
                "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
                "OneHot": (1,), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1, 2),
                "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
                "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
                "ReduceSumSquare": (1,), "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,),
                "DFT": (1, 2), "STFT": (1, 3), "MelWeightMatrix": (0, 1, 2), "Col2Im": (1, 2), "AffineGrid": (1,),
                "MaxUnpool": (2,)}
#: Ops whose output dims depend on input values whatever feeds them (kept for readers: everything
#: outside SHAPE_FROM_DIMS and SHAPE_INPUTS is treated like these).
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress", "Loop", "If", "Scan",
                            "StringSplit", "RoiAlign", "ImageDecoder", "RegexFullMatch", "StringConcat"})
ORT_FALLBACK_WEIGHT_LIMIT = 256 << 20


def ort_shapes(model: ir.Model, names: list[str]) -> dict[str, tuple[Dim, ...]]:
    """Shapes of main-graph values measured by running the model once on ORT, kept only where the
    measurement is a proof.

    A probe run shows the dims for *its* inputs only.  They are facts when the model's inputs are
    fully static and every op between the inputs and the value has output dims that follow from
    its input dims (SHAPE_FROM_DIMS, with SHAPE_INPUTS fed only by constants and static dims): then
    every run has the same dims.  Values below anything else (NonZero, Reduce* with ``axes`` fed by
    data, windows with a data size, unknown or custom ops, ...) get *no* entry, not even a rank
    (a Reshape's rank is its data-fed target's length).  With symbolic input dims a measurement
    cannot tell a static dim from one that merely coincides for the sizes tried (``width // 4`` is
    0 for both 2 and 3), so only ranks are returned, and only where no dim-derived value decides
    one.  Skipped (empty result) for models with external data or over 256 MB of weights, and when
    ORT cannot run the model."""
    from onnxopt import runtime  # runtime imports nothing from here; local to keep shapes light

    if any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()):
        return {}
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights > ORT_FALLBACK_WEIGHT_LIMIT:
        return {}
    try:
        sess = runtime.session(runtime.with_outputs(ir.to_proto(model), names), optimize=False)
        static = all(isinstance(d, int) and d >= 0 for inp in sess.get_inputs() for d in inp.shape or [])
        outs = runtime.run(sess, runtime.synthesize(sess, quiet=True), names)
    except Exception as e:  # noqa: BLE001 - a fallback must never fail the run
        logger.info("ORT shape fallback unavailable (%s)", str(e).splitlines()[0][:200])
        return {}
    tainted = data_dependent_values(model, symbolic=not static)
    result: dict[str, tuple[Dim, ...]] = {}
    for name, value in outs.items():
        if not isinstance(value, np.ndarray) or name in tainted:
            continue
        result[name] = tuple(int(d) if static else None for d in value.shape)
    return result


def _captured(node: ir.Node) -> list[str]:
    """Names the node's subgraphs (recursively) read from outside themselves: an If branch reading
    an outer tensor carries its data as surely as an explicit input."""
    found = []
    for attr in node.attributes.values():
        graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.as_graphs()) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                found += [v.name for v in inner.inputs if v is not None and v.name]
    return found


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def data_dependent_values(model: ir.Model, symbolic: bool = False) -> set[str]:
    """Main-graph values whose dims (or rank) may differ between two runs with inputs of the same shape.

    A value *carries data* when it is computed from graph inputs' values (read explicitly or, by
    an If/Loop/Scan body, from the outer scope); ``Shape``/``Size`` of a
    tensor with data-independent dims carries none (with ``symbolic`` input dims every Shape/Size
    carries: its value changes with the input sizes).  Dims are data-dependent below an op outside
    SHAPE_FROM_DIMS/SHAPE_INPUTS (NonZero, Loop, custom ops, ...) that reads data, where a
    data-carrying value reaches one of an op's SHAPE_INPUTS, where a Squeeze without axes sees
    symbolic dims, and downstream of such dims.  O(nodes)."""
    carries = {v.name for v in model.graph.inputs}
    dynamic: set[str] = set()
    for node in model.graph:
        ins = list(node.inputs)
        names = [v.name for v in ins if v is not None] + _captured(node)
        key = _op_key(node)
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            data = symbolic or (bool(ins) and ins[0] is not None and ins[0].name in dynamic)
        else:
            data = any(n in carries for n in names)
        known = key in SHAPE_FROM_DIMS or key in SHAPE_INPUTS
        dyn = (any(n in dynamic for n in names)
               or (not known and data)
               or any(i < len(ins) and ins[i] is not None and name_of(ins[i]) in carries
                      for i in SHAPE_INPUTS.get(key, ()))
               or (symbolic and key == "Squeeze" and len(names) < 2 and "axes" not in node.attributes))
        for out in node.outputs:
            if out.name:
                if data:
                    carries.add(out.name)
                if dyn:
                    dynamic.add(out.name)
    return dynamic

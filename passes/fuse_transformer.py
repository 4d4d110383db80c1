"""fuse-transformer: attention/LayerNorm/GELU fusions into ONNX Runtime's com.microsoft ops, on the
exports of both PyTorch exporters, validated like every pass."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io as io_mod
import logging
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
    count_nodes,
    is_constant,
    op_histogram,
)
from onnxopt.errors import BadInputError, UsageError
from onnxopt.fusions import (
    fuse_fast_gelu,
    fuse_rotary_embedding,
    fuse_simplified_layer_norm,
)

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


def _no_gqa(work: ir.Model, fused: ir.Model) -> str | None:
    """Why grouped-query attention (fewer key/value heads than query heads) became MultiHeadAttention
    over repeated key/value heads, not GroupQueryAttention; None when it did not."""
    kv_heads = detect_heads(work)[0]
    mha = [n for n in fused.graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    heads = max((n.attributes.get_int("num_heads", 0) for n in mha), default=0)
    if not kv_heads or heads <= kv_heads or any(n.op_type == "GroupQueryAttention" for n in fused.graph):
        return None
    return (f"grouped-query attention ({heads} query / {kv_heads} key-value heads) fused as MultiHeadAttention over "
            f"repeated key/value heads, not GroupQueryAttention: onnxscript's GroupQueryAttention rule matches "
            f"a purely causal mask, and this model's attention takes its attention-mask input (padding), which "
            f"GroupQueryAttention's CPU kernel reads only as per-row lengths")


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


def _copy(model: ir.Model, proto=None) -> ir.Model:
    """A deep copy through a protobuf (a clone shares tensors, whose names the libraries' passes
    rename): weights still in an external-data file stay references to it (the protobuf holds only
    the graph; the copy's references keep their folder)."""
    return io.from_proto(ir.to_proto(model) if proto is None else proto, io.external_folder(model))


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
    return _copy(model, inferred if inferred is not None else proto)


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
#: engines that need the weights inside a protobuf (not run when they stay in an external-data file)
PROTOBUF_ENGINES = frozenset({"onnxruntime"})
#: external-data weights up to this are loaded for the fusions (every engine runs); above, they stay on disk
LOAD_BELOW = 1 << 30
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
    Weights over LOAD_BELOW (1 GiB) in an external-data file stay there: the engines see the graph,
    candidates are graph copies referencing the same file, and ORT gets the arrays memory-mapped
    (``runtime.Light``); the ``onnxruntime`` engine, which needs the weights in a protobuf, is not
    run then.  Declines only weights over 2 GB held in memory.  Cost: a few fusion runs and ORT
    sessions on the model.
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

        return pipeline.run(_copy(model), pipeline.parse(PREPARE)).model

    def _candidates(self, work: ir.Model, model_type: str, heads: int, hidden: int,
                    skipped: collections.Counter) -> list[Candidate]:
        out = []
        for where, source in (("as exported", lambda: work), ("after " + PREPARE, lambda: self._prepared(work))):
            base = source()
            for engine in ENGINES_ON[where.split(" ")[0]]:
                fuse, label = ENGINES[engine], f"{engine} ({where})"
                if engine in PROTOBUF_ENGINES and io.external_folder(base) is not None:
                    skipped[f"{label}: not run on weights in an external-data file (it needs them in a protobuf)"] += 1
                    continue
                try:
                    with _quiet_libraries():
                        fused = fuse(_copy(base), model_type, heads, hidden)
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

        source = runtime.source_of(work)
        try:
            if self.feeds is None:
                checker = validate.Validator(source, tolerance=validate.default_tolerance(work))  # type: ignore[arg-type]
                return [(p.feeds, p.reference) for p in checker.points if p.reference is not None]
            sess = runtime.session(source)
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
                sess = runtime.session(runtime.source_of(c.model))
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
        on_disk = io.external_folder(model) is not None
        if io.weight_bytes(model) - sum(t.nbytes for _, t in io.external_tensors(model)) > io.EXTERNAL_DATA_THRESHOLD:
            skipped["weights over 2 GB held in memory: the fusions need them in a protobuf "
                    "(save the model with external data)"] += 1
            return self.result(model.clone(), collections.Counter(), skipped)
        work = model.clone()
        if not on_disk or io.weight_bytes(model) <= LOAD_BELOW:
            ir_external_data.load_to_model(work)  # small: in memory, every engine runs
        # weights above LOAD_BELOW stay in their external-data file: the graph is copied, not the weights
        work = _copy(work)
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
        why = _no_gqa(work, chosen.model)
        if why:
            skipped[why] += 1
        return self.result(chosen.model, changed, skipped)

"""``onnxopt quantize``: static int8 QDQ quantization, guarded for latency and accuracy.

The command is a sequence of steps sharing one :class:`Recipe` (what was decided and why; the
report's ``"recipe"``, replayed by ``--recipe``), each callable alone on a small model
(DESIGN "Quantization design"):

1. **Prepare** (:func:`prepare_model`): refuse already-quantized models; run the default graph
   pipeline (BatchNorm and constant affine ops folded into Conv/Gemm, cleanup, shape chains
   folded); upgrade the opset to 13 for per-channel weights (or fall back to per-tensor, with a
   warning); name every node.  Float-level recovery: cross-layer equalization (``--recover cle``).
2. **Calibrate** (:func:`calibrate_model`), streaming (``onnxopt.calibrate``): one ORT run per batch
   with the needed tensors as extra outputs.  Every 4th batch (up to 8) is held out for scoring,
   up to 8 of the others are kept for recovery (their layer inputs' means and Hessians, which
   step 6 needs, are folded from the same runs).
3. **Place** (:func:`place`): the starting placement keeps in float the layer kinds the EP profile
   runs slower in int8 (depthwise on CPU) and ``--exclude``; :meth:`Quantizer.build` inserts Q/DQ
   for a set of float layers (``passes/quantize_qdq.py``) and applies step 6.
4. **Latency guard** (:func:`guard`): each layer kind (depthwise, pointwise, dense conv, gemm) is
   tried quantized and in float, whole-model latency on the target EP decides
   (``Quantizer.compare_latency``: interleaved paired runs, the median of the per-pair ratios with
   an order-statistics confidence interval, more pairs while it is ambiguous); a kind stays int8
   only when it is faster by more than ``LATENCY_MARGIN`` with confidence, and a tie goes to float,
   so repeated runs place layers alike.  After the budget (step 5, :func:`guard_budgeted`), each
   layer it left int8 goes back to float only when that is faster by more than ``LATENCY_MARGIN``
   with confidence (at most ``LAYER_BLOCKS`` blocks of pairs), when at most ``PER_LAYER_GUARD``
   layers are left to try (``--search`` runs both parts before its candidates).  ``--exclude`` layers stay
   float throughout.  The cost model (``onnxopt.quantization.latency_cache``, :meth:`Quantizer.regions`: each layer
   timed alone in float and int8, cached per machine) decides the clear cases first, without
   building or timing the model (:func:`predict_kind`, :func:`guard_layers`).
5. **Accuracy budget** (:func:`budget`): score = the user's metric (``--metric module:function``,
   called with an ORT session, higher is better) or by default the prediction-level fidelity of
   ``onnxopt.fidelity`` on the held-out batches: top-1 agreement at every position for class-score
   outputs (Softmax/LogSoftmax/Sigmoid heads, names like ``logits``), cosine for other outputs,
   worst output counts; an agreement counts by its 95% lower bound when the held-out positions can
   certify the budget.  If ``fp32 score - score > max_drop``, layers are ranked by sensitivity
   (quantize one alone, measure; :func:`sensitivity` builds the next while the last is scored)
   and the fewest of the most sensitive that meet the budget are kept in float (binary search).
   Then :func:`final_check`: unless the result is confidently faster than fp32 (with the guard on),
   the float model is written, so the result is never slower than fp32.
6. **Recovery** (:func:`recover_model`, on every built candidate; ``--recover``, default
   ``bias-correction,adaround``): bias correction subtracts from each layer's int32 bias the mean
   output shift its weight rounding causes, ``(W_q - W) . E[x]`` with per-channel input means
   measured on the float model; ``adaround`` chooses each layer's weight rounding to minimize its
   output error on calibration activations (closed form, see ``passes/recover.py``).

Replay (a ``Recipe`` given, ``--recipe FILE``): the recipe's method, weights, recovery and float
layers are used as they are; calibration still runs, the guard and budget searches do not.

Search (``--search``, ``RunSettings.search``; ``onnxopt/search.py``): after one calibration, steps 3-4
run once, then up to ``search_budget`` candidate recipes (method x per-channel/per-tensor x
recovery x most sensitive layers kept float) are built and scored with the same steps, timed
round-robin with the float model, and the fastest on the accuracy/latency/size Pareto front
within ``max_drop`` is written; its recipe is saved (``recipe_out``, else OUTPUT + ".recipe.json").

Validation is the budget: the model is written beside OUTPUT (``core.stage_validate_commit``),
scored there, and renamed into place only when the drop is within ``max_drop``; otherwise nothing
is written (exit 3) unless ``--force``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import benchmark as bench
from onnxopt import calibrate, io, pipeline, runtime
from onnxopt import data as data_mod
from onnxopt.base import drop_unused_initializers, present
from onnxopt.commands import core
from onnxopt.errors import BadInputError, UsageError
from onnxopt.quantization import latency_cache as costmodel
from onnxopt.quantization import qdq as qq
from onnxopt.quantization import recovery as recover
from onnxopt.quantization.placement import (  # noqa: F401 - re-exported: onnxopt.quantization.static is the engine's entry
    budget,
    check_replay,
    fewest_float,
    final_check,
    guard,
    guard_budgeted,
    guard_kinds,
    guard_layers,
    place,
    predict_kind,
    sensitivity,
)
from onnxopt.quantization.recipe import (  # noqa: F401 - re-exported: onnxopt.quantization.static is the engine's entry
    BLOCK_SIZES,
    CLEAR,
    COMPARE_SECONDS,
    DEFAULT_RECOVERY,
    DEFAULT_SEARCH_BUDGET,
    EARLY,
    FOLD_WORKERS,
    KIND_ORDER,
    LATENCY_MARGIN,
    LAYER_BLOCKS,
    MAX_BLOCKS,
    MIN_BLOCKS,
    MODES,
    PAIRS_PER_BLOCK,
    PER_LAYER_GUARD,
    PREPARE_PIPELINE,
    RANK_AHEAD,
    RANK_WORKERS,
    RECIPE_FORMAT,
    RECOVERY,
    RECOVERY_BATCHES,
    SESSION_CACHE,
    SURE,
    UNPAIRED_RUNS,
    Decisions,
    Recipe,
    RunSettings,
    _embeddings,
    serialize,
    session_source,
    source_key,
)
from onnxopt.quantization.weights import QuantizeEmbeddings
from onnxopt.teacher import HELD_OUT, BudgetResult, Teacher, is_held_out, load_metric  # noqa: F401 - re-exported

logger = logging.getLogger("onnxopt")


def prepare(model: ir.Model, per_channel: bool, allow_quantized: bool = False,
            pipeline_spec: str = PREPARE_PIPELINE) -> tuple[ir.Model, bool, list[str]]:
    """Graph cleanup and folding, opset >= 13 when per-channel is asked; returns the model, whether
    per-channel is possible, and notes for the report.  A quantized model is refused unless
    ``allow_quantized`` (``compress``: its quantized weights are kept and counted, not requantized)."""
    notes = []
    already = qq.quant_ops(model)
    if already:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(already.items()))
        if not allow_quantized:
            raise BadInputError(f"the model is already quantized ({ops}); left alone, nothing written")
        notes.append(f"already quantized ({ops}): those weights are kept as they are and counted packed")
    overridable = [v for v in model.graph.inputs if v.const_value is not None]
    if overridable:  # keep_initializers_as_inputs: int8 weights cannot stay overridable float inputs
        for v in overridable:
            model.graph.inputs.remove(v)
        notes.append(f"{len(overridable)} initializer(s) removed from the graph inputs (they become fixed weights)")
    model = pipeline.run(model, pipeline.parse(pipeline_spec)).model
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        try:
            proto = onnx.version_converter.convert_version(ir.to_proto(model), 13)
            model = ir.from_proto(proto)
            notes.append(f"opset upgraded {opset} -> 13 for per-channel weights")
        except Exception as e:  # noqa: BLE001 - the converter raises many kinds
            if opset < 10:
                raise BadInputError(f"opset {opset} has no QuantizeLinear and cannot be upgraded: {e}") from None
            per_channel = False
            notes.append(f"opset {opset} could not be upgraded ({str(e).splitlines()[0]}); weights per tensor")
            logger.warning("%s", notes[-1])
    for i, node in enumerate(model.graph):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    seen: set[str] = set()
    for i, node in enumerate(model.graph):  # unique names: plans refer to nodes by name
        name = node.name or ""
        if name in seen:
            node.name = name = f"{name}_{i}"
        seen.add(name)
    return model, per_channel, notes




# ---------------------------------------------------------------- the recipe and the run's options



# ---------------------------------------------------------------- 1. prepare

@dataclasses.dataclass
class Prepared:
    """The prepared float model, its bytes, the full placement (every candidate int8) and notes."""

    model: ir.Model
    float_bytes: bytes
    full_plan: qq.Plan
    notes: list[str]


def load_input(path: str | os.PathLike, lazy: bool = False, what: str = "static int8") -> ir.Model:
    """The model to quantize (or prune, compress: ``what``).  With ``lazy`` (the weight-only modes, whose
    sessions get the arrays: ``session_source``) weights in external data over ``runtime.LIGHT_ABOVE`` stay
    memory-mapped; otherwise they are read into memory (``io.load_inline``), refused over
    ``io.EXTERNAL_DATA_THRESHOLD`` (``io.load_serializable``)."""
    model = io.load(path)
    if lazy and next(io.external_tensors(model), None) is not None and io.weight_bytes(model) > runtime.LIGHT_ABOVE:
        return model
    return io.load_serializable(path, what, model)


def prepare_model(model: ir.Model, recipe: Recipe) -> Prepared:
    """Step 1: :func:`prepare`, then ``cle`` when the recipe asks; sets ``recipe.per_channel`` to
    what the opset allows.  Refuses a model with nothing to quantize."""
    model, recipe.per_channel, notes = prepare(model, recipe.per_channel)
    if "cle" in recipe.recovery:
        notes.append(f"cross-layer equalization: {recover_float(model)['pairs equalized']} conv pairs")
    full = qq.plan(model, recipe.profile)
    if not full.targets:
        raise BadInputError("nothing to quantize: no Conv, Gemm or MatMul with constant float weights in the main graph")
    return Prepared(model, serialize(model), full, notes)


# ---------------------------------------------------------------- 2. calibrate

@dataclasses.dataclass
class Calibration:
    """Statistics, the held-out batches (scoring) and the recovery batches."""

    stats: calibrate.Stats
    held_out: list[dict]
    recovery_set: list[dict]
    seconds: float = 0.0
    stats_file: str | None = None
    #: the recovery's input means and Hessians, folded from calibration's own runs (None: not folded,
    #: or the Hessians' row samples were sized for more recovery batches than the data had)
    means: dict[str, np.ndarray] | None = None
    hessians: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict:
        return {"batches": self.stats.batches, "held_out": len(self.held_out), "tensors": len(self.stats.tensors),
                "bins": self.stats.bins, "seconds": self.seconds, "stats_file": self.stats_file}


def calibrate_model(prepared: Prepared, data: str | os.PathLike, *, preprocess: str | None = None,
                    stats_in: str | os.PathLike | None = None, stats_out: str | os.PathLike | None = None,
                    limit: int | None = None, threads: int = 1, progress: core.ProgressFn | None = None,
                    recovery: Sequence[str] = ()) -> Calibration:
    """Step 2: statistics of every tensor the full placement needs (or ``stats_in``), streaming;
    every 4th batch (up to HELD_OUT) is held out, up to RECOVERY_BATCHES others kept for recovery.
    ``progress(1)`` per calibration batch.  With ``recovery`` naming bias correction or adaround,
    the recovery batches' layer inputs are folded into their means and Hessians from the
    calibration runs (``recover.InputStats``), in FOLD_WORKERS threads while the next batches run,
    so the recovery needs no float pass of its own."""
    t0 = time.perf_counter()
    held_out: list[dict] = []
    recovery_set: list[dict] = []
    means = hessians = None
    plain = runtime.session(prepared.float_bytes, "cpu", threads, optimize=False)
    recovering = [False]  # is the batch being calibrated a recovery batch?

    def stream():
        for i, feeds in enumerate(data_mod.batches(data, plain, preprocess, limit)):
            if is_held_out(i):
                held_out.append(feeds)
                continue
            recovering[0] = len(recovery_set) < RECOVERY_BATCHES
            if recovering[0]:
                recovery_set.append(feeds)
            yield feeds

    if stats_in is not None:
        stats = calibrate.Stats.load(stats_in)
        for feeds in stream():  # still need held-out / recovery batches
            calibrate.check_finite(feeds, "data")
            if len(held_out) >= HELD_OUT and len(recovery_set) >= RECOVERY_BATCHES:
                break
    else:
        names = prepared.full_plan.stats_names()
        nodes = {n.name: n for n in prepared.model.graph}
        folded = recover.InputStats(
            [nodes[n] for n in prepared.full_plan.weighted()] if "bias-correction" in recovery else [],
            recover.adaround_layers(prepared.model, prepared.full_plan) if "adaround" in recovery else [],
            RECOVERY_BATCHES)
        extra = runtime.session(runtime.with_outputs(ir.to_proto(prepared.model), [*names, *folded.names]), "cpu",
                                threads, optimize=False)
        with concurrent.futures.ThreadPoolExecutor(max_workers=FOLD_WORKERS, thread_name_prefix="onnxopt-fold") as pool:
            pending: collections.deque = collections.deque()

            def fold(outputs: dict[str, np.ndarray]) -> None:
                if recovering[0] and folded.names:
                    wanted = {n: outputs[n] for n in folded.names}  # not the other statistics tensors
                    pending.append(pool.submit(folded.part, wanted, len(recovery_set) - 1))
                    while len(pending) > FOLD_WORKERS:  # merged in batch order; FOLD_WORKERS + 1 batches' inputs at most
                        folded.merge(pending.popleft().result())

            stats = calibrate.collect(extra, names, stream(), progress=progress, extra=folded.names, on_batch=fold)
            while pending:
                folded.merge(pending.popleft().result())
        del extra
        stats.source = str(data)
        if stats_out is not None:
            stats.save(stats_out)
        if folded.names and folded.seen == len(recovery_set):
            means = folded.means() if folded.mean_names else None
            # the row samples were sized for RECOVERY_BATCHES: with fewer, Quantizer folds its own
            hessians = folded.hessians() if folded.hess_layers and folded.seen == RECOVERY_BATCHES else None
    if not held_out:
        held_out = recovery_set[-1:] or []
    if not held_out:
        raise BadInputError(f"{data}: no calibration batch was read")
    return Calibration(stats, held_out, recovery_set, time.perf_counter() - t0, str(stats_in or stats_out or "") or None,
                       means, hessians)


# ---------------------------------------------------------------- 6. recover (used by every build)

def recover_float(model: ir.Model) -> Mapping[str, int]:
    """Float-level recovery, before calibration: cross-layer equalization (in place)."""
    return recover.cle(model)


def recover_model(q: Quantizer, model: ir.Model, the_plan: qq.Plan, recovery: tuple[str, ...]) -> ir.Model:
    """Step 6 on a model with Q/DQ inserted (``adaround`` acts at insertion, see
    :meth:`Quantizer.build`): bias correction, then the float weights Q/DQ replaced are dropped
    (all a build leaves unused; the written model also goes through ``cleanup``, in :func:`commit`)."""
    if "bias-correction" in recovery:
        recover.bias_correction(model, the_plan, q.model, q.input_means)
    drop_unused_initializers(model.graph)
    return model


class Quantizer:
    """Holds the prepared float model, calibration statistics and scoring data; builds and
    measures candidate quantized models for a set of float-kept layers."""

    #: what float sessions are made from: bytes, or a ``runtime.Light`` for a big model (weight-only modes)
    float_bytes: runtime.Source

    def __init__(self, prepared: Prepared, calib: Calibration, recipe: Recipe, *, metric: Callable | None = None,
                 metric_name: str | None = None, max_drop: float | None = None,
                 class_outputs: Mapping[str, int | None] | None = None, threads: int = 1, cost_model: bool = True):
        self.model, self.float_bytes, self.stats = prepared.model, prepared.float_bytes, calib.stats
        self.held_out, self.recovery_set = calib.held_out, calib.recovery_set
        self.folded_means, self.folded_hessians = calib.means, calib.hessians
        self.profile, self.per_channel, self.ep = recipe.profile, recipe.per_channel, recipe.ep
        self.threads, self.recovery = threads, recipe.build_recovery
        self.qmax = recipe.qmax
        self.candidates = qq.candidates(self.model)
        self.full_plan = prepared.full_plan
        self.ranges = calib.stats.ranges(recipe.method, self.full_plan.stats_names(), p=recipe.percentile)
        missing = [n for n in self.full_plan.stats_names() if n not in self.ranges]
        if missing:
            raise BadInputError(f"calibration statistics lack {len(missing)} tensor(s) this model needs, e.g. "
                                f"'{missing[0]}' (statistics from another model?)")
        self.embeddings = recipe.embeddings
        #: the latency guard decides clear cases from region timings (onnxopt.quantization.latency_cache)
        self.cost_model = cost_model
        self.init_scoring(metric, metric_name, max_drop, class_outputs)

    def init_scoring(self, metric: Callable | None, metric_name: str | None, max_drop: float | None,
                     class_outputs: Mapping[str, int | None] | None, synthesized: bool = False) -> None:
        """The teacher (the fp32 reference and the yardstick, onnxopt.teacher) and the state filled in
        lazily (``model``, ``float_bytes``, ``held_out``, ``ep`` and ``threads`` set)."""
        #: the latency guard's warm sessions, the embedding quantizer's memo, measured timings
        self.session_cache: collections.OrderedDict = collections.OrderedDict()
        self.embedding_memo: dict = {}
        self.float_ms: float | None = None
        self.region_timings: dict[str, costmodel.Region] | None = None
        self.regions_measured = 0
        self.adaround_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        #: the held-out batch latencies are timed on (a decoder's 1-token step, ``timing_batch``, when the
        #: float model is a file: its session then memory-maps the weights, unpacked, as fast on that step)
        timing = getattr(self, "timing_batch", None)
        self.timing_index = timing if timing is not None and isinstance(self.float_bytes, str) else 0
        self.teacher = Teacher(self.model, self.float_bytes, self.held_out, ep=self.ep, threads=self.threads, metric=metric,
                               metric_name=metric_name, max_drop=max_drop, class_outputs=class_outputs,
                               synthesized=synthesized, prepack=self.timing_index == 0)
        if not synthesized:  # the calibration batches kept in memory give the flip estimate more margins
            self.teacher.learn_from(getattr(self, "recovery_set", []))
        #: a float model loaded from a file (weights over LIGHT_ABOVE): its times on the held-out batch
        #: ``timing_index``, measured now, and its session released (see compare_latency)
        self.float_samples: list[float] | None = None
        if isinstance(self.float_bytes, str) and self.teacher.float_session is not None:
            self.float_samples = self.timed(self.teacher.float_session)
            self.teacher.float_session = None
            gc.collect()

    # Pickling (onnxopt.parallel sends the quantizer to search workers once per process).
    def __getstate__(self) -> dict:
        """Everything but ORT sessions (a worker scores with sessions of its own) and a
        metric loaded by name (loaded again from ``metric_name`` where it is unpickled)."""
        state = dict(vars(self))
        state["session_cache"] = collections.OrderedDict()  # the latency guard's warm sessions
        state["folded_hessians"] = None  # K x K each; a worker that needs them folds its own
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)

    # Recovery data that does not depend on the plan: computed once for every layer, not per build.
    @property
    def rounded_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Adaround's int8 weights of every dense layer (computed once; ``adaround_weights`` holds them,
        a search variant of another rounding gets its own)."""
        if self.adaround_weights is None:
            hess, self.folded_hessians = self.folded_hessians, None  # K x K each: freed once used (a search
            # variant of another rounding folds its own, bit for bit the same: recover.InputStats.run)
            assert isinstance(self.float_bytes, bytes)  # static int8 loads models below LIGHT_ABOVE (load_input)
            self.adaround_weights = recover.adaround(self.model, self.full_plan, self.recovery_set, self.float_bytes,
                                                     self.per_channel, self.qmax, hess)
        return self.adaround_weights

    @functools.cached_property
    def input_means(self) -> dict[str, np.ndarray]:
        if self.folded_means is not None:
            return self.folded_means
        return recover.input_means(self.model, self.full_plan.weighted(), self.recovery_set)

    # ---------------------------------------------------------------- building
    def plan(self, exclude=frozenset()) -> qq.Plan:
        return qq.plan(self.model, self.profile, exclude)

    def build(self, exclude=frozenset(), recovery: tuple[str, ...] | None = None) -> tuple[ir.Model, qq.Plan]:
        """A copy of the float model with Q/DQ for every candidate not in ``exclude``, recovered."""
        recovery = self.recovery if recovery is None else recovery
        the_plan = self.plan(exclude)
        model = self.model.clone()
        weights = self.rounded_weights if "adaround" in recovery else {}
        qq.QuantizeQDQ(the_plan, self.ranges, self.profile, self.per_channel, self.qmax, weights)(model)
        if self.embeddings != "none":
            QuantizeEmbeddings(8, memo=self.embedding_memo)(model)
        return recover_model(self, model, the_plan, recovery), the_plan

    # ---------------------------------------------------------------- scoring
    def score(self, model: ir.Model | runtime.Light | bytes | str | os.PathLike) -> float:
        """Score a model (in memory, serialized, or a model file)."""
        return self.teacher.score(self.source(model) if isinstance(model, ir.Model) else model)

    def source(self, model: ir.Model) -> runtime.Light | bytes:
        """What a scoring session is made from: the model without its weights on the CPU EP
        (``runtime.Light``); serialized whole for other EPs (some refuse in-memory external data)."""
        return runtime.light(model) if self.ep == "cpu" else session_source(model)

    def drop(self, model: ir.Model) -> float:
        return self.teacher.float_score - self.score(model)

    # ---------------------------------------------------------------- latency
    def warm_sessions(self, models: list[runtime.Source]):
        """Warm sessions of ``models`` with their feeds.  The last SESSION_CACHE sessions are kept by
        content hash, so a model compared again (the float model, the guard's base placement) is
        neither reloaded nor warmed up again."""
        feeds = self.held_out[0]
        cache = self.session_cache
        sessions = []
        for m in models:
            key = source_key(m)
            if key not in cache:
                teacher = getattr(self, "teacher", None)
                # the float model's session is the teacher's (same EP and threads): one copy of its weights
                sess = teacher.float_session if teacher is not None and teacher.float_session is not None \
                    and m is getattr(self, "float_bytes", None) else runtime.session(m, self.ep, self.threads)
                f = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
                for _ in range(3):
                    sess.run(None, f)
                cache[key] = sess
            cache.move_to_end(key)
            sessions.append(cache[key])
        # a big model's sessions each hold a copy of its weights: keep only the float one and the latest
        limit = 2 if not isinstance(getattr(self, "float_bytes", None), bytes) else SESSION_CACHE
        while len(cache) > max(limit, len(models)):
            cache.popitem(last=False)
        inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        return sessions, inputs

    def latency(self, models: list[runtime.Source], runs: int = 15) -> list[float]:
        """Median ms per model, runs alternating between the models (one process, fixed feeds)."""
        sessions, inputs = self.warm_sessions(models)
        return [float(np.median(t)) for t in bench.round_robin(list(zip(sessions, inputs)), runs, 20.0)]

    def float_latency(self) -> float:
        """Median ms of the fp32 model on the EP (measured once; its warm session is kept)."""
        if self.float_ms is None:
            self.float_ms = self.latency([self.float_bytes], runs=11)[0]
        return self.float_ms

    def regions(self) -> dict[str, costmodel.Region]:
        """The cost model's region timings of every candidate layer (onnxopt.quantization.latency_cache), once."""
        if self.region_timings is None:
            assert isinstance(self.float_bytes, bytes)  # static int8 loads models below LIGHT_ABOVE (load_input)
            r = costmodel.Regions(self.model, self.float_bytes, self.held_out[0], self.ranges, self.profile,
                                  self.per_channel, self.qmax, self.ep, self.threads)
            self.region_timings = r.timings(self.candidates)
            self.regions_measured = r.measured
        return self.region_timings

    def timed(self, sess: Any, runs: int = UNPAIRED_RUNS) -> list[float]:
        """``runs`` times (ms) of a warm session on the held-out batch ``timing_index``."""
        batch = self.held_out[getattr(self, "timing_index", 0)]
        feeds = {k: v for k, v in batch.items() if k in {i.name for i in sess.get_inputs()}}
        for _ in range(3):
            sess.run(None, feeds)
        return [bench.timed_run(sess, feeds) for _ in range(runs)]

    def unpaired(self, a: runtime.Source, margin: float) -> dict:
        """:meth:`compare_latency` of ``a`` against the float model's times measured when the teacher
        was made (its session is gone: a model over LIGHT_ABOVE is never held twice).  Without pairs the
        verdict is conservative: "faster" only when every run of ``a`` beats ``1 - margin`` x the float
        model's fastest run, "not faster" when ``a``'s fastest misses ``1 - margin`` x the float's slowest,
        else "tie"."""
        self.session_cache.clear()
        gc.collect()
        sess = runtime.session(a, self.ep, self.threads)
        ta, tb = self.timed(sess), present(self.float_samples)
        del sess
        gc.collect()
        limit = 1.0 - margin
        verdict = "faster" if max(ta) < limit * min(tb) else "not faster" if min(ta) > limit * max(tb) else "tie"
        ratio = float(np.median(ta) / max(np.median(tb), 1e-9))
        return {"verdict": verdict, "a_ms": float(np.median(ta)), "b_ms": float(np.median(tb)), "ratio": ratio,
                "interval": [min(ta) / max(tb), max(ta) / min(tb)], "pairs": 0, "unpaired": len(ta)}

    def compare_latency(self, a: runtime.Source, b: runtime.Source, margin: float = LATENCY_MARGIN,
                        max_blocks: int = MAX_BLOCKS) -> dict:
        """Is model ``a`` faster than ``b`` by more than ``margin``, with confidence?

        Runs interleave in pairs (a then b, b then a, alternating, one process, fixed feeds) so a
        machine that slows down slows both alike; each pair gives a ratio t_a / t_b.  After every
        block of PAIRS_PER_BLOCK pairs (at least MIN_BLOCKS; after the first block only against
        ``1 - margin -/+ EARLY``), the median ratio's ~95% interval from order statistics is
        checked against ``1 - margin``: wholly below -> ``"faster"``, wholly
        above -> ``"not faster"``; still straddling after MAX_BLOCKS (or COMPARE_SECONDS) ->
        ``"tie"``, which callers resolve to the simpler choice.  A real difference far from the
        threshold gives the same verdict run after run; one near it gives "tie", not a coin flip.
        Returns the verdict, medians in ms, the median ratio and its interval, and the pair count."""
        if getattr(self, "float_samples", None) is not None and b is getattr(self, "float_bytes", None):
            return self.unpaired(a, margin)
        sessions, inputs = self.warm_sessions([a, b])
        return bench.paired((sessions[0], inputs[0]), (sessions[1], inputs[1]), threshold=1.0 - margin,
                            pairs_per_block=PAIRS_PER_BLOCK, min_blocks=MIN_BLOCKS, max_blocks=max_blocks,
                            seconds=COMPARE_SECONDS, early=EARLY)


median_ratio_interval = bench.median_ratio_interval


# ---------------------------------------------------------------- 3. place



# ---------------------------------------------------------------- the run

def quantize_report(input_path, recipe: Recipe, notes: list[str], calibration: dict, the_plan: qq.Plan, latency: dict,
            wrote_float: bool, threads: int) -> dict:
    t_q, t_f = latency["quantized_ms"], latency["float_ms"]
    return core.header("quantize", input={"path": str(input_path)}, ep=recipe.ep, method=recipe.method,
                      percentile=recipe.percentile if recipe.method == "percentile" else None,
                      per_channel=recipe.per_channel, weight_bits=recipe.bits, mode=recipe.mode,
                      activation_type="float" if recipe.mode == "weight-only" else recipe.profile.activation,
                      notes=notes, calibration=calibration,
                      recipe=recipe.to_dict(the_plan), accuracy=None,
                      latency={**latency, "speedup": t_f / t_q if t_q else None, "threads": threads},
                      wrote_float_model=wrote_float)


def _search(q: Quantizer, recipe: Recipe, opts: RunSettings, replayed: bool) -> tuple[ir.Model, qq.Plan, dict, bool]:
    """Steps 3-5 (replay: the recipe's placement as it is, measured but not searched)."""
    if replayed:
        check_replay(q, recipe)
        candidate, the_plan = q.build(recipe.excluded())
    else:
        place(q, recipe)
        costs = {}
        if recipe.latency_guard:
            costs = q.regions() if q.cost_model else {}
            guard_kinds(q, recipe, costs)
        candidate, the_plan, _ = budget(q, recipe, opts.max_drop)
        if recipe.latency_guard:
            candidate, the_plan = guard_budgeted(q, recipe, costs, candidate, the_plan, opts.max_drop)
    return final_check(q, recipe, candidate, the_plan, decide=not replayed)


def start(input_path: str | os.PathLike, output_path: str | os.PathLike, recipe: Recipe,
          opts: RunSettings) -> Callable | None:
    """The checks every mode makes before any work (settings, EP, paths); returns the --metric function."""
    recipe.check()
    runtime.provider(recipe.ep)
    if io.same_file(input_path, output_path):
        raise UsageError(f"output {output_path} is the input file; write the quantized model elsewhere")
    io.check_writable(Path(output_path))
    if opts.search and opts.recipe_out is None:  # the chosen recipe is always saved
        opts.recipe_out = str(output_path) + ".recipe.json"
    if opts.recipe_out is not None:
        io.check_writable(Path(opts.recipe_out))
    return load_metric(opts.metric)


def run(input_path: str | os.PathLike, output_path: str | os.PathLike, recipe: Recipe, opts: RunSettings,
        metric_fn: Callable | None, replayed: bool, t_start: float, searcher: Callable | None = None) -> dict:
    """Static int8 QDQ, every step, then the staged write (``core.stage_validate_commit``); returns
    the report.  ``recipe`` is filled in (or, ``replayed``, applied as it is); ``searcher`` (with
    --search) chooses the recipe among candidates instead."""
    if opts.data is None:
        raise UsageError("--mode static needs calibration --data; --mode dynamic and --weights int4 do not")
    model = load_input(input_path)
    t0 = time.perf_counter()
    prepared = prepare_model(model, recipe)
    calib = calibrate_model(prepared, opts.data, preprocess=opts.preprocess, stats_in=opts.stats_in,
                            stats_out=opts.stats_out, limit=opts.calib_limit, threads=opts.threads,
                            progress=opts.progress, recovery=recipe.build_recovery)
    q = Quantizer(prepared, calib, recipe, metric=metric_fn, metric_name=opts.metric, max_drop=opts.max_drop,
                  class_outputs=opts.class_outputs, threads=opts.threads, cost_model=opts.cost_model)
    calib.hessians = None  # the Quantizer's until adaround has used them
    if metric_fn is None:
        for r in q.teacher.last_results:
            logger.info("fidelity of output '%s': %s (%s)", r["name"], r["metric"], r["reason"])
    found = None
    if searcher is not None:  # --search (onnxopt.quantization.search.run_search)
        recipe, candidate, the_plan, latency, wrote_float, found = searcher(
            q, recipe, opts.max_drop, opts.search_budget, workers=opts.search_workers, ray_address=opts.search_ray)
    else:
        candidate, the_plan, latency, wrote_float = _search(q, recipe, opts, replayed)
    report = quantize_report(input_path, recipe, prepared.notes, calib.to_dict(), the_plan, latency, wrote_float, opts.threads)
    if found is not None:
        report["search"] = found.to_dict()
    report["seconds_quantize"] = time.perf_counter() - t0
    return commit(q, recipe, candidate, the_plan, output_path, report, opts, replayed, t_start)


def commit(q: Quantizer, recipe: Recipe, candidate: ir.Model, the_plan: qq.Plan, output_path: str | os.PathLike,
           report: dict, opts: RunSettings, replayed: bool, t_start: float) -> dict:
    """The last step of every mode: ``cleanup`` (builds only drop the weights they replaced), stage,
    score against the budget, rename into place (or raise ValidationRefused), then save the recipe
    when asked; returns ``report``."""
    def refused(_path: Path, _result: BudgetResult) -> None:
        report["seconds"] = time.perf_counter() - t_start

    candidate = pipeline.run(candidate, pipeline.parse("cleanup")).model
    where = "with the recipe's placement" if replayed else "even with every layer in float"

    core.stage_validate_commit(candidate, output_path, report, check=q.teacher.check(report, ("quantized",), where, warn_uncertified=True),
                              force=opts.force, on_refused=refused, refused="quantized model not written")
    if opts.recipe_out is not None:
        recipe.save(opts.recipe_out, the_plan)
        report["recipe_file"] = str(opts.recipe_out)
    report["seconds"] = time.perf_counter() - t_start
    return report


def feeds_from(data: str | os.PathLike, model_bytes: bytes, preprocess: str | None = None,
               limit: int | None = None) -> list[Mapping[str, np.ndarray]]:
    """Batches of ``data`` checked against a model (tests and the benchmark use this)."""
    sess = runtime.session(model_bytes, "cpu")
    return list(data_mod.batches(data, sess, preprocess, limit))

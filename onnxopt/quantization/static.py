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

Search (``--search``, ``Options.search``; ``onnxopt/search.py``): after one calibration, steps 3-4
run once, then up to ``search_budget`` candidate recipes (method x per-channel/per-tensor x
recovery x most sensitive layers kept float) are built and scored with the same steps, timed
round-robin with the float model, and the fastest on the accuracy/latency/size Pareto front
within ``max_drop`` is written; its recipe is saved (``recipe_out``, else OUTPUT + ".recipe.json").

Validation is the budget: the model is written beside OUTPUT (``api.stage_validate_commit``),
scored there, and renamed into place only when the drop is within ``max_drop``; otherwise nothing
is written (exit 3) unless ``--force``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import api, calibrate, fidelity, io, pipeline, runtime
from onnxopt import benchmark as bench
from onnxopt import data as data_mod
from onnxopt.base import drop_unused_initializers
from onnxopt.errors import BadInputError, InternalError, OnnxoptError, UsageError
from onnxopt.quantization import latency_cache as costmodel
from onnxopt.quantization import qdq as qq
from onnxopt.quantization import recovery as recover
from onnxopt.quantization.weights import QuantizeEmbeddings

logger = logging.getLogger("onnxopt")

PREPARE_PIPELINE = pipeline.DEFAULT_PIPELINE
RECOVERY = ("bias-correction", "cle", "adaround")
DEFAULT_RECOVERY = ("bias-correction", "adaround")
KIND_ORDER = ("depthwise", "pointwise", "conv", "gemm", "attention")
#: int8 must be faster than float by more than this fraction (with confidence) to be kept; a single
#: layer goes back to float only when that is faster by more than it too
LATENCY_MARGIN = 0.03
#: the cost model keeps a kind in int8 unmeasured when its regions save more than the margin plus
#: this fraction of the fp32 time (onnxopt.quantization.latency_cache)
CLEAR = 0.05
#: ... and keeps a layer int8 unmeasured when its region's extra cost is under this fraction of
#: the margin (the rest of the margin absorbs the noise of the measured base time)
SURE = 0.75
#: the layer-by-layer pass runs only when at most this many layers are int8 after the per-kind
#: decisions (each layer costs one comparison); with more it is skipped, not truncated
PER_LAYER_GUARD = 24
#: latency comparison: pairs per block, blocks at least / at most, seconds at most per comparison
PAIRS_PER_BLOCK, MIN_BLOCKS, MAX_BLOCKS, COMPARE_SECONDS = 16, 2, 6, 12.0
#: blocks at most when one layer is tried back in float (one layer rarely pays the margin)
LAYER_BLOCKS = 2
#: a comparison whose interval after the first block lies this far from the threshold stops there
#: (the checks near the threshold are unchanged: ``bench.paired``'s ``early``)
EARLY = 0.1
RECIPE_FORMAT = "onnxopt-recipe/1"
#: warm ORT sessions kept for latency comparisons (each holds its model's weights)
SESSION_CACHE = 3
HELD_OUT, RECOVERY_BATCHES = 8, 8
#: calibration folds the recovery batches' statistics in this many threads while the next batches run
FOLD_WORKERS = 2
#: the sensitivity ranking scores in this many threads (none with a user --metric: user code is
#: called in the main thread), while at most RANK_AHEAD built models wait to be scored
RANK_WORKERS = RANK_AHEAD = 2
DEFAULT_SEARCH_BUDGET = 12  # --search: candidates built at most (onnxopt.quantization.search)
MODES = ("static", "dynamic", "weight-only")
BLOCK_SIZES = (32, 64, 128)

def load_metric(spec: str | None) -> Callable | None:
    """``module:function`` or ``path/to/file.py:function`` -> the callable.

    A module name is imported with the current directory first on ``sys.path`` (as ``python -m``
    does, so ``models.tasks:digits_accuracy`` works from the repository root); a path (ending in
    ``.py`` or containing a ``/``) is loaded from that file.  A spec without ``:`` is a usage error
    (exit 1); a module that is missing, does not import (syntax error, exception at import), or
    lacks a callable of that name is bad input (exit 2), one line."""
    import importlib.util

    if spec is None:
        return None
    module, _, func = spec.rpartition(":")
    if not module or not func:
        raise UsageError(f"--metric '{spec}': expected module:function or path/to/file.py:function")
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            path = Path(module)
            if not path.is_file():
                raise BadInputError(f"--metric '{spec}': no such file '{module}'")
            name = f"_onnxopt_metric_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise BadInputError(f"--metric '{spec}': '{module}' is not a Python file")
            mod = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = mod  # dataclasses and pickling look the module up by name
            try:
                module_spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
    except OnnxoptError:
        raise
    except SyntaxError as e:
        raise BadInputError(f"--metric '{spec}': syntax error in {e.filename}, line {e.lineno}: {e.msg}") from None
    except ModuleNotFoundError as e:
        raise BadInputError(f"--metric '{spec}': no module named '{e.name}' (modules are looked up from the "
                            f"current directory and sys.path; or give path/to/file.py:{func})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code runs at import
        text = (str(e).strip().splitlines() or [""])[0]
        raise BadInputError(f"--metric '{spec}': importing '{module}' failed ({type(e).__name__}: {text})") from None
    fn = getattr(mod, func, None)
    if fn is None:
        raise BadInputError(f"--metric '{spec}': '{module}' has no attribute '{func}'")
    if not callable(fn):
        raise BadInputError(f"--metric '{spec}': '{func}' in '{module}' is not callable")
    return fn


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
        if node.name in seen:
            node.name = f"{node.name}_{i}"
        seen.add(node.name)
    return model, per_channel, notes


def serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# ---------------------------------------------------------------- the recipe and the run's options

@dataclasses.dataclass
class Recipe:
    """What quantize decides, and why; the report's ``"recipe"`` (:meth:`to_dict`) and what
    ``--recipe`` replays (:meth:`from_dict`).  Settings: ``ep`` (its ``qq.Profile``: activation type,
    float kinds), range ``method`` and ``percentile``, ``per_channel`` weights, ``weight_bits`` (None:
    from the EP and CPU, see ``qq.weight_qmax``), ``recovery`` passes, user ``exclude`` and whether the
    ``latency_guard`` runs.  Decisions: ``float_layers`` (layer -> why it stays float), the guard's
    ``latency_decisions`` and the budget's ``sensitivity`` ranking; ``replayed_from`` names the
    recipe file a replay used."""

    ep: str = "cpu"
    method: str = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    weight_bits: int | None = None
    recovery: tuple[str, ...] = DEFAULT_RECOVERY
    exclude: tuple[str, ...] = ()
    latency_guard: bool = True
    #: ``static`` (QDQ, calibrated), ``dynamic`` (int8 weights, activations quantized at run time) or
    #: ``weight-only`` (int4 block-wise weights, float activations); see ``onnxopt/quantize_modes.py``
    mode: str = "static"
    weights: str = "int8"
    block_size: int = 32
    #: weight-only: bits of the output head(s) (the weight MatMul feeding a graph output), 8 or 4
    head_bits: int = 8
    #: Gather tables (embeddings) quantized weight-only, in every mode: int8, int4 (weight-only mode) or none
    embeddings: str = "int8"
    #: int4 weight rounding: ``gptq`` (error feedback with the input Hessian, needs data) or ``rtn``;
    #: None: gptq with --data, else rtn (the run fills it in)
    rounding: str | None = None
    float_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    latency_decisions: list[dict] = dataclasses.field(default_factory=list)
    sensitivity: list[dict] = dataclasses.field(default_factory=list)
    replayed_from: str | None = None

    def check(self) -> None:
        """Usage errors (exit 1) for settings no step can run."""
        if self.method not in calibrate.METHODS:
            raise UsageError(f"--method '{self.method}': choose from {', '.join(calibrate.METHODS)}")
        unknown = [r for r in self.recovery if r not in RECOVERY]
        if unknown:
            raise UsageError(f"--recover '{unknown[0]}': choose from {', '.join(RECOVERY)} or none")
        if self.ep not in qq.PROFILES:
            raise UsageError(f"--ep '{self.ep}': quantize targets {', '.join(qq.PROFILES)}")
        if self.weight_bits not in (None, 7, 8):
            raise UsageError(f"recipe weight_bits {self.weight_bits}: 7 or 8")
        if self.mode not in MODES:
            raise UsageError(f"--mode '{self.mode}': choose from {', '.join(MODES)}")
        if self.weights not in ("int8", "int4"):
            raise UsageError(f"--weights '{self.weights}': int8 or int4")
        if (self.weights == "int4") != (self.mode == "weight-only"):
            raise UsageError("--weights int4 is weight-only (activations stay float): leave --mode out or use "
                             "--mode weight-only" if self.weights == "int4" else
                             "--mode weight-only needs --weights int4")
        if self.embeddings not in ("int8", "int4", "none"):
            raise UsageError(f"--embeddings '{self.embeddings}': int8, int4 or none")
        if self.embeddings == "int4" and self.mode != "weight-only":
            raise UsageError("--embeddings int4 goes with --weights int4 (use int8 with this mode)")
        if self.head_bits not in (4, 8):
            raise UsageError(f"--head-bits {self.head_bits}: 4 or 8")
        if self.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size {self.block_size}: choose {', '.join(map(str, BLOCK_SIZES))}")
        if self.rounding not in (None, "rtn", "gptq"):
            raise UsageError(f"--rounding '{self.rounding}': rtn or gptq")

    @property
    def profile(self) -> qq.Profile:
        return qq.PROFILES[self.ep]

    @property
    def qmax(self) -> int:
        return qq.weight_qmax(self.ep) if self.weight_bits is None else (127 if self.weight_bits == 8 else 63)

    @property
    def bits(self) -> int:
        """Weight bits as reported: 4, or 8/7 (``qmax``)."""
        return 4 if self.weights == "int4" else (8 if self.qmax == 127 else 7)

    @property
    def build_recovery(self) -> tuple[str, ...]:
        """The recovery applied to each built candidate (``cle`` runs once, on the float model)."""
        return tuple(r for r in self.recovery if r != "cle")

    def excluded(self) -> frozenset:
        return frozenset(self.float_layers)

    def to_dict(self, the_plan: qq.Plan | None = None) -> dict:
        """JSON form; with the plan built from it, also its placement counts (report keys
        ``quantized``, ``quantized_layers``, ``kinds``)."""
        described = the_plan.describe() if the_plan is not None else {}
        return {**described, "float_layers": sorted(self.float_layers),
                "recovery": list(self.build_recovery) + (["cle"] if "cle" in self.recovery else []),
                "latency_decisions": self.latency_decisions, "sensitivity": self.sensitivity,
                "format": RECIPE_FORMAT, "ep": self.ep, "method": self.method,
                "percentile": self.percentile if self.method == "percentile" else None,
                "per_channel": self.per_channel, "weight_bits": self.bits,
                "activation_type": self.profile.activation, "exclude": list(self.exclude),
                "latency_guard": self.latency_guard, "mode": self.mode, "weights": self.weights,
                "block_size": self.block_size if self.weights == "int4" else None, "embeddings": self.embeddings,
                "head_bits": self.head_bits if self.weights == "int4" else None,
                "rounding": self.rounding,
                "float_reasons": {n: self.float_layers[n] for n in sorted(self.float_layers)},
                "replayed_from": self.replayed_from}

    @classmethod
    def from_dict(cls, d: Mapping, source: str | None = None) -> Recipe:
        """A recipe from :meth:`to_dict`'s form or from a whole JSON quantize report."""
        if isinstance(d, Mapping) and d.get("command") == "quantize" and isinstance(d.get("recipe"), Mapping):
            d = d["recipe"]
        if not isinstance(d, Mapping) or not isinstance(d.get("float_layers"), list):
            raise BadInputError(f"{source or 'recipe'}: not an onnxopt recipe (no 'float_layers' list); "
                                f"use a file written by --save-recipe or a JSON quantize report")
        if d.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise BadInputError(f"{source or 'recipe'}: recipe format '{d['format']}', expected {RECIPE_FORMAT}")
        reasons = d.get("float_reasons") or {}
        return cls(ep=d.get("ep", "cpu"), method=d.get("method", "percentile"),
                   percentile=float(d.get("percentile") or 99.99), per_channel=bool(d.get("per_channel", True)),
                   weight_bits=d.get("weight_bits") if d.get("weights", "int8") == "int8" else None,
                   recovery=tuple(d.get("recovery", DEFAULT_RECOVERY)),
                   exclude=tuple(d.get("exclude", ())), latency_guard=bool(d.get("latency_guard", True)),
                   mode=str(d.get("mode", "static")), weights=str(d.get("weights", "int8")),
                   block_size=int(d.get("block_size") or 32), embeddings=_embeddings(d.get("embeddings", "int8")),
                   head_bits=int(d.get("head_bits") or 8),
                   rounding=d.get("rounding"),
                   float_layers={n: reasons.get(n, "recipe") for n in d["float_layers"]},
                   latency_decisions=list(d.get("latency_decisions", [])), sensitivity=list(d.get("sensitivity", [])),
                   replayed_from=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(f"--recipe {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | os.PathLike, the_plan: qq.Plan | None = None) -> None:
        text = json.dumps(self.to_dict(the_plan), indent=2, default=str) + "\n"
        tmp = Path(str(path) + ".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as e:
            raise BadInputError(f"--save-recipe {path}: cannot write ({e.strerror or e})") from None


def _embeddings(value) -> str:
    """A recipe's embeddings setting (older recipes wrote a bool)."""
    if isinstance(value, bool):
        return "int8" if value else "none"
    return str(value)


@dataclasses.dataclass
class Options:
    """How a run works (not what it decides): data, scoring, files, threads, progress."""

    data: str | os.PathLike | None
    preprocess: str | None = None
    max_drop: float = 0.01
    metric: str | None = None
    stats_in: str | os.PathLike | None = None
    stats_out: str | os.PathLike | None = None
    recipe_out: str | os.PathLike | None = None
    force: bool = False
    calib_limit: int | None = None
    threads: int = 1
    class_outputs: Mapping[str, int | None] | None = None
    progress: api.ProgressFn | None = None
    #: ``--search``: evaluate candidate recipes (``onnxopt.quantization.search``), at most ``search_budget``
    search: bool = False
    search_budget: int = DEFAULT_SEARCH_BUDGET
    #: where the search builds and scores candidates: ``search_workers`` local processes (1: this
    #: process), or Ray tasks when ``search_ray`` is an address ("local": a local cluster)
    search_workers: int = 1
    search_ray: str | None = None
    #: the latency guard decides clear cases from region timings cached per machine
    #: (``onnxopt.quantization.latency_cache``); False measures every decision in the whole model
    cost_model: bool = True


# ---------------------------------------------------------------- 1. prepare

@dataclasses.dataclass
class Prepared:
    """The prepared float model, its bytes, the full placement (every candidate int8) and notes."""

    model: ir.Model
    float_bytes: bytes
    full_plan: qq.Plan
    notes: list[str]


def load_input(path: str | os.PathLike) -> ir.Model:
    model = io.load(path)
    if next(io.external_tensors(model), None) is not None and io.weight_bytes(model) > (1 << 31):
        raise BadInputError("models over 2 GB are not quantized yet (their weights would be held in memory twice)")
    return model


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
                    limit: int | None = None, threads: int = 1, progress: api.ProgressFn | None = None,
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
            if i % 4 == 3 and len(held_out) < HELD_OUT:
                held_out.append(feeds)
                continue
            recovering[0] = len(recovery_set) < RECOVERY_BATCHES
            if recovering[0]:
                recovery_set.append(feeds)
            yield feeds

    if stats_in is not None:
        stats = calibrate.Stats.load(stats_in)
        for feeds in stream():  # still need held-out / recovery batches
            for k, v in feeds.items():
                if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                    raise BadInputError(f"data: input '{k}' contains NaN or Inf")
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


def score_session(sess, metric: Callable | None, metric_name: str | None, rules, max_drop: float | None,
                  held_out: Sequence[Mapping], reference: Sequence[Mapping]) -> tuple[float, list[dict] | None]:
    """A candidate session's score: the user's ``metric(sess)`` (an exception in it is one
    BadInputError line), else the lowest per-output fidelity (onnxopt.fidelity) of its outputs on
    the ``held_out`` batches against the ``reference`` outputs; with those per-output results
    (None for a user metric).  Shared by quantize and the compression commands."""
    if metric is not None:
        try:
            return float(metric(sess)), None
        except Exception as e:  # noqa: BLE001 - user code
            text = (str(e).strip().splitlines() or [""])[0]
            raise BadInputError(f"--metric '{metric_name}' raised {type(e).__name__}: {text}") from None
    fid = fidelity.Fidelity(rules, max_drop)
    for feeds, ref in zip(held_out, reference):
        fid.add(ref, runtime.run_candidate(sess, feeds, list(ref)))
    results = fid.results()
    return min((r["score"] for r in results), default=1.0), results


class Quantizer:
    """Holds the prepared float model, calibration statistics and scoring data; builds and
    measures candidate quantized models for a set of float-kept layers."""

    def __init__(self, prepared: Prepared, calib: Calibration, recipe: Recipe, *, metric: Callable | None = None,
                 metric_name: str | None = None, max_drop: float | None = None,
                 class_outputs: Mapping[str, int | None] | None = None, threads: int = 1, cost_model: bool = True):
        self.model, self.float_bytes, self.stats = prepared.model, prepared.float_bytes, calib.stats
        self.held_out, self.recovery_set = calib.held_out, calib.recovery_set
        self.folded_means, self.folded_hessians = calib.means, calib.hessians
        self.profile, self.per_channel, self.ep = recipe.profile, recipe.per_channel, recipe.ep
        self.metric, self.metric_name, self.threads, self.recovery = metric, metric_name, threads, recipe.build_recovery
        self.qmax = recipe.qmax
        self.candidates = qq.candidates(self.model)
        self.full_plan = prepared.full_plan
        self.ranges = calib.stats.ranges(recipe.method, self.full_plan.stats_names(), p=recipe.percentile)
        missing = [n for n in self.full_plan.stats_names() if n not in self.ranges]
        if missing:
            raise BadInputError(f"calibration statistics lack {len(missing)} tensor(s) this model needs, e.g. "
                                f"'{missing[0]}' (statistics from another model?)")
        self.embeddings = recipe.embeddings
        self.max_drop = max_drop
        #: the latency guard decides clear cases from region timings (onnxopt.quantization.latency_cache)
        self.cost_model = cost_model
        self.init_scoring(class_outputs)

    def init_scoring(self, class_outputs: Mapping[str, int | None] | None) -> None:
        """The fp32 reference on the held-out batches and its score (``self.model``, ``float_bytes``,
        ``held_out``, ``ep``, ``threads`` and ``metric`` set)."""
        #: how each output is judged without --metric (onnxopt.fidelity); per-output results of the last score
        self.rules = fidelity.rules(self.model, class_outputs)
        self.last_results: list[dict] = []
        self.float_session = runtime.session(self.float_bytes, self.ep, self.threads)
        self.reference = [runtime.run(self.float_session, f) for f in self.held_out]
        self.float_score = self.score_session(self.float_session, self.reference)
        if self.metric is None:  # fp32 agrees with itself everywhere; a sample's lower bound is not its score
            self.float_score = 1.0

    # Pickling (onnxopt.parallel sends the quantizer to search workers once per process).
    def __getstate__(self) -> dict:
        """Everything but ORT sessions (a worker scores with sessions of its own) and a
        metric loaded by name (loaded again from ``metric_name`` where it is unpickled)."""
        state = self.__dict__.copy()
        state["float_session"] = None
        state.pop("_session_cache", None)  # the latency guard's warm sessions
        state["folded_hessians"] = None  # K x K each; a worker that needs them folds its own
        if self.metric_name is not None:
            state["metric"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.metric is None and self.metric_name is not None:
            self.metric = load_metric(self.metric_name)

    # Recovery data that does not depend on the plan: computed once for every layer, not per build.
    @functools.cached_property
    def rounded_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        hess, self.folded_hessians = self.folded_hessians, None  # K x K each: freed once used (a search
        # variant of another rounding folds its own, bit for bit the same: recover.InputStats.run)
        return recover.adaround(self.model, self.full_plan, self.recovery_set, self.float_bytes, self.per_channel,
                                self.qmax, hess)

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
            QuantizeEmbeddings(8, memo=self.__dict__.setdefault("_embedding_memo", {}))(model)
        return recover_model(self, model, the_plan, recovery), the_plan

    # ---------------------------------------------------------------- scoring
    def score_session(self, sess, reference=None) -> float:
        score, results = score_session(sess, self.metric, self.metric_name, self.rules, self.max_drop, self.held_out,
                                       reference or self.reference)
        if results is not None:
            self.last_results = results
        return score

    def score(self, model: ir.Model | runtime.Light | bytes | str | os.PathLike) -> float:
        """Score a model (in memory, serialized, or a model file)."""
        source = self.source(model) if isinstance(model, ir.Model) else \
            model if isinstance(model, (runtime.Light, bytes)) else str(model)
        return self.score_session(runtime.session(source, self.ep, self.threads))

    def source(self, model: ir.Model) -> runtime.Light | bytes:
        """What a scoring session is made from: the model without its weights on the CPU EP
        (``runtime.Light``); serialized whole for other EPs (some refuse in-memory external data)."""
        return runtime.light(model) if self.ep == "cpu" else serialize(model)

    def drop(self, model: ir.Model) -> float:
        return self.float_score - self.score(model)

    # ---------------------------------------------------------------- latency
    def _sessions(self, models: list[bytes]):
        """Warm sessions of ``models`` with their feeds.  The last SESSION_CACHE sessions are kept by
        content hash, so a model compared again (the float model, the guard's base placement) is
        neither reloaded nor warmed up again."""
        feeds = self.held_out[0]
        cache: collections.OrderedDict = self.__dict__.setdefault("_session_cache", collections.OrderedDict())
        sessions = []
        for m in models:
            key = hashlib.sha1(m).digest()
            if key not in cache:
                sess = runtime.session(m, self.ep, self.threads)
                f = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
                for _ in range(3):
                    sess.run(None, f)
                cache[key] = sess
            cache.move_to_end(key)
            sessions.append(cache[key])
        while len(cache) > max(SESSION_CACHE, len(models)):
            cache.popitem(last=False)
        inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        return sessions, inputs

    def latency(self, models: list[bytes], runs: int = 15) -> list[float]:
        """Median ms per model, runs alternating between the models (one process, fixed feeds)."""
        sessions, inputs = self._sessions(models)
        times: list[list[float]] = [[] for _ in sessions]
        deadline = time.perf_counter() + 20.0
        for _ in range(runs):
            for i, (s, f) in enumerate(zip(sessions, inputs)):
                times[i].append(bench.timed_run(s, f))
            if time.perf_counter() > deadline:
                break
        return [float(np.median(t)) for t in times]

    def float_latency(self) -> float:
        """Median ms of the fp32 model on the EP (measured once; its warm session is kept)."""
        if "_float_ms" not in self.__dict__:
            self._float_ms = self.latency([self.float_bytes], runs=11)[0]
        return self._float_ms

    def regions(self) -> dict[str, costmodel.Region]:
        """The cost model's region timings of every candidate layer (onnxopt.quantization.latency_cache), once."""
        if "_regions" not in self.__dict__:
            r = costmodel.Regions(self.model, self.float_bytes, self.held_out[0], self.ranges, self.profile,
                                  self.per_channel, self.qmax, self.ep, self.threads)
            self._regions = r.timings(self.candidates)
            self.regions_measured = r.measured
        return self._regions

    def compare_latency(self, a: bytes, b: bytes, margin: float = LATENCY_MARGIN, max_blocks: int = MAX_BLOCKS) -> dict:
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
        sessions, inputs = self._sessions([a, b])
        return bench.paired((sessions[0], inputs[0]), (sessions[1], inputs[1]), threshold=1.0 - margin,
                            pairs_per_block=PAIRS_PER_BLOCK, min_blocks=MIN_BLOCKS, max_blocks=max_blocks,
                            seconds=COMPARE_SECONDS, early=EARLY)


median_ratio_interval = bench.median_ratio_interval


# ---------------------------------------------------------------- 3. place

def place(q: Quantizer, recipe: Recipe) -> None:
    """Step 3: the starting placement in ``recipe.float_layers``: layer kinds the EP profile runs
    slower in int8, and ``recipe.exclude`` (which no later step puts back in int8)."""
    for name, kind in q.candidates.items():
        if kind in recipe.profile.float_kinds:
            recipe.float_layers.setdefault(name, f"{kind} starts in float on {recipe.ep} (EP profile: slower in int8)")
    nodes = {n.name for n in q.model.graph}
    for name in recipe.exclude:
        recipe.float_layers[name] = "--exclude"
        if name not in nodes:
            logger.warning("--exclude '%s': the prepared model has no node of that name", name)


def check_replay(q: Quantizer, recipe: Recipe) -> None:
    """A replayed recipe must name this model's nodes (not another model's)."""
    nodes = {n.name for n in q.model.graph}
    unknown = sorted(set(recipe.float_layers) - nodes)
    if unknown:
        raise BadInputError(f"recipe {recipe.replayed_from or ''}: float layer '{unknown[0]}' is not a node of this "
                            f"model ({len(unknown)} unknown; a recipe of another model?)")


# ---------------------------------------------------------------- 4. latency guard

def guard(q: Quantizer, recipe: Recipe) -> None:
    """Step 4: :func:`guard_kinds`, then :func:`guard_layers`, both deciding the clear cases from
    the cost model's region timings (``Quantizer.regions``; none when ``q.cost_model`` is off)."""
    costs = q.regions() if q.cost_model else {}
    guard_kinds(q, recipe, costs)
    guard_layers(q, recipe, costs)


def predict_kind(members: set[str], costs: Mapping[str, costmodel.Region], float_ms: float) -> dict | None:
    """The cost model's verdict on a layer kind, or None when its regions leave it open (or a
    member has no region timing).  ``float``: its layers take less than LATENCY_MARGIN of the fp32
    time, so no int8 form can pay the margin; ``int8``: their int8 regions (pessimistic: each
    pays its own Q/DQ) save more than LATENCY_MARGIN + CLEAR of the fp32 time, none of them
    estimated from MACs.  The record has
    the measured decisions' keys (``float_ms`` the fp32 model's, ``quantized_ms`` and ``ratio``
    predicted) plus ``cost_model``, ``float_share`` and the regions read from the cache or estimated."""
    if not members or any(n not in costs for n in members) or float_ms <= 0:
        return None
    share = sum(costs[n].float_ms for n in members) / float_ms
    saving = sum(costs[n].saving_ms for n in members) / float_ms
    # a region estimated from MACs (not timed) is not pessimistic: it never makes a kind clearly
    # faster, and counts twice toward the share that must stay under the margin
    estimated = sum(costs[n].float_ms for n in members if costs[n].estimated) / float_ms
    record = {"cost_model": True, "float_ms": float_ms, "quantized_ms": float_ms * (1.0 - saving), "ratio": 1.0 - saving,
              "float_share": share, "regions_cached": sum(costs[n].cached for n in members),
              "regions_estimated": sum(costs[n].estimated for n in members)}
    if share + estimated < LATENCY_MARGIN:
        return {**record, "verdict": "cost model: below the margin", "quantized": False}
    if saving > LATENCY_MARGIN + CLEAR and not estimated:
        return {**record, "verdict": "cost model: clearly faster", "quantized": True}
    return None


def guard_kinds(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region] | None = None) -> None:
    """Each layer kind (KIND_ORDER) in int8 vs in float on the target EP: it stays int8 only when
    confidently faster by more than LATENCY_MARGIN (a tie goes to float).  The cost model
    (:func:`predict_kind`) decides the clear kinds without building or running the model.
    ``--exclude`` layers are not tried."""
    user = set(recipe.exclude)
    costs = costs or {}
    fp32_ms = q.float_latency() if costs else 0.0
    for kind in KIND_ORDER:
        members = {n for n, k in q.candidates.items() if k == kind and n not in user}
        if not members:
            continue
        predicted = predict_kind(members, costs, fp32_ms)
        if predicted is not None:
            keep = predicted["quantized"]
            recipe.latency_decisions.append({"kind": kind, "layers": len(members), **predicted})
            why = (f"latency guard (cost model): {kind} layers are {predicted['float_share']:.1%} of the fp32 time, "
                   f"below the {LATENCY_MARGIN:.0%} margin")
        else:
            excluded = recipe.excluded()
            with_q = serialize(q.build(excluded - members)[0])
            without = serialize(q.build(excluded | members)[0])
            c = q.compare_latency(with_q, without)
            keep = c["verdict"] == "faster"  # a tie goes to float: int8 must pay clearly
            recipe.latency_decisions.append({"kind": kind, "layers": len(members), "quantized_ms": c["a_ms"],
                                             "float_ms": c["b_ms"], "ratio": c["ratio"], "interval": c["interval"],
                                             "pairs": c["pairs"], "verdict": c["verdict"], "quantized": bool(keep)})
            why = f"latency guard: {kind} layers not faster in int8 on {recipe.ep} ({c['verdict']}, time ratio {c['ratio']:.3f})"
        for name in members:
            if keep:
                recipe.float_layers.pop(name, None)
            else:
                recipe.float_layers[name] = why


def guard_layers(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region] | None = None,
                 base: bytes | None = None) -> None:
    """Layer by layer: back to float only when that is clearly faster, since a kind that pays
    overall may hold single layers that do not (e.g. a 1-channel stem).  A layer whose timed int8
    region costs less than SURE x LATENCY_MARGIN of the current placement's measured time more
    than its float region stays int8 without a measurement (going float cannot save the margin:
    its region is pessimistic); the others (regions estimated from MACs included) are measured,
    when at most PER_LAYER_GUARD.  ``base``: the current placement, serialized, when the caller has
    it built."""
    costs = costs or {}
    quantized = [n for n in q.candidates if n not in recipe.float_layers]
    if not quantized or (not costs and len(quantized) > PER_LAYER_GUARD):
        if quantized:
            logger.info("latency guard: %d int8 layers (> %d), not tried one by one", len(quantized), PER_LAYER_GUARD)
        return
    if base is None:
        base = serialize(q.build(recipe.excluded())[0])
    if costs:  # the base placement's time, measured: the margin is of it
        base_ms = q.latency([base], runs=11)[0]
        quantized = [n for n in quantized if n not in costs or costs[n].estimated
                     or -costs[n].saving_ms >= SURE * LATENCY_MARGIN * base_ms]
        if len(quantized) > PER_LAYER_GUARD:
            logger.info("latency guard: %d int8 layers to try (> %d), not tried one by one", len(quantized), PER_LAYER_GUARD)
            return
    for name in quantized:
        trial = serialize(q.build(recipe.excluded() | {name})[0])
        # back to float only when that is clearly faster; one layer rarely is, so no extra blocks
        c = q.compare_latency(trial, base, max_blocks=LAYER_BLOCKS)
        if c["verdict"] == "faster":
            recipe.float_layers[name] = f"latency guard: the model is faster with this layer in float on {recipe.ep}"
            base = trial
            recipe.latency_decisions.append({"layer": name, "quantized_ms": c["b_ms"], "float_ms": c["a_ms"],
                                             "ratio": 1.0 / c["ratio"], "pairs": c["pairs"], "verdict": "float faster",
                                             "quantized": False})


def guard_budgeted(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region], candidate: ir.Model,
                   the_plan: qq.Plan, max_drop: float) -> tuple[ir.Model, qq.Plan]:
    """:func:`guard_layers` after the accuracy budget, on the layers the budget left int8 (the plain
    command's order: a layer the budget keeps float is never timed; the budget's candidate is the
    base placement).  Going float only removes rounding, so the budget still holds up to noise: the
    new placement is built and scored, and when it misses ``max_drop`` the guard's moves are undone
    (their decisions say so) and the budget's candidate stays.  Returns the candidate and its plan."""
    before = dict(recipe.float_layers)
    decisions = len(recipe.latency_decisions)
    guard_layers(q, recipe, costs, base=serialize(candidate))
    if recipe.float_layers.keys() == before.keys():
        return candidate, the_plan
    moved, the_plan_moved = q.build(recipe.excluded())
    drop = q.drop(moved)
    if drop <= max_drop:
        return moved, the_plan_moved
    logger.info("latency guard: the layers it moved to float push the drop to %.4g > %g; they stay int8", drop, max_drop)
    recipe.float_layers = before
    for d in recipe.latency_decisions[decisions:]:
        d.update(quantized=True, verdict="float faster, but over the accuracy budget")
    return candidate, the_plan


# ---------------------------------------------------------------- 5. accuracy budget, final latency check

def fewest_float(q: Quantizer, excluded: frozenset, ranked: list[str],
                 max_drop: float) -> tuple[int, tuple[ir.Model, qq.Plan, float]]:
    """The fewest of the ``ranked`` layers (worst first) to keep float, besides ``excluded``, so the
    drop is within ``max_drop``: binary search on that count k, which assumes the drop falls as k
    grows (up to noise; the answer's candidate is the one built and scored, and only it is kept in
    memory); k = 0 is known to miss the budget.  Returns k and (candidate, plan, drop); all of
    them when no smaller k holds.  About log2(len(ranked)) builds.  Shared by every mode's budget."""
    best: tuple[ir.Model, qq.Plan, float] | None = None
    lo, hi = 0, len(ranked)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        cand, plan_k = q.build(excluded | set(ranked[:mid]))
        d = q.drop(cand)
        if d <= max_drop:
            hi, best = mid, (cand, plan_k, d)
        else:
            lo = mid
        del cand
    if best is None:  # only k = len(ranked) is left (never built: the loop tries k < hi)
        cand, plan_k = q.build(excluded | set(ranked))
        best = (cand, plan_k, q.drop(cand))
    return hi, best


def sensitivity(q: Quantizer, names: Sequence[str]) -> list[dict]:
    """Each layer of ``names`` with the drop it causes as the only int8 layer, worst first (one
    build and one scoring per layer).

    Pipelined: this thread builds and serializes the next layers' models (Python: it holds the GIL)
    while RANK_WORKERS threads load and score the previous ones (ORT, which releases the GIL while
    it optimizes and runs a model), one when ORT's sessions have more than one thread each.  On
    the 2-core CI machine the small GPT-2's 25 layers take 2.95-3.05 s instead of 4.4-4.9 s one
    after the other.  The scores are those of one after the other: every model has a session of its
    own and the same data.  At most RANK_AHEAD built models wait (memory stays bounded; a model
    shares its float weights with the prepared one).  A user ``--metric`` is called in this thread,
    one model after the other (user code may not be thread-safe)."""
    if q.metric is not None:
        ranking = [{"layer": n, "kind": q.candidates[n], "drop": q.drop(q.build(frozenset(set(q.candidates) - {n}))[0])}
                   for n in names]
        return sorted(ranking, key=lambda s: -s["drop"])
    drops: dict[str, float] = {}
    pending: collections.deque = collections.deque()
    workers = RANK_WORKERS if q.threads == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxopt-rank") as pool:
        try:
            for name in names:
                alone, _ = q.build(frozenset(set(q.candidates) - {name}))
                pending.append((name, pool.submit(q.score, q.source(alone))))
                del alone
                while len(pending) > RANK_AHEAD:
                    done, future = pending.popleft()
                    drops[done] = q.float_score - future.result()
            for done, future in pending:
                drops[done] = q.float_score - future.result()
        finally:
            for _, future in pending:
                future.cancel()
    ranking = [{"layer": n, "kind": q.candidates[n], "drop": drops[n]} for n in names]
    ranking.sort(key=lambda s: -s["drop"])
    return ranking


def budget(q: Quantizer, recipe: Recipe, max_drop: float) -> tuple[ir.Model, qq.Plan, float]:
    """Step 5: build the recipe's placement and score it; over ``max_drop``, rank its int8 layers by
    the drop each causes alone (``recipe.sensitivity``) and keep the fewest of the worst in float
    that meet the budget (binary search: about log2(layers) builds; all of them when none does).
    Returns the candidate, its plan and its drop."""
    candidate, the_plan = q.build(recipe.excluded())
    drop = q.drop(candidate)
    recipe.sensitivity = []
    if drop <= max_drop:
        return candidate, the_plan, drop
    del candidate
    recipe.sensitivity = sensitivity(q, list(the_plan.primary()))
    hi, (candidate, the_plan, drop) = fewest_float(q, recipe.excluded(), [s["layer"] for s in recipe.sensitivity], max_drop)
    for rank, s in enumerate(recipe.sensitivity[:hi], 1):
        recipe.float_layers[s["layer"]] = (f"accuracy budget: sensitivity rank {rank} (drop {s['drop']:.4g} "
                                           f"with only this layer int8)")
        s["kept_float"] = True
    return candidate, the_plan, drop


def final_check(q: Quantizer, recipe: Recipe, candidate: ir.Model, the_plan: qq.Plan,
                decide: bool = True) -> tuple[ir.Model, qq.Plan, dict, bool]:
    """The candidate vs fp32 on the EP (paired runs, margin 0).  With ``decide`` and the latency
    guard on, a candidate not confidently faster gives way to the float model (every layer float).
    Returns the model to write, its plan, the latency record and whether it is the float model."""
    if not the_plan.targets:  # every layer ended in float: the candidate is the prepared float model
        t = q.latency([q.float_bytes], runs=25)[0]
        return q.model, the_plan, {"float_ms": t, "quantized_ms": t, "verdict": None}, True
    c = q.compare_latency(serialize(candidate), q.float_bytes, margin=0.0)
    latency = {"float_ms": c["b_ms"], "quantized_ms": c["a_ms"], "verdict": c["verdict"], "ratio": c["ratio"],
               "interval": c["interval"], "pairs": c["pairs"]}
    if not (decide and recipe.latency_guard) or c["verdict"] == "faster":
        return candidate, the_plan, latency, False
    logger.warning("the quantized model is not confidently faster than fp32 on %s (%.3f vs %.3f ms); "
                   "writing the float model", recipe.ep, c["a_ms"], c["b_ms"])
    for name in q.candidates:
        recipe.float_layers.setdefault(name, f"final check: the int8 model was not confidently faster than fp32 "
                                             f"on {recipe.ep} ({c['verdict']}); the float model is written")
    latency["quantized_ms"] = latency["float_ms"]
    return q.model, q.plan(recipe.excluded()), latency, True


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class BudgetResult:
    """The accuracy check of the staged model, in the shape ``api.stage_validate_commit`` wants."""

    ok: bool
    metric: str
    drop: float
    max_drop: float
    replayed: bool = False

    def summary(self) -> str:
        where = "with the recipe's placement" if self.replayed else "even with every layer in float"
        return f"{self.metric} drop {self.drop:.4g} > --max-drop {self.max_drop:g} {where}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "metric": self.metric, "drop": self.drop, "max_drop": self.max_drop}


def _check_budget(q: Quantizer, report: dict, opts: Options, replayed: bool) -> Callable[[Path], BudgetResult]:
    """Score the staged file and fill ``report["accuracy"]`` (per-output fidelity without --metric)."""

    def check(path: Path) -> BudgetResult:
        drop = q.float_score - q.score(path)
        if q.metric is None:
            outputs = q.last_results
            metric = "default: " + fidelity.describe(outputs)
            for r in fidelity.uncertified(outputs, opts.max_drop):
                lo, hi = r["agreement_interval"]
                logger.warning("output '%s': %s agreement %.4f on only %d held-out positions (95%% interval "
                               "%.3f-%.3f) cannot certify the %.3g budget; more --data batches (every 4th, up to 8, "
                               "is held out) or a --metric would", r["name"], r["metric"], r["agreement"],
                               r["positions"], lo, hi, 1 - opts.max_drop)
        else:
            outputs, metric = None, opts.metric
        report["accuracy"] = {"metric": metric, "float": q.float_score, "quantized": q.float_score - drop, "drop": drop,
                              "max_drop": opts.max_drop, **({"outputs": outputs} if outputs is not None else {})}
        return BudgetResult(drop <= opts.max_drop, metric, drop, opts.max_drop, replayed)

    return check


def _report(input_path, recipe: Recipe, notes: list[str], calibration: dict, the_plan: qq.Plan, latency: dict,
            wrote_float: bool, threads: int) -> dict:
    t_q, t_f = latency["quantized_ms"], latency["float_ms"]
    return api.header("quantize", input={"path": str(input_path)}, ep=recipe.ep, method=recipe.method,
                      percentile=recipe.percentile if recipe.method == "percentile" else None,
                      per_channel=recipe.per_channel, weight_bits=recipe.bits, mode=recipe.mode,
                      activation_type="float" if recipe.mode == "weight-only" else recipe.profile.activation,
                      notes=notes, calibration=calibration,
                      recipe=recipe.to_dict(the_plan), accuracy=None,
                      latency={**latency, "speedup": t_f / t_q if t_q else None, "threads": threads},
                      wrote_float_model=wrote_float)


def _search(q: Quantizer, recipe: Recipe, opts: Options, replayed: bool) -> tuple[ir.Model, qq.Plan, dict, bool]:
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


def run(input_path: str | os.PathLike, output_path: str | os.PathLike, recipe: Recipe, opts: Options,
        replayed: bool = False) -> dict:
    """Every step, then the staged write (``api.stage_validate_commit``); returns the report.
    ``recipe`` is filled in (or, ``replayed``, applied as it is)."""
    t_start = time.perf_counter()
    recipe.check()
    runtime.provider(recipe.ep)
    if io.same_file(input_path, output_path):
        raise UsageError(f"output {output_path} is the input file; write the quantized model elsewhere")
    io.check_writable(Path(output_path))
    if (opts.search_workers != 1 or opts.search_ray is not None) and not opts.search:
        raise UsageError("--workers and --ray spread --search candidates; give --search with them")
    if opts.search:
        if replayed:
            raise UsageError("--search and --recipe: a replayed recipe is not searched")
        if opts.recipe_out is None:  # the chosen recipe is always saved
            opts.recipe_out = str(output_path) + ".recipe.json"
    if opts.recipe_out is not None:
        io.check_writable(Path(opts.recipe_out))
    metric_fn = load_metric(opts.metric)
    if recipe.mode != "static":
        from onnxopt.quantization import modes as quantize_modes

        return quantize_modes.run(input_path, output_path, recipe, opts, metric_fn, replayed, t_start)
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
        for r in q.last_results:
            logger.info("fidelity of output '%s': %s (%s)", r["name"], r["metric"], r["reason"])
    found = None
    if opts.search:
        from onnxopt.quantization import search as search_mod

        recipe, candidate, the_plan, latency, wrote_float, found = search_mod.run_search(
            q, recipe, opts.max_drop, opts.search_budget, workers=opts.search_workers, ray_address=opts.search_ray)
    else:
        candidate, the_plan, latency, wrote_float = _search(q, recipe, opts, replayed)
    report = _report(input_path, recipe, prepared.notes, calib.to_dict(), the_plan, latency, wrote_float, opts.threads)
    if found is not None:
        report["search"] = found.to_dict()
    report["seconds_quantize"] = time.perf_counter() - t0
    return commit(q, recipe, candidate, the_plan, output_path, report, opts, replayed, t_start)


def commit(q: Quantizer, recipe: Recipe, candidate: ir.Model, the_plan: qq.Plan, output_path: str | os.PathLike,
           report: dict, opts: Options, replayed: bool, t_start: float) -> dict:
    """The last step of every mode: ``cleanup`` (builds only drop the weights they replaced), stage,
    score against the budget, rename into place (or raise ValidationRefused), then save the recipe
    when asked; returns ``report``."""
    def refused(_path: Path, _result: BudgetResult) -> None:
        report["seconds"] = time.perf_counter() - t_start

    candidate = pipeline.run(candidate, pipeline.parse("cleanup")).model

    api.stage_validate_commit(candidate, output_path, report, check=_check_budget(q, report, opts, replayed),
                              force=opts.force, on_refused=refused, refused="quantized model not written")
    if opts.recipe_out is not None:
        recipe.save(opts.recipe_out, the_plan)
        report["recipe_file"] = str(opts.recipe_out)
    report["seconds"] = time.perf_counter() - t_start
    return report


def quantize(input_path: str | os.PathLike, output_path: str | os.PathLike, *, data: str | os.PathLike | None,
             recipe: Recipe | str | os.PathLike | None = None, **options) -> dict:
    """Quantize ``input_path`` into ``output_path``; return the report dict (see module docstring).

    ``options``: :class:`Options` fields (``preprocess``, ``max_drop``, ``metric``, ``stats_in``,
    ``stats_out``, ``recipe_out``, ``force``, ``calib_limit``, ``threads``, ``class_outputs``: output
    name -> class axis or None for the default fidelity metric, ``progress``, ``search``,
    ``search_budget``, ``search_workers``, ``search_ray``) and, without
    ``recipe``, :class:`Recipe` settings (``method``, ``percentile``, ``ep``, ``per_channel``,
    ``recovery``, ``exclude``, ``latency_guard``, ``weight_bits``).  ``recipe`` (a Recipe or a JSON
    file) is replayed: its placement is used, no search runs.

    Raises ValidationRefused (report attached) when the accuracy budget is missed and not
    ``force``; nothing is written then.  A crash inside is one InternalError line (exit 4)."""
    settings = {f.name for f in dataclasses.fields(Recipe)} - {"float_layers", "latency_decisions", "sensitivity",
                                                                 "replayed_from"}
    given = {k: options.pop(k) for k in list(options) if k in settings}
    if recipe is not None and given:
        raise UsageError(f"a replayed recipe fixes {', '.join(sorted(given))}; do not pass them with it")
    if isinstance(recipe, (str, os.PathLike)):
        recipe = Recipe.load(recipe)
    replayed = recipe is not None
    fields: dict[str, Any] = {k: tuple(v) if k in ("recovery", "exclude") else v for k, v in given.items()}
    recipe = recipe if recipe is not None else Recipe(**fields)
    opts = Options(data=data, **options)
    try:
        return run(input_path, output_path, recipe, opts, replayed)
    except (OnnxoptError, KeyboardInterrupt):
        raise
    except Exception as e:
        logger.debug("quantize failed", exc_info=True)
        raise InternalError(f"quantize failed ({type(e).__name__}: {e}); nothing was written; "
                            f"please report it (-vv shows the traceback)") from e


def feeds_from(data: str | os.PathLike, model_bytes: bytes, preprocess: str | None = None,
               limit: int | None = None) -> list[Mapping[str, np.ndarray]]:
    """Batches of ``data`` checked against a model (tests and the benchmark use this)."""
    sess = runtime.session(model_bytes, "cpu")
    return list(data_mod.batches(data, sess, preprocess, limit))

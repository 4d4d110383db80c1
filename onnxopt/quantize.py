"""``onnxopt quantize``: static int8 QDQ quantization, guarded for latency and accuracy.

Steps (DESIGN "Quantization design"):

1. **Prepare**: refuse already-quantized models; run the default graph pipeline (BatchNorm and
   constant affine ops folded into Conv/Gemm, cleanup, shape chains folded); upgrade the opset to
   13 for per-channel weights (or fall back to per-tensor, with a warning); name every node.
   Optional float-level recovery: cross-layer equalization (``--recover cle``).
2. **Calibrate**, streaming (``onnxopt.calibrate``): one ORT run per batch with the needed tensors
   as extra outputs.  Every 4th batch (up to 8) is held out for scoring instead.
3. **Place** Q/DQ for the target EP (``passes/quantize_qdq.py``).
4. **Latency guard**: each layer kind (dense conv, pointwise, depthwise, gemm) is tried quantized
   and in float, whole-model latency on the target EP decides (``Quantizer.compare_latency``:
   interleaved paired runs, the median of the per-pair ratios with an order-statistics confidence
   interval, more pairs while it is ambiguous); a kind stays int8 only when it is faster by more
   than ``LATENCY_MARGIN`` with confidence, and a tie goes to float, so repeated runs place layers
   alike.  Then single layers go back to float only when that is clearly faster.  The result is
   never slower than fp32: unless the final model is confidently faster, the float model is written.
5. **Accuracy budget**: score = the user's metric (``--metric module:function``, called with an ORT
   session, higher is better) or by default the prediction-level fidelity of ``onnxopt.fidelity``
   on the held-out batches: top-1 agreement at every position for class-score outputs (Softmax/
   LogSoftmax/Sigmoid heads, names like ``logits``), cosine for other outputs, worst output counts;
   an agreement counts by its 95% lower bound when the held-out positions can certify the budget.
   If ``fp32 score - score > max_drop``, layers are ranked by sensitivity (quantize one alone,
   measure) and the most sensitive are kept in float until the budget holds.
6. **Recovery** on the chosen recipe (``--recover``, default ``bias-correction``): bias correction
   (per-channel mean output error, fp32 as teacher) and ``adaround`` (per-layer rounding chosen on
   calibration activations).

Validation is the budget: a result that misses it is not written (exit 3) unless ``--force``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import __version__, bench, calibrate, fidelity, io, pipeline, runtime
from onnxopt import data as data_mod
from onnxopt.errors import BadInputError, InternalError, OnnxoptError, UsageError, ValidationRefused
from onnxopt.passes import quantize_qdq as qq
from onnxopt.passes import recover

logger = logging.getLogger("onnxopt")

PREPARE_PIPELINE = pipeline.DEFAULT_PIPELINE
RECOVERY = ("bias-correction", "cle", "adaround")
DEFAULT_RECOVERY = ("bias-correction", "adaround")
KIND_ORDER = ("depthwise", "pointwise", "conv", "gemm")
#: int8 must be faster than float by more than this fraction (with confidence) to be kept; a single
#: layer goes back to float only when that is faster by more than it too
LATENCY_MARGIN = 0.03
PER_LAYER_GUARD = 24  # layers tried one by one in float after the per-kind decisions
#: latency comparison: pairs per block, blocks at least / at most, seconds at most per comparison
PAIRS_PER_BLOCK, MIN_BLOCKS, MAX_BLOCKS, COMPARE_SECONDS = 16, 2, 6, 12.0
Z_CONFIDENCE = 2.0  # ~95% two-sided interval for the median ratio (order statistics)


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


def prepare(model: ir.Model, per_channel: bool) -> tuple[ir.Model, bool, list[str]]:
    """Graph cleanup and folding, opset >= 13 when per-channel is asked; returns the model, whether
    per-channel is possible, and notes for the report."""
    notes = []
    already = qq.quant_ops(model)
    if already:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(already.items()))
        raise BadInputError(f"the model is already quantized ({ops}); left alone, nothing written")
    overridable = [v for v in model.graph.inputs if v.const_value is not None]
    if overridable:  # keep_initializers_as_inputs: int8 weights cannot stay overridable float inputs
        for v in overridable:
            model.graph.inputs.remove(v)
        notes.append(f"{len(overridable)} initializer(s) removed from the graph inputs (they become fixed weights)")
    model = pipeline.run(model, pipeline.parse(PREPARE_PIPELINE)).model
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


class Quantizer:
    """Holds the prepared float model, calibration statistics and scoring data; builds and
    measures candidate quantized models for a set of float-kept layers."""

    def __init__(self, model: ir.Model, float_bytes: bytes, stats: calibrate.Stats, held_out: list[dict],
                 recovery_set: list[dict], profile: qq.Profile, method: str, per_channel: bool, ep: str,
                 metric: Callable | None, threads: int = 1, percentile: float = 99.99,
                 recovery: tuple[str, ...] = (), class_outputs: Mapping[str, int | None] | None = None,
                 max_drop: float | None = None):
        self.model, self.float_bytes, self.stats = model, float_bytes, stats
        self.held_out, self.recovery_set = held_out, recovery_set
        self.profile, self.method, self.per_channel, self.ep, self.metric = profile, method, per_channel, ep, metric
        self.threads, self.recovery = threads, recovery
        self.qmax = qq.weight_qmax(ep)
        self.candidates = qq.candidates(model)
        self.full_plan = qq.plan(model, profile)
        self.ranges = stats.ranges(method, self.full_plan.stats_names(), p=percentile)
        missing = [n for n in self.full_plan.stats_names() if n not in self.ranges]
        if missing:
            raise BadInputError(f"calibration statistics lack {len(missing)} tensor(s) this model needs, e.g. "
                                f"'{missing[0]}' (statistics from another model?)")
        #: how each output is judged without --metric (onnxopt.fidelity); per-output results of the last score
        self.rules = fidelity.rules(model, class_outputs)
        self.max_drop = max_drop
        self.last_results: list[dict] = []
        self.float_session = runtime.session(self.float_bytes, ep, threads)
        self.reference = [runtime.run(self.float_session, f) for f in held_out]
        self.float_score = self.score_session(self.float_session, self.reference)
        if metric is None:  # fp32 agrees with itself everywhere; a sample's lower bound is not its score
            self.float_score = 1.0

    # Recovery data that does not depend on the plan: computed once for every layer, not per build.
    @functools.cached_property
    def rounded_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return recover.adaround(self.model, self.full_plan, self.recovery_set, self.float_bytes, self.per_channel, self.qmax)

    @functools.cached_property
    def input_means(self) -> dict[str, np.ndarray]:
        return recover.input_means(self.model, self.full_plan.primary(), self.recovery_set)

    # ---------------------------------------------------------------- building
    def build(self, exclude=frozenset(), recovery: tuple[str, ...] | None = None) -> tuple[ir.Model, qq.Plan]:
        recovery = self.recovery if recovery is None else recovery
        the_plan = qq.plan(self.model, self.profile, exclude)
        model = self.model.clone()
        weights = self.rounded_weights if "adaround" in recovery else {}
        qq.QuantizeQDQ(the_plan, self.ranges, self.profile, self.per_channel, self.qmax, weights)(model)
        if "bias-correction" in recovery:
            recover.bias_correction(model, the_plan, self.model, self.input_means)
        model = pipeline.run(model, pipeline.parse("cleanup")).model
        return model, the_plan

    # ---------------------------------------------------------------- scoring
    def score_session(self, sess, reference=None) -> float:
        if self.metric is not None:
            try:
                return float(self.metric(sess))
            except Exception as e:  # noqa: BLE001 - user code
                raise UsageError(f"--metric failed: {type(e).__name__}: {e}") from None
        fid = fidelity.Fidelity(self.rules, self.max_drop)
        for feeds, ref in zip(self.held_out, reference or self.reference):
            fid.add(ref, runtime.run_candidate(sess, feeds, list(ref)))
        self.last_results = fid.results()
        return min((r["score"] for r in self.last_results), default=1.0)

    def score(self, model: ir.Model) -> float:
        return self.score_session(runtime.session(serialize(model), self.ep, self.threads))

    def drop(self, model: ir.Model) -> float:
        return self.float_score - self.score(model)

    # ---------------------------------------------------------------- latency
    def _sessions(self, models: list[bytes]):
        feeds = self.held_out[0]
        sessions = [runtime.session(m, self.ep, self.threads) for m in models]
        inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        for s, f in zip(sessions, inputs):
            for _ in range(3):
                s.run(None, f)
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

    def compare_latency(self, a: bytes, b: bytes, margin: float = LATENCY_MARGIN, max_blocks: int = MAX_BLOCKS) -> dict:
        """Is model ``a`` faster than ``b`` by more than ``margin``, with confidence?

        Runs interleave in pairs (a then b, b then a, alternating, one process, fixed feeds) so a
        machine that slows down slows both alike; each pair gives a ratio t_a / t_b.  After every
        block of PAIRS_PER_BLOCK pairs (at least MIN_BLOCKS), the median ratio's ~95% interval from
        order statistics is checked against ``1 - margin``: wholly below -> ``"faster"``, wholly
        above -> ``"not faster"``; still straddling after MAX_BLOCKS (or COMPARE_SECONDS) ->
        ``"tie"``, which callers resolve to the simpler choice.  A real difference far from the
        threshold gives the same verdict run after run; one near it gives "tie", not a coin flip.
        Returns the verdict, medians in ms, the median ratio and its interval, and the pair count."""
        sessions, inputs = self._sessions([a, b])
        ta: list[float] = []
        tb: list[float] = []
        verdict, lo, hi = "tie", 0.0, math.inf
        deadline = time.perf_counter() + COMPARE_SECONDS
        threshold = 1.0 - margin
        for block in range(max(max_blocks, MIN_BLOCKS)):
            for i in range(PAIRS_PER_BLOCK):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                t = {}
                for k in order:
                    t[k] = bench.timed_run(sessions[k], inputs[k])
                ta.append(t[0])
                tb.append(t[1])
            if block + 1 < MIN_BLOCKS:
                continue
            ratios = np.sort(np.asarray(ta) / np.maximum(np.asarray(tb), 1e-9))
            n = len(ratios)
            k = max(0, math.floor(n / 2 - Z_CONFIDENCE * math.sqrt(n) / 2))
            lo, hi = float(ratios[k]), float(ratios[n - 1 - k])
            if hi < threshold:
                verdict = "faster"
                break
            if lo > threshold:
                verdict = "not faster"
                break
            if time.perf_counter() > deadline:
                break
        ratio = float(np.median(np.asarray(ta) / np.maximum(np.asarray(tb), 1e-9)))
        return {"verdict": verdict, "a_ms": float(np.median(ta)), "b_ms": float(np.median(tb)), "ratio": ratio,
                "interval": [lo, hi], "pairs": len(ta)}


def quantize(input_path: str | os.PathLike, output_path: str | os.PathLike, **options) -> dict:
    """Quantize ``input_path`` into ``output_path`` (options: see ``_quantize``); a crash inside is
    one InternalError line (exit 4) and nothing is written."""
    try:
        return _quantize(input_path, output_path, **options)
    except (OnnxoptError, KeyboardInterrupt):
        raise
    except Exception as e:
        logger.debug("quantize failed", exc_info=True)
        raise InternalError(f"quantize failed ({type(e).__name__}: {e}); nothing was written; "
                            f"please report it (-vv shows the traceback)") from e


def _quantize(input_path: str | os.PathLike, output_path: str | os.PathLike, *, data: str | os.PathLike,
             preprocess: str | None = None, method: str = "percentile", percentile: float = 99.99,
             ep: str = "cpu", max_drop: float = 0.01, metric: str | None = None,
             stats_in: str | os.PathLike | None = None, stats_out: str | os.PathLike | None = None,
             recovery: tuple[str, ...] = DEFAULT_RECOVERY, latency_guard: bool = True,
             per_channel: bool = True, force: bool = False, calib_limit: int | None = None,
             threads: int = 1, progress: bool = False, exclude: tuple[str, ...] = (),
             class_outputs: Mapping[str, int | None] | None = None) -> dict:
    """Quantize ``input_path`` into ``output_path``; return the report dict (see module docstring).

    ``class_outputs`` declares outputs for the default fidelity metric: name -> class axis (top-1
    agreement) or None (cosine), overriding what ``onnxopt.fidelity.rules`` reads from the graph.

    Raises ValidationRefused (report attached) when the accuracy budget cannot be met and not
    ``force``; nothing is written then."""
    t_start = time.perf_counter()
    if method not in calibrate.METHODS:
        raise UsageError(f"--method '{method}': choose from {', '.join(calibrate.METHODS)}")
    unknown = [r for r in recovery if r not in RECOVERY]
    if unknown:
        raise UsageError(f"--recover '{unknown[0]}': choose from {', '.join(RECOVERY)} or none")
    if ep not in qq.PROFILES:
        raise UsageError(f"--ep '{ep}': quantize targets {', '.join(qq.PROFILES)}")
    runtime.provider(ep)
    if io.same_file(input_path, output_path):
        raise UsageError(f"output {output_path} is the input file; write the quantized model elsewhere")
    io.check_writable(Path(output_path))
    metric_fn = load_metric(metric)

    model = io.load(input_path)
    if next(io.external_tensors(model), None) is not None and io.weight_bytes(model) > (1 << 31):
        raise BadInputError("models over 2 GB are not quantized yet (their weights would be held in memory twice)")
    t0 = time.perf_counter()
    model, per_channel, notes = prepare(model, per_channel)
    if "cle" in recovery:
        notes.append(f"cross-layer equalization: {recover.cle(model)['pairs equalized']} conv pairs")
    float_bytes = serialize(model)
    full = qq.plan(model, qq.PROFILES[ep])
    if not full.targets:
        raise BadInputError("nothing to quantize: no Conv, Gemm or MatMul with constant float weights in the main graph")

    # ---- calibration (streaming) + held-out batches for scoring
    stats_names = full.stats_names()
    held_out: list[dict] = []
    recovery_set: list[dict] = []
    calib_seconds = 0.0
    tc = time.perf_counter()
    plain = runtime.session(float_bytes, "cpu", threads, optimize=False)

    def stream():
        for i, feeds in enumerate(data_mod.batches(data, plain, preprocess, calib_limit)):
            if i % 4 == 3 and len(held_out) < 8:
                held_out.append(feeds)
                continue
            if len(recovery_set) < 8:
                recovery_set.append(feeds)
            yield feeds

    if stats_in is not None:
        stats = calibrate.Stats.load(stats_in)
        for feeds in stream():  # still need held-out / recovery batches
            for k, v in feeds.items():
                if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                    raise BadInputError(f"data: input '{k}' contains NaN or Inf")
            if len(held_out) >= 8 and len(recovery_set) >= 8:
                break
    else:
        extra = runtime.session(runtime.with_outputs(ir.to_proto(model), stats_names), "cpu", threads, optimize=False)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(desc="calibrating", unit="batch", delay=2, leave=False)
        try:
            stats = calibrate.collect(extra, stats_names, stream(), progress=bar)
        finally:
            if bar is not None:
                bar.close()
        del extra
        stats.source = str(data)
        if stats_out is not None:
            stats.save(stats_out)
    calib_seconds = time.perf_counter() - tc
    if not held_out:
        held_out = recovery_set[-1:] or []
    if not held_out:
        raise BadInputError(f"{data}: no calibration batch was read")

    profile = qq.PROFILES[ep]
    q = Quantizer(model, float_bytes, stats, held_out, recovery_set, profile, method, per_channel, ep, metric_fn,
                  threads, percentile, recovery=tuple(r for r in recovery if r != "cle"), class_outputs=class_outputs,
                  max_drop=max_drop)
    if metric_fn is None:
        for r in q.last_results:
            logger.info("fidelity of output '%s': %s (%s)", r["name"], r["metric"], r["reason"])
    kinds = q.candidates
    excluded = {n for n, k in kinds.items() if k in profile.float_kinds} | set(exclude)
    decisions: list[dict] = []

    # ---- latency guard over layer kinds
    if latency_guard:
        for kind in KIND_ORDER:
            members = {n for n, k in kinds.items() if k == kind}
            if not members:
                continue
            with_q = serialize(q.build(frozenset(excluded - members))[0])
            without = serialize(q.build(frozenset(excluded | members))[0])
            c = q.compare_latency(with_q, without)
            keep = c["verdict"] == "faster"  # a tie goes to float: int8 must pay clearly
            decisions.append({"kind": kind, "layers": len(members), "quantized_ms": c["a_ms"], "float_ms": c["b_ms"],
                              "ratio": c["ratio"], "interval": c["interval"], "pairs": c["pairs"],
                              "verdict": c["verdict"], "quantized": bool(keep)})
            excluded = excluded - members if keep else excluded | members
        # then layer by layer (bounded: at most PER_LAYER_GUARD layers), since a kind that pays
        # overall may hold single layers that do not (e.g. a 1-channel stem)
        quantized = [n for n in q.candidates if n not in excluded]
        if len(quantized) <= PER_LAYER_GUARD:
            base = serialize(q.build(frozenset(excluded))[0])
            for name in quantized:
                trial = serialize(q.build(frozenset(excluded | {name}))[0])
                # back to float only when that is clearly faster; one layer rarely is, so no extra blocks
                c = q.compare_latency(trial, base, max_blocks=MIN_BLOCKS)
                if c["verdict"] == "faster":
                    excluded.add(name)
                    base = trial
                    decisions.append({"layer": name, "quantized_ms": c["b_ms"], "float_ms": c["a_ms"],
                                      "ratio": 1.0 / c["ratio"], "pairs": c["pairs"], "verdict": "float faster",
                                      "quantized": False})

    # ---- accuracy budget
    candidate, the_plan = q.build(frozenset(excluded))
    drop = q.drop(candidate)
    sensitivity: list[dict] = []
    if drop > max_drop:
        for name in the_plan.primary():
            alone, _ = q.build(frozenset(set(kinds) - {name}))
            sensitivity.append({"layer": name, "kind": kinds[name], "drop": q.drop(alone)})
        sensitivity.sort(key=lambda s: -s["drop"])
        for s in sensitivity:
            if drop <= max_drop:
                break
            excluded.add(s["layer"])
            candidate, the_plan = q.build(frozenset(excluded))
            drop = q.drop(candidate)
            s["kept_float"] = True

    # ---- final latency check: never slower than fp32
    wrote_float = not the_plan.targets
    final_verdict = None
    if wrote_float:  # every layer ended in float: the candidate is the prepared float model
        candidate = model
        t_q = t_f = q.latency([float_bytes], runs=25)[0]
    else:
        c = q.compare_latency(serialize(candidate), float_bytes, margin=0.0)
        t_q, t_f, final_verdict = c["a_ms"], c["b_ms"], c["verdict"]
    if latency_guard and not wrote_float and final_verdict != "faster":  # a tie writes the float model
        logger.warning("the quantized model is not confidently faster than fp32 on %s (%.3f vs %.3f ms); "
                       "writing the float model", ep, t_q, t_f)
        candidate, the_plan, drop, wrote_float = model, qq.plan(model, profile, frozenset(kinds)), 0.0, True
        t_q = t_f
    if metric_fn is None:  # per-output fidelity of what is written (deterministic: same drop as above)
        drop = q.float_score - q.score(candidate)
        outputs = q.last_results
        metric_name = "default: " + fidelity.describe(outputs)
        for r in fidelity.uncertified(outputs, max_drop):
            lo, hi = r["agreement_interval"]
            logger.warning("output '%s': %s agreement %.4f on only %d held-out positions (95%% interval %.3f-%.3f) "
                           "cannot certify the %.3g budget; more --data batches (every 4th, up to 8, is held out) "
                           "or a --metric would", r["name"], r["metric"], r["agreement"], r["positions"], lo, hi,
                           1 - max_drop)
    else:
        outputs, metric_name = None, metric
    quantize_seconds = time.perf_counter() - t0

    report: dict = {
        "tool": "onnxopt", "version": __version__, "command": "quantize",
        "input": {"path": str(input_path)},
        "ep": ep, "method": method, "percentile": percentile if method == "percentile" else None,
        "per_channel": per_channel, "weight_bits": 8 if q.qmax == 127 else 7,
        "activation_type": profile.activation, "notes": notes,
        "calibration": {"batches": stats.batches, "held_out": len(held_out), "tensors": len(stats.tensors),
                        "bins": stats.bins, "seconds": calib_seconds, "stats_file": str(stats_in or stats_out or "") or None},
        "recipe": {**the_plan.describe(), "recovery": list(q.recovery) + (["cle"] if "cle" in recovery else []),
                   "latency_decisions": decisions, "sensitivity": sensitivity},
        "accuracy": {"metric": metric_name, "float": q.float_score, "quantized": q.float_score - drop,
                     "drop": drop, "max_drop": max_drop, **({"outputs": outputs} if outputs is not None else {})},
        "latency": {"float_ms": t_f, "quantized_ms": t_q, "speedup": t_f / t_q if t_q else None, "threads": threads},
        "wrote_float_model": wrote_float,
        "seconds_quantize": quantize_seconds,
    }
    ok = drop <= max_drop
    with io.StagedModel(candidate, output_path) as staged:
        report["output"] = {"path": str(output_path), "file_bytes": staged.size_bytes()}
        if not ok and not force:
            report["written"] = False
            report["seconds"] = time.perf_counter() - t_start
            raise ValidationRefused(f"quantized model not written: {report['accuracy']['metric']} drop {drop:.4g} > "
                                    f"--max-drop {max_drop:g} even with every layer in float", report)
        staged.commit()
    report["written"] = True
    report["seconds"] = time.perf_counter() - t_start
    return report


def feeds_from(data: str | os.PathLike, model_bytes: bytes, preprocess: str | None = None,
               limit: int | None = None) -> list[Mapping[str, np.ndarray]]:
    """Batches of ``data`` checked against a model (tests and the benchmark use this)."""
    sess = runtime.session(model_bytes, "cpu")
    return list(data_mod.batches(data, sess, preprocess, limit))

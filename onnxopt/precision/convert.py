"""``onnxopt convert --fp16``: mixed-precision float16 for GPU EPs, validated on the CPU EP.

Steps (each a function, in the order :func:`convert` calls them):

1. **Load and refuse** what cannot be converted, with one line (``BadInputError``, exit 2): a model
   that is already float16/bfloat16 or quantized (``passes.convert_fp16.decline_reason``).
2. **Ranges** (:func:`observe_ranges`): the original runs on ORT with every main-graph tensor as an
   extra output, batch after batch from ``--data`` (streaming, ``onnxopt.data``), folded into each
   tensor's largest magnitude (:func:`fold_max_abs`; activations are never kept; a tensor infinite in
   the float model itself, an intended -inf mask, stays float32).  Without ``--data`` the
   inputs are synthesized (seed 0 and a variation, see ``validate.variation_points``) and the report
   says so: real inputs may reach larger values.
3. **Convert** (``passes.convert_fp16.convert_model``): tensors whose max |x| exceeds the limit
   (65504 / 4 by default), their producers and consumers stay float32, with the block lists and
   the boundary rule; Casts at the edges.
4. **Validate** (:class:`Fp16Check`) on the CPU EP with the fp16 tolerances (``validate.LOSSLESS_FP16``,
   rtol 1e-2 / atol 1e-3 per output) at the validator's input points (the first data batch or
   synthesized inputs, plus a variation).  The CPU EP runs most fp16 ops by casting to float32 and
   drops the Casts between consecutive ones, so a chain of fp16 ops is computed in float32 and an
   overflow that a GPU would produce never shows; the check therefore runs the candidate through
   :func:`faithful_session`, which makes ORT round (and overflow) every fp16 tensor as fp16
   kernels would.  Outputs outside tolerance (inf/NaN included) refuse the
   result (exit 3) unless ``force``.
5. **Write** through ``core.stage_validate_commit`` (atomic; nothing written when refused).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import calibrate, io, runtime
from onnxopt import data as data_mod
from onnxopt import validation as validate
from onnxopt.base import name_of, node_name, present
from onnxopt.commands import core
from onnxopt.errors import BadInputError, UsageError
from onnxopt.precision import budget
from onnxopt.precision import fp16 as cf
from onnxopt.precision.faithful import faithful_session

logger = logging.getLogger("onnxopt")


@dataclasses.dataclass
class Ranges:
    """Max |x| per main-graph float32 tensor and where it came from."""

    max_abs: dict[str, float]
    dtypes: dict[str, str]
    source: str  # "data" or "synthesized"
    batches: int

    def to_dict(self, limit: float, top: int = 10) -> dict:
        largest = sorted(self.max_abs.items(), key=lambda kv: -kv[1])[:top]
        return {"source": self.source, "batches": self.batches, "tensors": len(self.max_abs), "limit": limit,
                "over_limit": sum(1 for v in self.max_abs.values() if v > limit),
                "over_fp16_max": sum(1 for v in self.max_abs.values() if v > cf.FP16_MAX),
                "largest": [{"tensor": k, "max_abs": v} for k, v in largest]}


def observe_ranges(path: str | os.PathLike, model: ir.Model, data: str | os.PathLike | None, *,
                   preprocess: str | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   limit: int | None = None, progress: core.ProgressFn | None = None) -> Ranges:
    """Step 2: the streaming largest magnitude (:func:`fold_max_abs`) of every float main-graph tensor."""
    plain = runtime.session(path, "cpu")
    names = [v.name for v in model.graph.inputs if v.name] + \
        [o.name for n in model.graph for o in n.outputs if o.name]
    names = list(dict.fromkeys(names))
    extra = runtime.session(runtime.with_outputs_of(runtime.source_of(model), names), "cpu", optimize=False)
    feeds: Iterable[dict[str, np.ndarray]]
    if data is not None:
        feeds = data_mod.batches(data, plain, preprocess, limit)
    else:
        feeds = [p.feeds for p in validate.synthesized_points(plain, shapes) if p.reference is not None]
    stream = iter(feeds)
    first = next(stream, None)
    if first is None:
        raise BadInputError(f"{data}: no batch was read")
    probe = runtime.run(extra, first, names)
    dtypes = {k: str(v.dtype) for k, v in probe.items()}
    floats = [n for n in names if probe[n].dtype == np.float32]
    max_abs, batches = fold_max_abs(extra, floats, itertools.chain([first], stream), progress)
    return Ranges(max_abs, dtypes, "data" if data is not None else "synthesized", batches)


def fold_max_abs(sess, names: list[str], feeds_iter: Iterable[Mapping[str, np.ndarray]],
                 progress: core.ProgressFn | None = None) -> tuple[dict[str, float], int]:
    """Per tensor of ``names``, the largest magnitude over every batch (no histogram: fp16 needs only
    the range), and the batch count.  A tensor that is infinite or NaN in the float model itself (an
    intended -inf attention mask, float32's lowest as a mask fill) gets ``inf``: it stays float32, not a
    refusal.  NaN/Inf in an input batch is bad data (one line).  Memory: one batch's tensors."""
    out: dict[str, float] = {}
    count = 0
    for feeds in feeds_iter:
        calibrate.check_finite(feeds, f"data batch {count}")
        outputs = runtime.run(sess, feeds, names)
        for n in names:
            x = np.asarray(outputs[n])
            if x.size:
                m = float(np.max(np.abs(x)))
                out[n] = max(out.get(n, 0.0), m if math.isfinite(m) else math.inf)
        count += 1
        if progress is not None:
            progress(1)
    if count == 0:
        raise BadInputError("the data are empty: no batch was read")
    return out, count


def fill_types(model: ir.Model, dtypes: Mapping[str, str]) -> int:
    """Give untyped main-graph values the type ORT computed for them (custom-op outputs that onnx
    shape inference cannot type); returns how many."""
    count = 0
    for node in model.graph:
        for out in node.outputs:
            if out.dtype is None and out.name in dtypes:
                out.dtype = ir.DataType.from_numpy(np.dtype(dtypes[name_of(out)]))
                count += 1
    return count


@dataclasses.dataclass
class Fp16Result:
    """A validation result (``core.CheckResult``) plus the fp16 tensors that were non-finite."""

    result: validate.ValidationResult
    nonfinite_tensors: dict[str, int]
    materialized: int

    @property
    def ok(self) -> bool:
        return self.result.ok

    def summary(self) -> str:
        return self.result.summary()

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "materialized_fp16_tensors": self.materialized,
                "nonfinite_fp16_tensors": self.nonfinite_tensors}


_LOAD_SCRIPT = ("import sys, onnxruntime as ort\n"
                "o = ort.SessionOptions(); o.log_severity_level = 4\n"
                "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n")


def crashes_default_session(path: str | os.PathLike, timeout: float = 120.0) -> str:
    """Why ORT's CPU EP dies creating a session of ``path`` with its default (all) graph
    optimizations, in a child process ("" when it does not).  ORT 1.32 segfaults on some fp16
    graphs (e.g. a Transpose feeding an fp16 MatMul in crnn) at that level only, which the
    validation sessions (optimizations off) would not see."""
    import signal
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"creating a session did not finish in {timeout:g} s"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return f"ONNX Runtime's CPU EP crashed ({name}) creating a session with its default graph optimizations"
    return ""


#: ops ORT's CPU EP has no fp16 kernel for and that sit in fp16 graphs' crash reports: tried in float32 first
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


def crash_free(build: budget.Builder, notes: list[str]) -> budget.Builder:
    """``build``, with the fewest fp16 nodes kept float32 that ORT's CPU EP needs not to crash creating a
    session of the candidate at its default optimizations (:func:`crashes_default_session`; an ORT bug,
    but the model must load where users run it).  Tries the recurrent nodes first, then narrows a window
    of nodes in graph order by two binary searches (monotone in the nodes kept: all kept is the original,
    which loads): about 2 log2(fp16 nodes) sessions in a child process.  Unchanged when nothing crashes."""
    import tempfile

    def crashes(kept: Iterable[str]) -> str:
        model, _ = dataclasses.replace(build, node_block_list=build.node_block_list + tuple(kept))()
        with tempfile.TemporaryDirectory(prefix=io.staging_prefix() + "crash-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            ir.save(model, str(path), external_data="candidate.onnx.data" if next(io.external_tensors(model), None) else None)
            return crashes_default_session(path)

    why = crashes(())
    if not why:
        return build
    model, _ = build()
    half = [node_name(n) for n in model.graph if n.op_type != "Cast" and n.name
            and any(o.dtype == ir.DataType.FLOAT16 for o in n.outputs)]
    kept = [node_name(n) for n in model.graph if n.op_type in RECURRENT and node_name(n) in set(half)]
    if not kept or crashes(kept):
        lo, hi = 0, len(half)  # smallest end k with half[:k] kept float32 and no crash
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if not crashes(half[:mid]) else (mid + 1, hi)
        end, lo, hi = lo, 0, lo  # largest start j with half[j:end] still enough
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if not crashes(half[mid:end]) else (lo, mid - 1)
        kept = half[lo:end]
        if crashes(kept):
            return build  # nothing narrower found: the check refuses as before
    notes.append(f"{len(kept)} node(s) kept float32 so that ONNX Runtime's CPU EP does not crash creating a session "
                 f"({why}; an ORT bug with fp16 graphs): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
    logger.warning("%s", notes[-1])
    return dataclasses.replace(build, node_block_list=build.node_block_list + tuple(kept))


class Fp16Check:
    """Step 4: the candidate against the original's outputs at the validator's points, every
    float16 tensor rounded (:func:`faithful_session`); float16 graph inputs get the
    points' inputs cast to float16, float16 outputs are compared in float32."""

    def __init__(self, validator: validate.Validator):
        self.validator = validator

    def __call__(self, path: Path) -> Fp16Result:
        model = ir.load(str(path))
        half_inputs = {v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT16}
        try:
            sess, fp16 = faithful_session(model)
        except BadInputError as e:
            return Fp16Result(self._failed(str(e)), {}, 0)
        merged: dict[str, validate.OutputComparison] = {}
        nonfinite: dict[str, int] = {}
        tol = self.validator.tolerance
        for index, point in enumerate(p for p in self.validator.points if p.reference is not None):
            reference = present(point.reference)  # points without one are filtered out
            feeds = {k: (v.astype(np.float16) if k in half_inputs else v) for k, v in point.feeds.items()}
            try:
                got = runtime.run_candidate(sess, feeds, list(reference) + fp16)
            except BadInputError as e:
                return Fp16Result(self._failed(str(e)), nonfinite, len(fp16))
            for name in fp16:
                bad = int(np.count_nonzero(~np.isfinite(got[name]))) if name in got else 0
                if bad:
                    nonfinite[name] = max(nonfinite.get(name, 0), bad)
            outputs = {k: (got[k].astype(reference[k].dtype) if k in got and got[k].dtype == np.float16 else got.get(k))
                       for k in reference}
            for c in validate.compare(reference, {k: v for k, v in outputs.items() if v is not None}, tol):
                if index and not c.ok:
                    c.reason = f"at {point.label}: {c.reason}"
                merged[c.name] = merged[c.name].merge(c) if c.name in merged else c
        crash = crashes_default_session(path)
        if crash:  # an ORT bug, but the model must load where users run it
            return Fp16Result(self._failed(crash + " (an ORT bug with fp16 graphs; keep the nodes around it in "
                                           "float32 with --node-block-list)"), nonfinite, len(fp16))
        return Fp16Result(validate.ValidationResult(list(merged.values()), tol), nonfinite, len(fp16))

    def check_model(self, model: ir.Model) -> Fp16Result:
        """Check an in-memory model (``optimize --verify-each`` after each pass) through a temporary file."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix=io.staging_prefix() + "fp16-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            ir.save(model, str(path), external_data="candidate.onnx.data" if next(io.external_tensors(model), None) else None)
            return self(path)

    def _failed(self, message: str) -> validate.ValidationResult:
        ref = self.validator.reference
        return validate.ValidationResult(
            [validate.OutputComparison(name, False, tuple(np.shape(v)), None, str(np.asarray(v).dtype),
                                       reason=message if "crashed" in message else
                                       f"the converted model fails on ONNX Runtime: {message}")
             for name, v in ref.items()], self.validator.tolerance)


def _check_lists(op_block_list: tuple[str, ...], node_block_list: tuple[str, ...], model: ir.Model) -> list[str]:
    """Names in the block lists that the model does not have: warnings, not errors (a shared list
    may name ops of other models)."""
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    nodes = {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    notes = [f"--node-block-list '{n}': no node of that name" for n in node_block_list if n not in nodes]
    for note in notes:
        logger.warning("%s", note)
    unknown = [o for o in op_block_list if o not in ops and o not in cf.DEFAULT_OP_BLOCK_LIST]
    return notes + [f"--op-block-list '{o}': the model has no {o} node" for o in unknown]


@dataclasses.dataclass
class Settings:
    """How ``convert`` works: ``op_block_list`` op types kept float32 (``"default,Softmax"``: the
    defaults plus Softmax; None: the defaults); ``node_block_list`` node names; ``limit`` the
    largest max |x| a tensor may reach and stay fp16; ranges from ``data`` (else synthesized); the
    result judged by ``max_drop`` of ``metric`` (None: the default fidelity, ``class_outputs``
    naming class-score outputs) on the held-out batches (``onnxopt.precision.budget``)."""

    keep_io_types: bool = True
    op_block_list: str | Iterable[str] | None = None
    node_block_list: str | Iterable[str] | None = None
    data: str | os.PathLike | None = None
    preprocess: str | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    calib_limit: int | None = None
    limit: float = cf.DEFAULT_LIMIT
    validate_result: bool = True
    force: bool = False
    max_drop: float = 0.01
    metric: str | None = None
    class_outputs: Mapping[str, int | None] | None = None


def _usage(input_path: str | os.PathLike, output_path: str | os.PathLike, s: Settings) -> None:
    if io.same_file(input_path, output_path):
        raise UsageError(f"output {output_path} is the input file; write the converted model elsewhere")
    if not 0 < s.limit <= cf.FP16_MAX:
        raise UsageError(f"--limit {s.limit:g}: must be in (0, {cf.FP16_MAX:g}]")
    if not 0 <= s.max_drop < 1:
        raise UsageError(f"--max-drop {s.max_drop:g}: must be in [0, 1)")
    io.check_writable(Path(output_path))


def _teacher(input_path: str | os.PathLike, model: ir.Model, source: bytes | runtime.Light,
             s: Settings) -> tuple[budget.Teacher, list[str]]:
    """The budget's judge: the fp32 model on the held-out batches (``budget.held_out_batches``), and their labels."""
    held, labels = budget.held_out_batches(input_path, s.data, preprocess=s.preprocess, shapes=s.shapes,
                                           limit=s.calib_limit)
    teacher = budget.make_teacher(model, source, held, metric=s.metric, max_drop=s.max_drop,
                                  class_outputs=s.class_outputs, synthesized=s.data is None)
    if s.data is not None:
        teacher.learn_from(budget.other_batches(input_path, s.data, preprocess=s.preprocess, limit=s.calib_limit))
    return teacher, labels


def _budget_line(search: budget.Search, drop: float, max_drop: float) -> str:
    names = sorted(search.kept)
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return (f"kept {len(names)} node{'s' if len(names) != 1 else ''} fp32 for the budget (drop {search.drop_all_fp16:.4g} "
            f"with every node fp16, {drop:.4g} now, --max-drop {max_drop:g}): {shown}")


def _check(validator: validate.Validator, judge: tuple[budget.Teacher, list[str]] | None, report: dict,
           max_drop: float) -> Callable[[Path], budget.Decision]:
    """The staged file's check: the elementwise fp16 check (the report's ``validation``, information)
    and the budget scored fp16-faithfully (``report["accuracy"]``) decide together (``budget.Decision``)."""
    elementwise = Fp16Check(validator)

    def check(path: Path) -> budget.Decision:
        result = elementwise(path)
        if judge is None:
            return budget.Decision(result, None)
        teacher, labels = judge
        score = budget.score(teacher, path)
        drop = teacher.float_score - score
        drop = drop if drop == drop else float("inf")
        metric = teacher.metric_label()
        accuracy = {"metric": metric, "float": teacher.float_score, "converted": score, "drop": drop,
                    "max_drop": max_drop, "held_out": labels}
        if teacher.metric is None:
            accuracy["outputs"] = teacher.last_results
        report["accuracy"] = accuracy
        return budget.Decision(result, budget.BudgetResult(drop <= max_drop, metric, drop, max_drop))

    return check


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, s: Settings,
            progress: core.ProgressFn | None = None) -> dict:
    """Convert ``input_path`` to mixed-precision fp16 into ``output_path``; return the report.
    Raises BadInputError for a model already fp16 or quantized, ValidationRefused (report
    attached) when the result misses the budget (after the search for nodes to keep float32) or
    the elementwise check finds inf/NaN or a model ORT cannot run, and not ``s.force``."""
    t_start = time.perf_counter()
    _usage(input_path, output_path, s)
    ops = cf.parse_list("default" if s.op_block_list is None else s.op_block_list, cf.DEFAULT_OP_BLOCK_LIST)
    nodes = cf.parse_list(s.node_block_list)
    model = io.load_inline(input_path, runtime.LIGHT_ABOVE)  # bigger: weights stay in their file, memory-mapped
    before = core.model_stats(model, input_path)
    reason = cf.decline_reason(model)
    if reason:
        raise BadInputError(f"{input_path}: {reason}; nothing written")
    notes = _check_lists(ops, nodes, model)
    ranges = observe_ranges(input_path, model, s.data, preprocess=s.preprocess, shapes=s.shapes, limit=s.calib_limit,
                            progress=progress)
    if ranges.source == "synthesized":
        notes.append("ranges from synthesized N(0, 1) inputs, not real data: give --data for the ranges "
                     "the model really reaches")
        logger.warning("%s", notes[-1])
    fill_types(model, ranges.dtypes)
    float_source = runtime.source_of(model)  # the teacher's; bytes of a small model are the builds' original too
    # a big model's graph with its weights as references to their file (a Light's proto names no file)
    source = float_source if isinstance(float_source, bytes) else ir.to_proto(model).SerializeToString()
    build = budget.Builder(source, s.keep_io_types, ops, nodes, s.limit, ranges.max_abs,
                           io.external_folder(model))
    if s.validate_result:
        build = crash_free(build, notes)
    validator = validate.Validator(input_path, data=s.data, preprocess=s.preprocess, shapes=s.shapes,
                                   tolerance=validate.LOSSLESS_FP16) if s.validate_result else None
    judge = _teacher(input_path, model, float_source, s) if validator is not None else None
    t0 = time.perf_counter()
    candidate, done = build()
    search = None
    if judge is not None:
        candidate, done, search = budget.fit(build, judge[0], candidate, done, s.max_drop)
    if any(g is not candidate.graph for g in candidate.graphs()):
        notes.append("subgraph (If/Loop/Scan body) tensors have no observed ranges: their nodes follow the "
                     "block lists, and a body stays float32 when its node's inputs or outputs overflow")
    report = core.header("convert", input={"path": str(input_path), **before}, target="fp16",
                         keep_io_types=s.keep_io_types, op_block_list=list(ops), node_block_list=list(nodes),
                         limit=s.limit, ranges=ranges.to_dict(s.limit), conversion=done.to_dict(),
                         notes=notes + done.notes, convert_seconds=time.perf_counter() - t0)
    if search is not None:
        report["budget_search"] = search.to_dict()

    def refused(_path: Path, _result: budget.Decision) -> None:
        report["seconds"] = time.perf_counter() - t_start

    core.stage_validate_commit(candidate, output_path, report, force=s.force, on_refused=refused,
                               check=_check(validator, judge, report, s.max_drop) if validator is not None else None,
                               refused="converted model not written (keep nodes in float32 with --node-block-list / "
                                       "--op-block-list, give --data, or --force)")
    return _finish(report, before, validator, search, t_start)


def _finish(report: dict, before: dict, validator: validate.Validator | None, search: budget.Search | None,
            t_start: float) -> dict:
    if report["validation"] is not None and validator is not None:
        report["validation"]["points"] = validator.exercised()
    if search is not None and report.get("accuracy"):
        line = _budget_line(search, report["accuracy"]["drop"], report["accuracy"]["max_drop"])
        report["notes"].append(line)
        logger.info("%s", line)
    out = report["output"]
    out["casts"] = out["ops"].get("Cast", 0)
    report["input"]["casts"] = before["ops"].get("Cast", 0)
    report["size_ratio"] = out["file_bytes"] / max(before["file_bytes"], 1)
    report["seconds"] = time.perf_counter() - t_start
    return report

"""Compare a candidate model against the original on ONNX Runtime: every output, per-output tolerance.

A float output passes when ``|got - ref| <= atol + rtol * |ref|`` everywhere, NaN/Inf at the
same positions; integer, bool and string outputs must be equal; shapes and dtypes must match.
Inputs: ``Validator`` points (a primary point and a variation; a decoder with a cache: a prompt and
a decoding step, ``onnxopt.generation``).
Cost: two ORT sessions and one run of each per set of inputs (the original's outputs are cached).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt import benchmark as bench
from onnxopt import data as data_mod
from onnxopt import generation, io, runtime
from onnxopt.base import name_of, present
from onnxopt.errors import BadInputError

logger = logging.getLogger(__name__)


METRICS = ("allclose", "max-abs", "rel", "cosine", "snr", "topk")
#: Default threshold per metric: max-abs/rel are upper bounds; cosine, snr (dB), topk (top-1
#: agreement) are lower bounds.  allclose uses rtol/atol.
DEFAULT_THRESHOLDS = {"max-abs": 1e-4, "rel": 1e-3, "cosine": 0.9999, "snr": 40.0, "topk": 0.99}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-5
    metric: str = "allclose"
    threshold: float | None = None  # for metrics other than allclose; None = DEFAULT_THRESHOLDS

    @property
    def limit(self) -> float | None:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS.get(self.metric)

    def describe(self) -> str:
        if self.metric == "allclose":
            return f"rtol={self.rtol:g} atol={self.atol:g}"
        bound = "<=" if self.metric in ("max-abs", "rel") else ">="
        return f"{self.metric} {bound} {self.limit:g}"


LOSSLESS = Tolerance(1e-4, 1e-5)
#: a lossless rewrite may move an output by this many times the original's own float noise there
#: (``Point.noise``): reassociation error, as ORT's own fusions make it; a changed weight or a
#: dropped broadcast moves outputs by orders of magnitude more
NOISE_FACTOR = 8.0
LOSSLESS_FP16 = Tolerance(1e-2, 1e-3)


def default_tolerance(model: ir.Model) -> Tolerance:
    """Lossless tolerance, loosened for models that compute in fp16/bf16."""
    low = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    values = list(model.graph.inputs) + list(model.graph.outputs) + list(model.graph.initializers.values())
    if any(v.dtype in low for v in values):
        return LOSSLESS_FP16
    return LOSSLESS


@dataclasses.dataclass
class OutputComparison:
    name: str
    ok: bool
    shape_ref: tuple
    shape_got: tuple | None
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float | None = None
    snr_db: float | None = None
    top1: float | None = None
    mismatched: int = 0
    reason: str = ""
    ep: str = "cpu"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) and k != "snr_db" else v)
                for k, v in dataclasses.asdict(self).items()}

    def merge(self, other: OutputComparison) -> OutputComparison:
        """Worst case of two batches' comparisons of the same output."""
        def worst(a, b, fn):
            return b if a is None else a if b is None else fn(a, b)
        return OutputComparison(
            self.name, self.ok and other.ok, self.shape_ref, self.shape_got, self.dtype,
            max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel),
            worst(self.cosine, other.cosine, min), worst(self.snr_db, other.snr_db, min),
            worst(self.top1, other.top1, min), self.mismatched + other.mismatched,
            self.reason if not self.ok else other.reason, self.ep)


@dataclasses.dataclass
class ValidationResult:
    outputs: list[OutputComparison]
    tolerance: Tolerance
    latency_ref_ms: float | None = None
    latency_new_ms: float | None = None
    failing_point: Point | None = None  # the first input point where an output diverged

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def failures(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.ok]

    def summary(self) -> str:
        bad = self.failures()
        if not bad:
            return f"all {len(self.outputs)} outputs match (max abs diff {self.max_abs:.3g})"
        return "; ".join(f"output '{o.name}': {o.reason}" for o in bad)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "tolerance": dataclasses.asdict(self.tolerance) if isinstance(self.tolerance, Tolerance)
            else {k: dataclasses.asdict(v) for k, v in self.tolerance.items()},
            "max_abs": self.max_abs,
            "latency_ref_ms": self.latency_ref_ms,
            "latency_new_ms": self.latency_new_ms,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray | None, tol: Tolerance,
                   slack: np.ndarray | None = None) -> OutputComparison:
    """All statistics of ``got`` against ``ref``; ``tol.metric`` decides pass/fail.  Integer, bool
    and string outputs must match exactly; NaN/Inf must sit at the same positions; shapes and
    dtypes must match.  (One statistic after another, in the order a reader checks them: long on
    purpose.)"""
    ref = np.asarray(ref)
    result = OutputComparison(name, True, tuple(ref.shape), None if got is None else tuple(np.shape(got)), str(ref.dtype))
    if got is None:
        result.ok, result.reason = False, "missing from the optimized model"
        return result
    got = np.asarray(got)
    if got.dtype != ref.dtype:
        result.ok, result.reason = False, f"dtype changed {ref.dtype} -> {got.dtype}"
        return result
    if got.shape != ref.shape:
        result.ok, result.reason = False, f"shape changed {ref.shape} -> {got.shape}"
        return result
    if ref.size == 0:
        return result
    if ref.dtype.kind not in "fc":
        diff_mask = ref != got
        result.mismatched = int(np.count_nonzero(diff_mask))
        if result.mismatched:
            if ref.dtype.kind in "iub":
                result.max_abs = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
            result.ok, result.reason = False, f"{result.mismatched} of {ref.size} values differ (exact match required)"
        return result
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    finite = np.isfinite(r)
    special_mismatch = (np.isnan(r) != np.isnan(g)) | (np.isinf(r) & (r != g))
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(r - g), 0.0)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    rel = diff / np.maximum(np.abs(r), 1e-12)
    result.max_abs = float(diff.max())
    result.max_rel = float(np.where(finite, rel, 0).max())
    rf, gf = np.where(finite, r, 0.0), np.where(finite, np.nan_to_num(g), 0.0)
    norms = float(np.linalg.norm(rf) * np.linalg.norm(gf))
    result.cosine = float(np.dot(rf.ravel(), gf.ravel()) / norms) if norms else (1.0 if not gf.any() and not rf.any() else 0.0)
    noise = float(np.sum((rf - gf) ** 2))
    result.snr_db = float(10 * np.log10(np.sum(rf ** 2) / noise)) if noise else float("inf")
    if ref.ndim >= 1 and ref.shape[-1] > 1:
        result.top1 = float(np.mean(np.argmax(rf, -1) == np.argmax(gf, -1)))
    special = int(np.count_nonzero(special_mismatch))
    if special:
        result.ok, result.mismatched = False, special
        result.reason = f"{special} NaN/Inf positions differ"
        return result
    if tol.metric == "allclose":
        allowed = tol.atol + tol.rtol * np.abs(np.where(finite, r, 0))
        bad = diff > (allowed if slack is None else allowed + slack)
        result.mismatched = int(np.count_nonzero(bad))
        if result.mismatched:
            result.ok = False
            plus = "" if slack is None else " + the original's float noise"
            result.reason = (f"{result.mismatched} of {ref.size} values outside rtol={tol.rtol:g} atol={tol.atol:g}{plus} "
                             f"(max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g})")
        return result
    value = {"max-abs": result.max_abs, "rel": result.max_rel, "cosine": result.cosine,
             "snr": result.snr_db, "topk": result.top1}[tol.metric]
    if value is None:
        result.ok, result.reason = False, f"{tol.metric} needs a class axis (last dim > 1)"
        return result
    upper = tol.metric in ("max-abs", "rel")
    limit = present(tol.limit)  # every metric but allclose has a threshold (DEFAULT_THRESHOLDS)
    if (value > limit) if upper else (value < limit):
        result.ok = False
        result.reason = f"{tol.metric} {value:.6g} {'>' if upper else '<'} {tol.limit:g}"
    return result


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
            tol: Tolerance | Mapping[str, Tolerance], slack: Mapping[str, np.ndarray] | None = None) -> list[OutputComparison]:
    """Per output; ``tol`` is one Tolerance or a mapping by output name with "*" as the default;
    ``slack``: per output, extra absolute tolerance broadcast over it (the float noise, Point.slack)."""
    def tol_for(name):
        if isinstance(tol, Mapping):
            return tol.get(name, tol.get("*", LOSSLESS))
        return tol
    return [compare_arrays(name, value, got.get(name), tol_for(name), (slack or {}).get(name))
            for name, value in ref.items()]


def declared_shape_mismatches(model: ir.Model, outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """Graph outputs whose declared static dims disagree with what the model really produced
    (exporters sometimes write wrong ones; no onnxopt pass relies on them, but users should know)."""
    found = []
    for value in model.graph.outputs:
        actual = outputs.get(name_of(value))
        if actual is None or value.shape is None:
            continue
        declared = [d if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in value.shape]
        shape = list(np.shape(actual))
        if len(declared) != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(declared, shape)):
            found.append({"output": value.name, "declared": declared, "actual": shape})
    return found


def median_latency_ms(sess, feeds, runs: int) -> float:
    sess.run(None, feeds)  # warm-up
    return statistics.median(bench.timed_run(sess, feeds) for _ in range(runs))


@dataclasses.dataclass
class Point:
    """One set of inputs the original and the candidate are compared on."""

    label: str
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None  # None: the original fails here (skipped)
    skipped: str = ""
    #: per output, how far the original's own float arithmetic moves it here: max |optimized run -
    #: unoptimized run| of the original on ORT (its fusions reassociate as a lossless pass does)
    noise: dict[str, float] = dataclasses.field(default_factory=dict)
    #: per output, the extra absolute tolerance that noise allows: NOISE_FACTOR x its max over each
    #: channel (axis 1; the whole output for rank <= 1), so a part of an output at another scale
    #: (class probabilities beside box pixels) keeps its own small slack
    slack: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        shapes = {k: list(np.shape(v)) for k, v in self.feeds.items()}
        return {"label": self.label, "shapes": shapes,
                "status": "skipped" if self.reference is None else "compared",
                **({"reason": self.skipped} if self.skipped else {}),
                **({"float_noise": self.noise} if any(self.noise.values()) else {})}



def _alternatives(value: int) -> list[int]:
    """Second values tried for a symbolic dim first exercised at ``value`` (small dims grow, so
    a 1 that hides a broadcast becomes 3; large ones halve, so memory stays bounded).  A multiple of
    32 of at least 64 (an image size a detector needs, runtime's synthesized sizes) tries the next
    multiple of 32 below it first."""
    if value >= 64 and value % 32 == 0:
        return [value - 32, value // 2, value + 1]
    return [value + 2, value + 1] if value <= 8 else [value // 2, value + 1]


#: variation attempts when the dim combinations run out (a model without symbolic dims: new values only)
VALUE_TRIES = 3


def synthesized_points(sess, shapes: Mapping[str, tuple[int, ...]] | None = None, variations: bool = True,
                       seeds: tuple[int, ...] = (0,)) -> list[Point]:
    """Synthesized points, each with the original's outputs: a decoder with a key-value cache
    (``generation.points``; not when ``shapes`` fixes an input) gets a prompt and a decoding step
    per seed; any other model the runnable seed-0 point (``runtime.run_synthesized``) and, with
    ``variations``, :func:`variation_points`."""
    found = None if shapes else generation.points(sess, seeds)
    if found:
        return [Point(label, feeds, outputs) for label, feeds, outputs in found]
    feeds, reference = runtime.run_synthesized(sess, shapes)
    return [Point("synthesized, seed 0", feeds, reference)] + (variation_points(sess, feeds) if variations else [])


def variation_points(sess, primary: dict[str, np.ndarray], tries: int = 12) -> list[Point]:
    """Inputs that exercise what an optimizer may have assumed from the primary point: every
    symbolic dim at a second value, and new values for every input (integers and booleans too,
    which may feed shapes, axes or indices), never the seed-0 values a shape probe used.

    Each dim's second value comes from :func:`_alternatives`; the combinations are tried smallest
    change first (``runtime.assignments``), since a model may relate dims (a mask as long as past
    + seq) and fail on some.  Candidates on which the original itself fails (an index out of
    range, a size that does not divide) are tried in turn and, when all fail, returned as one
    skipped Point with the reason.  Cost: at most ``tries`` runs of the original."""
    symbolic = runtime.symbolic_dims(sess)
    choices: dict[str, list[int]] = {}
    for (name, axis), dim in symbolic.items():
        if dim not in choices:
            choices[dim] = _alternatives(int(np.shape(primary[name])[axis]) if name in primary else 1)
    last_error = ""
    combos = list(runtime.assignments(choices, tries))
    # fewer combinations than tries (no symbolic dims: only the values change): the last one again,
    # with new seeds, at most VALUE_TRIES times in all
    combos += combos[-1:] * (min(tries, max(VALUE_TRIES, len(combos))) - len(combos))
    for attempt, values in enumerate(combos):
        overrides = {inp.name: tuple(values[symbolic[(inp.name, a)]] if (inp.name, a) in symbolic
                                     else int(np.shape(primary[inp.name])[a]) for a in range(np.ndim(primary[inp.name])))
                     for inp in sess.get_inputs() if inp.name in primary}
        dims_text = ", ".join(f"{k}={v}" for k, v in values.items())
        label = f"synthesized, seed {attempt + 1}" + (f", {dims_text}" if dims_text else "")
        try:
            feeds = _differ_from(primary, runtime.synthesize(sess, overrides, seed=attempt + 1, quiet=True), attempt + 1,
                                 {name: runtime.integer_high(sess, name) for name in primary})
            reference = runtime.run(sess, feeds)
        except BadInputError as e:
            last_error = str(e)
            continue
        return [Point(label, feeds, reference)]
    return [Point("synthesized variation", {}, None, f"the original model fails on every variation tried: {last_error}")]


def _measure_noise(original: str | os.PathLike, ep: str, points: list[Point]) -> None:
    """Each point's float noise per output (:attr:`Point.noise`): the original run without ORT's
    graph optimizations against its reference (with them).  One more session of the original,
    made after the validator's own is released by the caller's flow, and one run per point."""
    try:
        plain = runtime.session(original, ep, optimize=False)
        for p in points:
            if p.reference is None:
                continue
            got = runtime.run(plain, p.feeds)
            for name, ref in p.reference.items():
                channel = _channel_noise(ref, got.get(name))
                if channel is not None and channel.any():
                    p.noise[name] = float(channel.max())
                    p.slack[name] = NOISE_FACTOR * channel
    except BadInputError as e:  # the fixed tolerance alone, as before
        logger.info("float noise of the original not measured: %s", e)


def _channel_noise(ref: np.ndarray, got: np.ndarray | None) -> np.ndarray | None:
    """max |ref - got| over each channel (axis 1, kept broadcastable; the whole output for rank <= 1);
    None for non-float outputs or a shape the unoptimized run does not reproduce."""
    if got is None or np.shape(ref) != np.shape(got) or not np.issubdtype(np.asarray(ref).dtype, np.floating):
        return None
    diff = np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))
    diff = np.where(np.isfinite(diff), diff, 0.0)
    if diff.ndim <= 1 or not diff.size:
        return np.asarray(diff.max() if diff.size else 0.0)
    return diff.max(axis=tuple(a for a in range(diff.ndim) if a != 1), keepdims=True)


def _within_range(feeds: Mapping[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """New values inside the data's own: a float input drawn uniformly between each feature's
    minimum and maximum over the batch rows (the whole input's with one row), an integer or bool
    input's values permuted (every id stays one the data used)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in feeds.items():
        a = np.asarray(v)
        if a.size == 0:
            out[name] = a
        elif a.dtype.kind == "f":
            lo, hi = (a.min(axis=0), a.max(axis=0)) if a.ndim and len(a) > 1 else (a.min(), a.max())
            out[name] = (lo + (hi - lo) * rng.random(a.shape)).astype(a.dtype)
        else:
            out[name] = rng.permutation(a.ravel()).reshape(a.shape)
    return out


def _resized(sess, feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray] | None:
    """``feeds`` with every input whose first dim is symbolic (the batch) tiled or sliced to ``rows``
    rows, taken cyclically from its own rows (values stay the data's); None when no input has one."""
    symbolic = runtime.symbolic_dims(sess)
    out, changed = dict(feeds), False
    for name, value in feeds.items():
        if (name, 0) in symbolic and np.ndim(value) and len(value):
            out[name] = np.take(value, np.arange(rows) % len(value), axis=0)
            changed = True
    return out if changed else None


def data_points(sess, given: list[dict[str, np.ndarray]]) -> list[Point]:
    """The second point with --data, faithful to it (never N(0, 1) inputs, whose ranges may be
    nothing like the data's): the second batch (with one batch: new values inside its ranges,
    :func:`_within_range`) with its batch dim changed by tiling or slicing its own rows (n -> n + 1,
    so a rewrite that assumed the batch size is caught), else as it is.  The first that the original
    runs on is the point.  Cost: at most 3 runs."""
    other = given[1] if len(given) > 1 else _within_range(given[0])
    label = "data batch 2" if len(given) > 1 else "new values in data batch 1's ranges"
    rows = next((len(v) for v in other.values() if np.ndim(v)), 1)
    tries = [(f"{label}, batch dim {rows} -> {rows + 1} (rows tiled)", _resized(sess, other, rows + 1)),
             (f"{label}, batch dim {rows} -> {max(1, rows - 1)} (rows sliced)",
              _resized(sess, other, max(1, rows - 1)) if rows > 1 else None),
             (label, other)]
    last_error = "no other batch in --data and no symbolic batch dim"
    for label, feeds in tries:
        if feeds is None:
            continue
        try:
            return [Point(label, feeds, runtime.run(sess, feeds))]
        except BadInputError as e:
            last_error = str(e)
    return [Point("data variation", {}, None, f"no second point from --data: {last_error}")]


def _differ_from(primary: Mapping[str, np.ndarray], feeds: dict[str, np.ndarray], seed: int,
                 highs: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Integer and bool inputs of the same shape as at the primary point get a different value in
    *every* element (a new seed alone repeats some: [3, 2] then [1, 2]); integers only where the
    primary ones lie in the synthesized range [0, high) (``highs``: 4, or the rows of the table
    the input indexes, ``runtime.integer_high``), so a token id stays a valid id; padding masks
    keep their form."""
    rng = np.random.default_rng(seed)
    out = dict(feeds)
    for name, value in feeds.items():
        base = primary.get(name)
        if base is None or np.shape(base) != np.shape(value) or "mask" in name.lower() or value.size == 0:
            continue
        if value.dtype == np.bool_:
            out[name] = ~base
        elif value.dtype.kind in "iu":
            high = (highs or {}).get(name, 4)
            if high >= 2 and base.min() >= 0 and base.max() < high:
                out[name] = ((base + 1 + rng.integers(0, high - 1, size=base.shape)) % high).astype(value.dtype)
    return out


class Validator:
    """The original model on ORT with fixed inputs; checks candidates against its cached outputs.

    Inputs: the primary point (``data``'s first batch, or inputs synthesized with seed 0 and
    ``shapes``) plus, with ``variations`` (the default), one more point: with data, from the data
    (:func:`data_points`: another batch with its batch dim changed, values the data's own); without,
    from :func:`variation_points` (symbolic dims at other values and other integer/bool/float
    values), so a rewrite that relied on a dim or value seen at the primary point is caught.  ``check``
    compares on every point (worst case per output); ``check_model`` (verify-each) on the primary
    one only; latency is measured on the primary point."""

    def __init__(self, original: str | os.PathLike, *, data: str | os.PathLike | None = None,
                 preprocess: str | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 tolerance: Tolerance = LOSSLESS, ep: str = "cpu", latency_runs: int = 0,
                 variations: bool = True, noise: bool = True):
        self.ep = ep
        self.tolerance = tolerance
        self.latency_runs = latency_runs
        session = runtime.session(original, ep)
        if data is None:  # the run that found runnable inputs is the reference
            self.points = synthesized_points(session, shapes, variations)
        else:
            given = data_mod.feeds_for(session, data, shapes, preprocess, limit=2)
            self.points = [Point("data batch 1", given[0], runtime.run(session, given[0]))]
            if variations:
                self.points += data_points(session, given)
        self.feeds, self.reference = self.points[0].feeds, present(self.points[0].reference)
        self.reference_latency_ms = median_latency_ms(session, self.feeds, latency_runs) if latency_runs else None
        # Only outputs and latency are kept: the original's session (its weights) is released so
        # that a 2 GB model is not held twice while the candidate is checked.
        del session
        if tolerance.metric == "allclose" and tolerance != LOSSLESS_FP16 and noise:
            _measure_noise(original, ep, self.points)

    def exercised(self) -> list[dict]:
        """What the checks ran on, for the report."""
        return [p.to_dict() for p in self.points]

    def check(self, candidate: str | os.PathLike | bytes, all_points: bool = True) -> ValidationResult:
        """Compare a candidate on every point (the primary only with ``all_points=False``); one
        that ORT cannot load or run fails every output (it is the candidate that is broken, not
        the user's input)."""
        points = [p for p in (self.points if all_points else self.points[:1]) if p.reference is not None]
        merged: dict[str, OutputComparison] = {}
        failing = None
        try:
            sess = runtime.session(candidate, self.ep)
            for index, point in enumerate(points):
                reference = present(point.reference)  # points without one were filtered out above
                got = runtime.run_candidate(sess, point.feeds, list(reference))
                for c in compare(reference, got, self.tolerance, point.slack):
                    if not c.ok:
                        failing = failing or point
                        if index:
                            c.reason = f"at {point.label}: {c.reason}"
                    merged[c.name] = merged[c.name].merge(c) if c.name in merged else c
        except BadInputError as e:
            failed = [OutputComparison(name, False, tuple(np.shape(v)), None, str(np.asarray(v).dtype),
                                       reason=f"the optimized model fails on ONNX Runtime: {e}")
                      for name, v in self.reference.items()]
            return ValidationResult(failed, self.tolerance, failing_point=self.points[0])
        result = ValidationResult(list(merged.values()), self.tolerance, failing_point=failing)
        if self.latency_runs:
            result.latency_ref_ms = self.reference_latency_ms
            result.latency_new_ms = median_latency_ms(sess, self.feeds, self.latency_runs)
        return result

    def check_model(self, model: ir.Model, all_points: bool = False) -> ValidationResult:
        """Check an in-memory model; one with external weights goes through a temporary folder."""
        if next(io.external_tensors(model), None) is not None:
            folder = tempfile.gettempdir()
            io.remove_stale_staging(folder)  # a killed run's candidate copy (may be large) goes now
            with tempfile.TemporaryDirectory(prefix=io.staging_prefix() + "check-", dir=folder) as tmp:
                path = os.path.join(tmp, "candidate.onnx")
                ir.save(model, path, external_data="candidate.onnx.data")  # leaves `model` unchanged
                return self.check(path, all_points)
        return self.check(ir.to_proto(model).SerializeToString(), all_points)


@dataclasses.dataclass
class ModelComparison:
    """``validate A B``: per EP, the worst case over all batches of every output."""

    per_ep: dict[str, ValidationResult]
    batches: int
    error_samples: dict[str, dict[str, list[float]]]  # ep -> output -> |a-b| sample (for histograms)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.per_ep.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "batches": self.batches,
                "per_ep": {ep: r.to_dict() for ep, r in self.per_ep.items()}}


def compare_models(a: str | os.PathLike, b: str | os.PathLike | None, *, eps: tuple[str, ...] = ("cpu",),
                   data: str | os.PathLike | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   preprocess: str | None = None, tolerance: Tolerance | Mapping[str, Tolerance] = LOSSLESS,
                   max_batches: int = 16, progress=None, sample: int = 2000) -> ModelComparison:
    """Run A and B on the same batches on each EP and compare every output (worst case over batches).
    Without B (``b=None``), A on every other EP against A on the first (results keyed ``"EP vs FIRST"``).

    Batches stream from ``data`` (at most ``max_batches``), or without data the synthesized
    batch and one variation of it (see :func:`variation_points`); the inputs are created from A's
    session and fed to both.  Cost: batches x EPs runs of each model."""
    rng = np.random.default_rng(0)
    per_ep: dict[str, ValidationResult] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    count = 0
    runs = [(ep, ep, ep) for ep in eps] if b is not None else [(f"{ep} vs {eps[0]}", eps[0], ep) for ep in eps[1:]]
    for label, ep_a, ep_b in runs:
        sa, sb = runtime.session(a, ep_a), runtime.session(b if b is not None else a, ep_b)
        merged: dict[str, OutputComparison] = {}
        ep_samples: dict[str, list[float]] = {}
        feeds_iter: Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]]
        if data is not None:
            feeds_iter = ((feeds, None) for feeds in data_mod.batches(data, sa, preprocess, max_batches))
        else:  # the synthesized point and a variation of it (other symbolic dims and values)
            primary, primary_ref = runtime.run_synthesized(sa, shapes, quiet=label != runs[0][0])
            feeds_iter = iter([(primary, primary_ref)] + [(p.feeds, p.reference) for p in variation_points(sa, primary)
                                                          if p.reference is not None])
        count = 0
        for feeds, known in feeds_iter:
            ref = known if known is not None else runtime.run(sa, feeds)  # a variation's is already computed
            got = runtime.run_candidate(sb, feeds, list(ref))
            for c in compare(ref, got, tolerance):
                c.ep = label
                merged[c.name] = merged[c.name].merge(c) if c.name in merged else c
                if c.name in got and ref[c.name].dtype.kind == "f" and np.shape(got[c.name]) == ref[c.name].shape:
                    d = np.abs(ref[c.name].astype(np.float64) - got[c.name].astype(np.float64)).ravel()
                    d = d[np.isfinite(d)]
                    pick = d if d.size <= sample else rng.choice(d, sample, replace=False)
                    ep_samples.setdefault(c.name, []).extend(float(x) for x in pick[: max(0, sample - len(ep_samples.get(c.name, [])))])
            count += 1
            if progress:
                progress(1)
        tol_repr = tolerance if isinstance(tolerance, Tolerance) else tolerance.get("*", LOSSLESS)
        per_ep[label] = ValidationResult(list(merged.values()), tol_repr)
        samples[label] = ep_samples
    return ModelComparison(per_ep, count, samples)

"""Compare a candidate model against the original on ONNX Runtime: every output, per-output tolerance.

A float output passes when ``|got - ref| <= atol + rtol * |ref|`` everywhere, NaN/Inf at the
same positions; integer, bool and string outputs must be equal; shapes and dtypes must match.
Cost: two ORT sessions and one run of each per set of inputs (the original's outputs are cached).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt import io, runtime

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-5


LOSSLESS = Tolerance(1e-4, 1e-5)
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
    mismatched: int = 0
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ValidationResult:
    outputs: list[OutputComparison]
    tolerance: Tolerance
    latency_ref_ms: float | None = None
    latency_new_ms: float | None = None

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
            "tolerance": dataclasses.asdict(self.tolerance),
            "max_abs": self.max_abs,
            "latency_ref_ms": self.latency_ref_ms,
            "latency_new_ms": self.latency_new_ms,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray | None, tol: Tolerance) -> OutputComparison:
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
    bad = (diff > tol.atol + tol.rtol * np.abs(np.where(finite, r, 0))) | special_mismatch
    result.mismatched = int(np.count_nonzero(bad))
    if result.mismatched:
        result.ok = False
        result.reason = (f"{result.mismatched} of {ref.size} values outside rtol={tol.rtol:g} atol={tol.atol:g} "
                         f"(max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g})")
    return result


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
            tol: Tolerance | Mapping[str, Tolerance]) -> list[OutputComparison]:
    def tol_for(name):
        return tol.get(name, LOSSLESS) if isinstance(tol, Mapping) else tol
    return [compare_arrays(name, value, got.get(name), tol_for(name)) for name, value in ref.items()]


def declared_shape_mismatches(model: ir.Model, outputs: Mapping[str, np.ndarray]) -> list[dict]:
    """Graph outputs whose declared static dims disagree with what the model really produced
    (exporters sometimes write wrong ones; no onnxopt pass relies on them, but users should know)."""
    found = []
    for value in model.graph.outputs:
        actual = outputs.get(value.name)
        if actual is None or value.shape is None:
            continue
        declared = [d if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in value.shape]
        shape = list(np.shape(actual))
        if len(declared) != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(declared, shape)):
            found.append({"output": value.name, "declared": declared, "actual": shape})
    return found


def median_latency_ms(sess, feeds, runs: int) -> float:
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Validator:
    """The original model on ORT with fixed inputs; checks candidates against its cached outputs."""

    def __init__(self, original: str | os.PathLike, *, data: str | os.PathLike | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None, tolerance: Tolerance = LOSSLESS,
                 ep: str = "cpu", latency_runs: int = 0):
        self.ep = ep
        self.tolerance = tolerance
        self.latency_runs = latency_runs
        session = runtime.session(original, ep)
        self.feeds = runtime.load_feeds(data, session) if data else runtime.synthesize(session, shapes)
        self.reference = runtime.run(session, self.feeds)
        self.reference_latency_ms = median_latency_ms(session, self.feeds, latency_runs) if latency_runs else None
        # Only outputs and latency are kept: the original's session (its weights) is released so
        # that a 2 GB model is not held twice while the candidate is checked.
        del session

    def check(self, candidate: str | os.PathLike | bytes) -> ValidationResult:
        sess = runtime.session(candidate, self.ep)
        got = runtime.run(sess, self.feeds, [n for n in self.reference if n in {o.name for o in sess.get_outputs()}])
        result = ValidationResult(compare(self.reference, got, self.tolerance), self.tolerance)
        if self.latency_runs:
            result.latency_ref_ms = self.reference_latency_ms
            result.latency_new_ms = median_latency_ms(sess, self.feeds, self.latency_runs)
        return result

    def check_model(self, model: ir.Model) -> ValidationResult:
        """Check an in-memory model; one with external weights goes through a temporary folder."""
        if next(io.external_tensors(model), None) is not None:
            with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
                path = os.path.join(tmp, "candidate.onnx")
                ir.save(model, path, external_data="candidate.onnx.data")  # leaves `model` unchanged
                return self.check(path)
        return self.check(ir.to_proto(model).SerializeToString())

"""The differential oracle: original vs optimized on ONNX Runtime at several points.

Points: every symbolic dim takes >= 2 values (1, 3, a random one in 2..5, 2), every integer/bool
input cycles through its >= 2 value sets, float inputs are seeded normals.  A point on which the
original fails in ORT is skipped; a case with no point the original runs is *invalid* (not a
failure).  The reference is the original under ORT's default optimizer, as users run it; at a point
where ORT's optimizer changes the original's own result (an ORT bug) the unoptimized run, the spec's
answer, is accepted too (the optimized model always runs under ORT's optimizer).  Compared per output:
dtype, shape, integers/bools exactly, floats with rtol 1e-4 / atol 1e-5 and equal NaN positions.
Under test: every lossless pass alone and the default pipeline, plus idempotence (a second run changes neither node count nor op types) and
crashes (an exception other than a non-internal onnxopt error is a bug).
"""

from __future__ import annotations

import collections
import dataclasses
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxopt import pipeline, registry, runtime  # noqa: E402
from onnxopt.errors import InternalError, OnnxoptError  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
SKIP_PASSES = ("fuse-transformer", "convert-fp16")  # convert-fp16 is lossy: tests/test_convert.py
# cleanup documents that it removes initializer-backed graph inputs (IR >= 4): for it (and the
# default pipeline, which starts with it) points that override them are not compared.
DROPS_INITIALIZER_INPUTS = ("cleanup", "default")


def lossless_passes() -> list[str]:
    return [n for n in registry.names() if n not in SKIP_PASSES and "quant" not in n]


def configs() -> list[tuple[str, str]]:
    """(label, pipeline text): each lossless pass alone, then the default pipeline."""
    return [(n, n) for n in lossless_passes()] + [("default", pipeline.DEFAULT_PIPELINE)]


def session(model_bytes: bytes, optimize: bool = True) -> ort.InferenceSession:
    """One-thread CPU session (onnxopt.runtime's; a model ORT refuses raises BadInputError)."""
    return runtime.session(model_bytes, "cpu", threads=1, optimize=optimize)


def points(case, n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    dim_vals = {d: [1, 3, int(rng.integers(2, 6)), 2, 3, 1] for d in case.sym_dims}
    order = [0, 1, 0, 1, 1, 0]  # (dims[j], set order[j]) pairs: every dim value meets several sets
    pts = []
    for j in range(n):
        feeds = {}
        for spec in case.inputs:
            if spec.kind == "float":
                shape = [dim_vals[d][j] if isinstance(d, str) else d for d in spec.dims]
                feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
            else:
                k = (order[j] + (j // 2 if len(spec.sets) > 2 else 0)) % len(spec.sets)
                feeds[spec.name] = np.asarray(spec.sets[k]).copy()
        if j % 2 == 1:  # odd points also override the initializers listed as graph inputs
            for name, arr in overridable(case.model).items():
                feeds[name] = (arr * 1.5 + 0.25).astype(arr.dtype)
        pts.append(feeds)
    return pts


def overridable(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float initializers that are also graph inputs (a user may feed other values)."""
    from onnx import numpy_helper as nh
    inputs = {i.name for i in proto.graph.input}
    out = {}
    for t in proto.graph.initializer:
        if t.name in inputs:
            arr = nh.to_array(t)
            if arr.dtype.kind == "f":
                out[t.name] = arr
    return out


def run_points(model_bytes: bytes, pts, optimize: bool = True) -> list:
    """Per point: a list of outputs, or an Exception (the run failed)."""
    sess = session(model_bytes, optimize)
    names = {i.name for i in sess.get_inputs()}
    out = []
    for feeds in pts:
        try:
            out.append(sess.run(None, {k: v for k, v in feeds.items() if k in names}))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> str | None:
    if len(ref) != len(got):
        return f"{len(got)} outputs, expected {len(ref)}"
    for name, a, b in zip(names, ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype:
            return f"output {name}: dtype {b.dtype}, expected {a.dtype}"
        if a.shape != b.shape:
            return f"output {name}: shape {b.shape}, expected {a.shape}"
        if a.dtype.kind in "fc":
            na, nb = np.isnan(a), np.isnan(b)
            if (na != nb).any():
                return f"output {name}: NaN positions differ"
            close = np.isclose(b, a, rtol=RTOL, atol=ATOL, equal_nan=True)
            # An infinity of the other sign is a signed zero divided into (c / (x*k) vs c / x'):
            # folding a scale into weights may change the sign of an exact zero, as in every
            # optimizer; the position itself must still be infinite in both.
            close |= np.isinf(a) & np.isinf(b)
            if not close.all():
                err = np.nanmax(np.where(close, 0.0, np.abs(b.astype(np.float64) - a.astype(np.float64))))
                return f"output {name}: max abs diff {err:.3g}"
        elif not np.array_equal(a, b):
            return f"output {name}: values differ ({b.ravel()[:6]} vs expected {a.ravel()[:6]})"
    return None


def _ops(proto: onnx.ModelProto) -> list[str]:
    ops = []

    def walk(g):
        for n in g.node:
            ops.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)
    walk(proto.graph)
    return sorted(ops)


def optimize(proto: onnx.ModelProto, text: str) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    result = pipeline.run(model, pipeline.parse(text))
    return ir.to_proto(result.model)


@dataclasses.dataclass
class Finding:
    config: str  # pass label or "default"
    kind: str  # wrong | crash | invalid-output | idempotence | interface
    detail: str

    def __str__(self) -> str:
        return f"[{self.config}] {self.kind}: {self.detail}"


@dataclasses.dataclass
class Verdict:
    valid: bool  # the original runs on at least one point
    findings: list[Finding]
    points_run: int = 0


def check_case(case, cfgs: list[tuple[str, str]] | None = None, idempotence: bool = True) -> Verdict:
    proto = case.model
    pts = points(case)
    try:
        ref = run_points(proto.SerializeToString(), pts)
    except Exception:  # noqa: BLE001
        return Verdict(False, [])
    ok = [i for i, r in enumerate(ref) if not isinstance(r, Exception)]
    if not ok:
        return Verdict(False, [])
    out_names = [o.name for o in proto.graph.output]
    ref = _with_spec_answers(proto, pts, ref, ok, out_names)
    in_names = {i.name for i in proto.graph.input}
    over = set(overridable(proto))
    findings = []
    for label, text in (cfgs or configs()):
        try:
            opt = optimize(proto, text)
        except InternalError as e:
            findings.append(Finding(label, "crash", str(e).split("; nothing was written")[0][:300]))
            continue
        except OnnxoptError:
            continue  # an expected, declared refusal
        except Exception as e:  # noqa: BLE001
            findings.append(Finding(label, "crash", f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        dropped = over - {i.name for i in opt.graph.input}
        if dropped and label not in DROPS_INITIALIZER_INPUTS:
            findings.append(Finding(label, "interface", f"removed the overridable initializer input(s) {sorted(dropped)}"))
            continue
        use = [i for i in ok if not (dropped and any(n in pts[i] for n in dropped))]
        f = _check_optimized(label, opt, pts, ref, use, out_names, in_names)
        if f is not None:
            findings.append(f)
            continue
        if idempotence:
            try:
                again = optimize(opt, text)
            except Exception as e:  # noqa: BLE001
                findings.append(Finding(label, "crash", f"second run: {type(e).__name__}: {str(e)[:300]}"))
                continue
            a, b = _ops(opt), _ops(again)
            if a != b:
                # the second run must still be a correct, loadable model: report that first
                f2 = _check_optimized(label, again, pts, ref, use, out_names, in_names)
                if f2 is not None:
                    f2.detail = "second run: " + f2.detail
                    findings.append(f2)
                    continue
                diff = collections.Counter(a)
                diff.subtract(collections.Counter(b))
                findings.append(Finding(label, "idempotence",
                                        f"second run changed {len(a)} -> {len(b)} nodes ({ {k: v for k, v in diff.items() if v} })"))
    return Verdict(True, findings, len(ok))


@dataclasses.dataclass
class Either:
    """Two acceptable answers at one point: ORT's optimized run of the original and the unoptimized one."""

    optimized: list
    spec: list


def _with_spec_answers(proto: onnx.ModelProto, pts, ref: list, ok: list[int], out_names: list[str]) -> list:
    """The reference per point, with the unoptimized run of the original beside it (:class:`Either`)
    where ORT's optimizer changes the original's own result (an ORT bug such as DivMulFusion dropping
    a rank): a pass may keep the ORT answer users had, or give the spec's."""
    try:
        plain = run_points(proto.SerializeToString(), pts, optimize=False)
    except Exception:  # noqa: BLE001 - only the optimized level loads: keep its answers
        return ref
    return [Either(ref[i], plain[i]) if i in ok and not isinstance(plain[i], Exception) and compare(plain[i], ref[i], out_names)
            else ref[i] for i in range(len(ref))]


def _check_optimized(label, opt, pts, ref, ok, out_names, in_names) -> Finding | None:
    if [o.name for o in opt.graph.output] != out_names:
        return Finding(label, "interface", f"outputs {[o.name for o in opt.graph.output]}, expected {out_names}")
    extra = {i.name for i in opt.graph.input} - in_names
    if extra:
        return Finding(label, "interface", f"new graph inputs {sorted(extra)}")
    try:
        got = run_points(opt.SerializeToString(), pts)
    except Exception as e:  # noqa: BLE001
        return Finding(label, "invalid-output", f"ORT cannot load the result: {str(e).splitlines()[0][:300]}")
    for i in ok:
        g = got[i]
        where = _describe_point(pts[i])
        if isinstance(g, Exception):
            return Finding(label, "wrong", f"at {where}: optimized model fails ({str(g).splitlines()[0][:200]}), original runs")
        msg = compare(ref[i].optimized, g, out_names) if isinstance(ref[i], Either) else compare(ref[i], g, out_names)
        if msg and isinstance(ref[i], Either) and compare(ref[i].spec, g, out_names) is None:
            msg = None
        if msg:
            return Finding(label, "wrong", f"at {where}: {msg}")
    try:
        onnx.checker.check_model(opt, full_check=True)
    except Exception as e:  # noqa: BLE001
        return Finding(label, "invalid-output", f"checker: {str(e).splitlines()[0][:300]}")
    return None


def _describe_point(feeds: dict) -> str:
    parts = []
    for k, v in feeds.items():
        if v.dtype.kind in "f":
            parts.append(f"{k}{list(v.shape)}")
        else:
            parts.append(f"{k}={v.tolist()}")
    return ", ".join(parts)

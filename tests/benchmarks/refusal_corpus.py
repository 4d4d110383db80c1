"""Never empty-handed (issue 21): false refusals and silent changes of every command over a corpus.

    nice -n 10 python tests/benchmarks/refusal_corpus.py [--out docs/never_empty_handed.json]
        [--models digits_cnn hetero_cnn ...] [--commands optimize prune ...] [--timeout 300]

Not a test.  Corpus: every ``models/*.onnx`` plus the models the builders in models/classifiers.py,
models/heterogeneous.py, models/synth_shapes.py, models/fp16_cases.py and models/float_noise.py make
(written to a temp folder).  Each command runs as its own ``onnxopt`` process (OMP_NUM_THREADS=1, one
at a time, a fresh temp folder each, ``--report r.json``):

- ``optimize`` with ``--data`` where the model has data, and without;
- ``quantize`` static (``--data``), ``--mode dynamic`` and ``--weights int4`` (MatMul models only),
  all with ``--no-latency-guard --no-cost-model``; skipped for models that are already quantized;
- ``convert --fp16 --data``, ``prune --sparsity 0.5 --data``, ``compress --cluster 16 --data``.

Data.  A model with data of its own (the trained digits/text models, the heterogeneous CNN, the
classifiers, the fp16 cases, the float-noise case, the transformers' reference inputs) gets its
calibration batches built the way the tests build them (models/tasks.py, models/heterogeneous.py,
models/fp16_cases.py, tests/test_fidelity_kinds.py, models/transformers.py ``feeds``), and a FRESH
evaluation set from the same source that is never given to onnxopt (the digits/text eval splits,
other seeds).  A model without data gets numpy-synthesized batches (N(0, 1) floats in the input's
dtype, small non-negative integers, 0/1 masks) for the lossy commands' ``--data`` and, with other
seeds, for the fresh evaluation; it is not given ``--data`` for optimize.  onnxopt is never
imported to make data.

Classification of each run (fresh inputs only, ORT CPU sessions in this process, 1 thread):

- **refused**: exit 3.  *False* when a fallback shows the refusal was avoidable: optimize: the same
  command with ``--force`` writes a model within the lossless tolerance below; quantize / convert:
  the ``--force`` output meets ``--max-drop`` (0.01) on the fresh inputs; prune: ``--sparsity 0.1``
  writes (exit 0) a model within 0.01 on the fresh inputs; compress (no sparsity asked): the smaller
  step ``--cluster 256`` does.
- **silent change**: exit 0 but the written model is wrong on the fresh inputs.  optimize
  (lossless): any element beyond max(8 x the model's own float noise, 1e-5 + 1e-4 |ref|), the noise
  being the per-output max |ORT graph optimizations on - off| of the original on the fresh inputs
  (both the original and the written model run with ORT optimizations off for the comparison);
  lossy commands: the default fidelity drop on the fresh inputs (top-1 agreement at every position
  for class outputs, pooled cosine otherwise; the worst output) above 2 x 0.01, or inf/NaN where the
  original is finite.
- **written** (exit 0, checked), **n/a** (exit 1 or 2: the command says it cannot apply, e.g. no
  prunable layer, a block size that divides no K), **failed** (exit 4, a signal or a timeout),
  **skipped** (not run, with the reason).

Prints the CPU line first, one table row per model and command (exit, class, notes), totals and
prune's asked/reached sparsity on the compact CNNs; writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import classifiers, float_noise, heterogeneous, synth_shapes, tasks  # noqa: E402
from models import fp16_cases as fc  # noqa: E402
from models import transformers as tfm  # noqa: E402
from onnxopt import benchmark as bench  # noqa: E402  (the CPU line only)

MAX_DROP = 0.01
SILENT_DROP = 2 * MAX_DROP
NOISE_FACTOR, RTOL, ATOL = 8.0, 1e-4, 1e-5
CLI = str(Path(sys.executable).with_name("onnxopt"))
COMMANDS = ("optimize+data", "optimize", "quantize", "quantize-dynamic", "quantize-int4", "convert", "prune", "compress")
COMPACT_CNNS = ("digits_cnn", "digits_resnet", "digits_mobilenet", "cnn_bn_depthwise", "hetero_cnn")
#: output names (split on non-letters) that hold class scores, class axis last: judged by top-1
CLASS_WORDS = {"logits", "logit", "scores", "probs", "log_probs", "predictions", "share"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
             "QLinearMatMul", "MatMulNBits"}
#: a symbolic dim's size in synthesized inputs, by name (batch dims: the batch size asked)
SYNTH_DIMS = {"height": 64, "width": 64, "samples": 2048, "seq": 8, "past": 4, "total": 12}
SYNTH_WIDTH = {"crnn": 128}


@dataclass
class Case:
    name: str
    path: Path
    data: str  # "real" (its own data) or "synth" (numpy-synthesized)
    calib: Path  # the --data folder
    fresh: list[dict[str, np.ndarray]]  # never given to onnxopt
    origin: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- data

def _save_batches(folder: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(batches):
        np.savez(folder / f"batch_{i:04d}.npz", **b)
    return folder


def _dims(model: onnx.ModelProto, batch: int, name: str) -> dict[str, tuple[tuple, int]]:
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif i == 0 or d.dim_param in ("batch", "n", "N"):
                shape.append(batch)
            else:
                shape.append(SYNTH_WIDTH.get(name, SYNTH_DIMS.get(d.dim_param, 8)) if d.dim_param == "width"
                             else SYNTH_DIMS.get(d.dim_param, 8))
        out[vi.name] = (tuple(shape), tt.elem_type)
    return out


def synthesize(model: onnx.ModelProto, name: str, batch: int, seed: int) -> dict[str, np.ndarray]:
    """N(0, 1) floats in the input's dtype, small non-negative integers (0..9), masks of ones with
    padding at the end of the last row, booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for iname, (shape, et) in _dims(model, batch, name).items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(et)
        if np.issubdtype(dtype, np.floating):
            feeds[iname] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[iname] = rng.integers(0, 2, shape).astype(bool)
        elif "mask" in iname:
            m = np.ones(shape, dtype)
            if len(shape) == 2 and shape[1] > 2:
                m[-1, -(shape[1] // 3):] = 0
            feeds[iname] = m
        else:
            feeds[iname] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def _batch_of(model: onnx.ModelProto, want: int) -> int:
    """The fixed batch dim of the first input, else ``want``."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                return dims[0].dim_value
    return want


def synth_case(name: str, path: Path, work: Path, origin: str) -> Case:
    model = onnx.load(str(path), load_external_data=False)
    fixed = _batch_of(model, 0)
    b_cal = fixed or 4
    b_eval = fixed or 8
    n_eval = 32 if fixed else 8  # batch-1 models: more batches
    calib = [synthesize(model, name, b_cal, seed) for seed in range(8)]
    fresh = [synthesize(model, name, b_eval, 10_000 + seed) for seed in range(n_eval)]
    return Case(name, path, "synth", _save_batches(work / "data" / name, calib), fresh, origin,
                ["numpy-synthesized data"])


def _digits_fresh(name: str) -> list[dict[str, np.ndarray]]:
    images = np.load(ROOT / "models" / "data" / "digits_eval.npz")["x"]  # the eval split: never calibration
    x = tasks.digits_preprocess(images, tasks.SIZES[name])
    return [{"image": x[i:i + 60]} for i in range(0, len(x), 60)]


def _text_fresh(name: str, rows: int = 128) -> list[dict[str, np.ndarray]]:
    images = np.load(ROOT / "models" / "data" / f"{name}_eval.npz")["x"][:rows]
    x = tasks.text_preprocess(images)
    return [{"line": x[i:i + 16]} for i in range(0, len(x), 16)]


def _transformer_batches(arch: str, names: set[str]) -> tuple[list, list]:
    """Calibration: the committed reference inputs (models/data/<arch>_inputs.npz, as the tests use
    them) plus ``feeds`` at 7 more seeds; fresh: ``feeds`` at other seeds and a larger batch."""
    first = dict(np.load(ROOT / "models" / "data" / f"{arch}_inputs.npz"))
    pick = lambda f: {k: v for k, v in f.items() if k in names}  # noqa: E731
    calib = [pick(first)] + [pick(tfm.feeds(arch, batch=2, seed=s)) for s in range(1, 8)]
    fresh = [pick(tfm.feeds(arch, batch=4, seed=1000 + s)) for s in range(8)]
    return calib, fresh


def build_corpus(work: Path) -> list[Case]:
    cases: list[Case] = []
    built = work / "built"
    built.mkdir(parents=True, exist_ok=True)
    data = work / "data"

    def save(model: onnx.ModelProto, name: str) -> Path:
        p = built / f"{name}.onnx"
        onnx.save(model, str(p))
        return p

    for path in sorted((ROOT / "models").glob("*.onnx")):
        name = path.stem
        origin = f"models/{path.name}"
        if name in ("digits_cnn", "digits_resnet", "digits_mobilenet"):
            # tests/test_quantize.py, test_compress.py: tasks.write_calibration (training split below DIGITS_VAL_START)
            calib = tasks.write_calibration(name, data / name, batches=16, batch_size=8)
            cases.append(Case(name, path, "real", calib, _digits_fresh(name), origin, ["data: digits calib / eval split"]))
        elif name in ("text_crnn", "glyph_crnn"):
            calib = tasks.write_calibration(name, data / name, batches=16, batch_size=8)
            cases.append(Case(name, path, "real", calib, _text_fresh(name), origin, ["data: lines calib / eval split"]))
        elif any(name.startswith(a + "_") for a in tfm.ARCHS) and name.split("_")[1] in tfm.EXPORTERS:
            arch = name.split("_")[0]
            model = onnx.load(str(path), load_external_data=False)
            names = {i.name for i in model.graph.input}
            calib, fresh = _transformer_batches(arch, names)
            cases.append(Case(name, path, "real", _save_batches(data / name, calib), fresh, origin,
                              [f"data: models/data/{arch}_inputs.npz + transformers.feeds"]))
        else:
            cases.append(synth_case(name, path, work, origin))

    # models/classifiers.py (data as tests/test_fidelity_kinds.py: 16 batches of 64 N(0, 1) rows, seed 1)
    def clf(model, name, d):
        rng = np.random.default_rng(1)
        calib = [{"x": rng.standard_normal((64, d)).astype(np.float32)} for _ in range(16)]
        rng = np.random.default_rng(9001)
        fresh = [{"x": rng.standard_normal((128, d)).astype(np.float32)} for _ in range(8)]
        cases.append(Case(name, save(model, name), "real", _save_batches(data / name, calib), fresh,
                          "models/classifiers.py", ["data: N(0,1) rows as test_fidelity_kinds"]))

    clf(classifiers.softmax_written_out(np.random.default_rng(0)), "clf_softmax_written", 32)
    clf(classifiers.softmax_written_out(np.random.default_rng(0), subtract_max=False), "clf_softmax_nomax", 32)
    clf(classifiers.softmax_written_out(np.random.default_rng(0), log=True), "clf_logsoftmax_written", 32)
    clf(classifiers.softmax_written_out(np.random.default_rng(0), opset=18), "clf_softmax_opset18", 32)
    clf(classifiers.normalized_by_data(np.random.default_rng(0)), "clf_normalized_by_data", 16)
    clf(classifiers.linear_head(np.random.default_rng(0)), "clf_linear_head", 32)

    # models/heterogeneous.py (tests/test_prune_budget.py: write_data 16 x 16, seed 0; fresh: images at other seeds)
    for bn, name in ((True, "hetero_cnn"), (False, "hetero_cnn_nobn")):
        p = save(heterogeneous.build(bn=bn), name)
        calib = heterogeneous.write_data(data / name, batches=16, batch_size=16)
        fresh = [{"image": heterogeneous.images(64, 777_000 + s)} for s in range(8)]
        cases.append(Case(name, p, "real", calib, fresh, "models/heterogeneous.py", ["data: write_data / images"]))

    # models/synth_shapes.py: no data
    for fn in (synth_shapes.yolo_detector, synth_shapes.vad_audio, synth_shapes.runs_at_one):
        name = f"synth_{fn.__name__}"
        cases.append(synth_case(name, save(fn(), name), work, "models/synth_shapes.py"))

    # models/fp16_cases.py (tests/test_convert_budget.py: margin rows 16 x 256 at seeds 100+i; N(0,1) 16 x 128 at 200+i)
    model = fc.written_softmax_classifier(np.random.default_rng(0), scale=24.0)
    calib = [{"x": fc.margin_rows(np.random.default_rng(100 + i), model, 256)} for i in range(16)]
    fresh = [{"x": fc.margin_rows(np.random.default_rng(5000 + i), model, 256)} for i in range(4)]
    cases.append(Case("fp16_written_softmax", save(model, "fp16_written_softmax"), "real",
                      _save_batches(data / "fp16_written_softmax", calib), fresh, "models/fp16_cases.py",
                      ["data: margin_rows as test_convert_budget"]))
    model = fc.cancelling_classifier(np.random.default_rng(0))
    calib = [{"x": np.random.default_rng(200 + i).standard_normal((128, 16)).astype(np.float32)} for i in range(16)]
    fresh = [{"x": np.random.default_rng(6000 + i).standard_normal((128, 16)).astype(np.float32)} for i in range(8)]
    cases.append(Case("fp16_cancelling", save(model, "fp16_cancelling"), "real",
                      _save_batches(data / "fp16_cancelling", calib), fresh, "models/fp16_cases.py",
                      ["data: N(0,1) rows as test_convert_budget"]))

    # models/float_noise.py (tests/test_float_noise.py: its two 0-255 pixel batches; more of the same for the split)
    model, batches = float_noise.amplified_bn(np.random.default_rng(0))
    rng = np.random.default_rng(4242)
    more = [rng.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32) for _ in range(6)]
    fresh = [{"x": rng.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    cases.append(Case("float_noise_amplified_bn", save(model, "float_noise_amplified_bn"), "real",
                      _save_batches(data / "float_noise_amplified_bn", [{"x": x} for x in batches + more]), fresh,
                      "models/float_noise.py", ["data: 0-255 pixels as test_float_noise (+6 batches)"]))
    return cases


# ---------------------------------------------------------------- evaluation

def session(path: Path, optimized: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_LOADS = "import sys, onnxruntime as ort\nort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"


def run_all(path: Path, fresh: list[dict], optimized: bool = True) -> tuple[list[str], list[list[np.ndarray]]]:
    """Outputs of ``path`` on ``fresh``; a model whose session crashes ORT (a signal in a child process
    that loads it first) raises RuntimeError instead of taking this process down."""
    if optimized:
        done = subprocess.run([sys.executable, "-c", _LOADS, str(path)], capture_output=True, timeout=600)
        if done.returncode < 0:
            raise RuntimeError(f"ONNX Runtime crashes (signal {-done.returncode}) creating a session of {path.name}")
    sess = session(path, optimized)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return names, [sess.run(None, {k: v for k, v in f.items() if k in wanted}) for f in fresh]


def is_class(name: str, ref: np.ndarray) -> bool:
    import re

    words = set(re.split(r"[^a-z_]+", name.lower())) | set(re.split(r"[^a-z]+", name.lower()))
    return bool(words & CLASS_WORDS) and ref.ndim >= 2 and ref.shape[-1] >= 2 and np.issubdtype(ref.dtype, np.floating)


def lossy_drop(ref_path: Path, ref: tuple, cand_path: Path, fresh: list[dict]) -> dict:
    """Default fidelity drop of cand vs the original on the fresh inputs: per output, top-1 agreement at
    every position (class outputs; a tie in the reference accepts any of its maxima) or pooled cosine;
    the worst output; and whether cand has inf/NaN where the original is finite."""
    names, outs = ref
    cnames, couts = run_all(cand_path, fresh)
    per = {}
    nonfinite = []
    for j, name in enumerate(names):
        k = cnames.index(name) if name in cnames else j
        r = [o[j] for o in outs]
        g = [o[k] for o in couts]
        if any(np.issubdtype(x.dtype, np.floating) and (np.isfinite(x) & ~np.isfinite(y.astype(x.dtype))).any()
               for x, y in zip(r, g)):
            nonfinite.append(name)
        if not np.issubdtype(r[0].dtype, np.floating):
            same = sum(int(np.sum(x == y)) for x, y in zip(r, g))
            total = sum(x.size for x in r)
            per[name] = {"metric": "exact", "score": same / total, "n": total}
        elif is_class(name, r[0]):
            agree = total = 0
            for x, y in zip(r, g):
                x = x.astype(np.float64).reshape(-1, x.shape[-1])
                y = np.nan_to_num(y.astype(np.float64), nan=-np.inf).reshape(-1, x.shape[-1])
                top = y.argmax(-1)
                agree += int(np.sum(x[np.arange(len(x)), top] >= x.max(-1)))
                total += len(x)
            per[name] = {"metric": "top-1", "score": agree / total, "n": total}
        else:
            dot = rr = gg = 0.0
            for x, y in zip(r, g):
                x, y = x.astype(np.float64).ravel(), np.nan_to_num(y.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).ravel()
                x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
                dot, rr, gg = dot + x @ y, rr + x @ x, gg + y @ y
            cos = dot / math.sqrt(rr * gg) if rr and gg else float(rr == gg)
            per[name] = {"metric": "cosine", "score": float(cos), "n": sum(x.size for x in r)}
    worst = max(per, key=lambda n: 1 - per[n]["score"])
    return {"drop": round(1 - per[worst]["score"], 6), "worst_output": worst, "nonfinite": nonfinite,
            "outputs": {n: {**v, "score": round(v["score"], 6)} for n, v in per.items()}}


def noise_of(path: Path, fresh: list[dict]) -> dict[str, float]:
    """Per output: max |ORT optimizations on - off| of the original on the fresh inputs."""
    names, on = run_all(path, fresh, True)
    _, off = run_all(path, fresh, False)
    out = {}
    for j, n in enumerate(names):
        m = 0.0
        for a, b in zip(on, off):
            x, y = a[j], b[j]
            if np.issubdtype(x.dtype, np.floating):
                d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                d = d[np.isfinite(d)]
                m = max(m, float(d.max()) if d.size else 0.0)
        out[n] = m
    return out


def lossless_check(ref_off: tuple, noise: dict[str, float], cand_path: Path, fresh: list[dict]) -> dict:
    """Every element within max(8 x noise, atol + rtol |ref|); both sides with ORT optimizations off."""
    names, outs = ref_off
    cnames, couts = run_all(cand_path, fresh, False)
    bad_total, worst = 0, {}
    for j, name in enumerate(names):
        k = cnames.index(name) if name in cnames else j
        bad = 0
        max_abs = max_ratio = 0.0
        for o, c in zip(outs, couts):
            x, y = o[j], c[k]
            if x.shape != y.shape:
                bad += x.size
                continue
            if not np.issubdtype(x.dtype, np.floating):
                bad += int(np.sum(x != y))
                continue
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            same_special = (np.isnan(x64) & np.isnan(y64)) | (np.isinf(x64) & (x64 == y64))
            tol = np.maximum(NOISE_FACTOR * noise.get(name, 0.0), ATOL + RTOL * np.abs(x64))
            with np.errstate(invalid="ignore"):
                d = np.abs(x64 - y64)
                out_of = ~same_special & ~(d <= tol)
            bad += int(out_of.sum())
            fin = np.isfinite(d)
            if fin.any():
                max_abs = max(max_abs, float(d[fin].max()))
                max_ratio = max(max_ratio, float((d[fin] / tol[fin]).max()))
        bad_total += bad
        worst[name] = {"outside": bad, "max_abs": max_abs, "max_diff_over_tol": round(max_ratio, 4),
                       "noise": noise.get(name, 0.0)}
    return {"ok": bad_total == 0, "outside": bad_total, "outputs": worst}


# ---------------------------------------------------------------- commands

def _trim(obj, depth: int = 0):
    """The report without its cost breakdowns, lists cut at 40 entries."""
    if isinstance(obj, dict):
        return {k: _trim(v, depth + 1) for k, v in obj.items() if k not in ("cost", "ops", "flags")}
    if isinstance(obj, list):
        return [_trim(v, depth + 1) for v in obj[:40]] + ([f"... {len(obj) - 40} more"] if len(obj) > 40 else [])
    return obj


def run_cli(args: list[str], folder: Path, timeout: float, env: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run([CLI, *map(str, args), "--report", "r.json"], cwd=folder, env=env, capture_output=True,
                           text=True, timeout=timeout)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = "timeout", e.stdout or "", e.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    secs = round(time.perf_counter() - t0, 2)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    report = None
    if (folder / "r.json").exists():
        try:
            report = json.loads((folder / "r.json").read_text())
        except ValueError:
            report = None
    key = next((ln for ln in reversed(lines) if "refus" in ln.lower() or "error" in ln.lower()), lines[-1] if lines else "")
    return {"args": " ".join(["onnxopt", *map(str, args)]), "exit": code, "seconds": secs,
            "stderr_first": lines[0] if lines else "", "stderr_key": key,
            "stdout_tail": [ln for ln in out.splitlines() if ln.strip()][-4:], "report": report}


def command_args(cmd: str, case: Case, out: str) -> list[str] | None:
    m, d = str(case.path), str(case.calib)
    q = ["--no-latency-guard", "--no-cost-model"]
    return {"optimize+data": ["optimize", m, "-o", out, "--data", d],
            "optimize": ["optimize", m, "-o", out],
            "quantize": ["quantize", m, "-o", out, "--data", d, *q],
            "quantize-dynamic": ["quantize", m, "-o", out, "--mode", "dynamic", "--data", d, *q],
            "quantize-int4": ["quantize", m, "-o", out, "--weights", "int4", "--data", d, *q],
            "convert": ["convert", m, "-o", out, "--fp16", "--data", d],
            "prune": ["prune", m, "-o", out, "--sparsity", "0.5", "--data", d],
            "compress": ["compress", m, "-o", out, "--cluster", "16", "--data", d]}[cmd]


def skip_reason(cmd: str, case: Case, model: onnx.ModelProto) -> str | None:
    ops = {n.op_type for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    if cmd == "optimize+data" and case.data != "real":
        return "no data of its own (optimize runs without --data)"
    if cmd.startswith("quantize") and ops & QUANT_OPS:
        return "already quantized (" + ",".join(sorted(ops & QUANT_OPS)) + ")"
    if cmd in ("quantize-dynamic", "quantize-int4") and not any(
            n.op_type == "MatMul" and any(i in consts for i in n.input) for n in model.graph.node):
        return "no MatMul with a constant weight"
    return None


def fallback(cmd: str, case: Case, args: list[str], folder: Path, timeout: float, env: dict, ctx: dict) -> dict:
    """Was the refusal avoidable?  (module docstring)"""
    out = "fb.onnx"
    if cmd.startswith("optimize") or cmd.startswith("quantize") or cmd == "convert":
        fargs = [*args, "--force"]
    elif cmd == "prune":
        fargs = [a if a != "0.5" else "0.1" for a in args]
    else:  # compress without sparsity: more shared values is the smaller step
        fargs = [a if a != "16" else "256" for a in args]
    fargs[fargs.index("-o") + 1] = out
    res = run_cli(fargs, folder / "fallback", timeout, env)
    path = folder / "fallback" / out
    fb = {"args": res["args"], "exit": res["exit"], "stderr_key": res["stderr_key"], "seconds": res["seconds"]}
    if res["exit"] != 0 or not path.exists():
        fb["false_refusal"] = False
        fb["why"] = "the fallback did not write a model either"
        if cmd in ("prune", "compress") and res["exit"] == 3:
            # information only (not counted): how far the smaller step, forced, is on the fresh inputs
            forced = run_cli([*fargs, "--force"], folder / "forced", timeout, env)
            fpath = folder / "forced" / out
            if forced["exit"] == 0 and fpath.exists():
                fb["smaller_step_forced_fresh"] = lossy_drop(case.path, ctx["ref"], fpath, case.fresh)
        return fb
    if cmd.startswith("optimize"):
        chk = lossless_check(ctx["ref_off"], ctx["noise"], path, case.fresh)
        fb["check"] = chk
        fb["false_refusal"] = chk["ok"]
    else:
        chk = lossy_drop(case.path, ctx["ref"], path, case.fresh)
        fb["check"] = chk
        fb["false_refusal"] = chk["drop"] <= MAX_DROP and not chk["nonfinite"]
    return fb


def judge(cmd: str, case: Case, res: dict, folder: Path, out: Path, args: list[str], timeout: float, env: dict,
          ctx: dict) -> None:
    code = res["exit"]
    if code == 3:
        res["class"] = "refused"
        fb = fallback(cmd, case, args, folder, timeout, env, ctx)
        res["fallback"] = fb
        if fb["false_refusal"]:
            res["class"] = "FALSE REFUSAL"
        res["note"] = res["stderr_key"].replace("onnxopt: error: ", "")[:120]
        smaller = fb.get("smaller_step_forced_fresh") or (fb.get("check") if not cmd.startswith("optimize") else None)
        if smaller:
            res["note"] += f" | fallback fresh drop {smaller['drop']:.4f}"
        return
    if code in (1, 2):  # usage / bad input: the command does not apply to this model
        res["class"] = "n/a"
        res["note"] = res["stderr_key"][:110]
        return
    if code != 0:  # internal error (4), a signal, a timeout
        res["class"] = "failed"
        res["note"] = res["stderr_key"][:110]
        return
    if not out.exists():
        res["class"] = "failed"
        res["note"] = "exit 0 but no model written"
        return
    try:
        if cmd.startswith("optimize"):
            chk = lossless_check(ctx["ref_off"], ctx["noise"], out, case.fresh)
            res["check"] = chk
            bad = not chk["ok"]
            worst = max(chk["outputs"].values(), key=lambda v: v["max_diff_over_tol"])
            res["note"] = f"max diff/tol {worst['max_diff_over_tol']:.3g} (max abs {worst['max_abs']:.3g})"
        else:
            chk = lossy_drop(case.path, ctx["ref"], out, case.fresh)
            res["check"] = chk
            bad = chk["drop"] > SILENT_DROP or bool(chk["nonfinite"])
            o = chk["outputs"][chk["worst_output"]]
            res["note"] = f"fresh {o['metric']} drop {chk['drop']:.4f} ({chk['worst_output']}, n={o['n']})"
            if chk["nonfinite"]:
                res["note"] += f" inf/NaN in {chk['nonfinite']}"
    except Exception as e:  # the written model does not load or run
        res["check"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        bad = True
        res["note"] = f"written model fails to run: {type(e).__name__}"
    rep = res.get("report") or {}
    if cmd in ("prune", "compress") and rep.get("reached_sparsity") is not None:
        res["note"] += f"; sparsity asked {rep.get('asked_sparsity')} reached {rep.get('reached_sparsity')}"
    res["class"] = "SILENT CHANGE" if bad else "written"


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "never_empty_handed.json")
    ap.add_argument("--models", nargs="*", help="only these corpus names")
    ap.add_argument("--commands", nargs="*", choices=COMMANDS, help="only these commands")
    ap.add_argument("--skip", nargs="*", default=[], help="MODEL:COMMAND pairs not to run (too slow)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per onnxopt process")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    args = ap.parse_args()
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="onnxopt-refusal-corpus-")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONNXOPT_CACHE_DIR": str(tmp / "cache")}
    env.pop("ONNXOPT_STRICT_RESULTS", None)
    cases = build_corpus(tmp / "corpus")
    if args.models:
        cases = [c for c in cases if c.name in args.models]
    commands = args.commands or list(COMMANDS)
    skips = set(args.skip)
    rows = []
    print(f"corpus: {len(cases)} models, commands: {', '.join(commands)}", flush=True)
    print(f"{'model':28s} {'command':17s} {'exit':>7s}  {'class':14s} {'secs':>6s}  notes", flush=True)
    for case in cases:
        model = onnx.load(str(case.path), load_external_data=False)
        ctx: dict = {}
        try:
            ctx["ref"] = run_all(case.path, case.fresh, True)
            ctx["ref_off"] = run_all(case.path, case.fresh, False)
            ctx["noise"] = noise_of(case.path, case.fresh)
        except Exception as e:
            print(f"{case.name}: the original does not run on its fresh inputs: {e}", flush=True)
            rows.append({"model": case.name, "command": "*", "class": "skipped", "exit": None,
                         "note": f"original fails on the fresh inputs: {type(e).__name__}"})
            continue
        for cmd in commands:
            row = {"model": case.name, "command": cmd, "data": case.data, "origin": case.origin}
            reason = skip_reason(cmd, case, model) or (
                "dropped for the time budget" if f"{case.name}:{cmd}" in skips else None)
            if reason:
                row.update({"class": "skipped", "exit": None, "note": reason})
            else:
                folder = tmp / "runs" / case.name / cmd
                cargs = command_args(cmd, case, "out.onnx")
                res = run_cli(cargs, folder, args.timeout, env)
                judge(cmd, case, res, folder, folder / "out.onnx", cargs, args.timeout, env, ctx)
                res["report"] = _trim(res["report"]) if res["report"] else None
                row.update(res)
                shutil.rmtree(folder, ignore_errors=True)
            rows.append(row)
            secs = row.get("seconds", "")
            print(f"{case.name:28s} {cmd:17s} {str(row['exit']):>7s}  {row['class']:14s} {str(secs):>6s}  "
                  f"{row.get('note', '')}", flush=True)
    wall = time.perf_counter() - t_start

    ran = [r for r in rows if r["class"] != "skipped"]
    totals = {"runs": len(ran),
              "written": sum(r["class"] in ("written", "SILENT CHANGE") for r in ran),
              "refused": sum(r["class"] in ("refused", "FALSE REFUSAL") for r in ran),
              "false_refusals": sum(r["class"] == "FALSE REFUSAL" for r in ran),
              "silent_changes": sum(r["class"] == "SILENT CHANGE" for r in ran),
              "not_applicable": sum(r["class"] == "n/a" for r in ran),
              "failed": sum(r["class"] == "failed" for r in ran),
              "skipped": sum(r["class"] == "skipped" for r in rows),
              "models": len(cases), "wall_seconds": round(wall, 1)}
    print()
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    prune = {}
    for r in rows:
        if r["command"] == "prune" and r["model"] in COMPACT_CNNS:
            rep = r.get("report") or {}
            prune[r["model"]] = {"exit": r["exit"], "class": r["class"], "asked": rep.get("asked_sparsity"),
                                 "reached": rep.get("reached_sparsity"), "max_layer": rep.get("max_layer_sparsity"),
                                 "fresh_drop": (r.get("check") or {}).get("drop")}
    if prune:
        print("prune --sparsity 0.5 on the compact CNNs (asked -> reached, fresh drop):")
        for m, p in prune.items():
            print(f"  {m:20s} exit {p['exit']}: {p['asked']} -> {p['reached']} (max layer {p['max_layer']}), "
                  f"fresh drop {p['fresh_drop']}")
    for label, cls in (("false refusals", "FALSE REFUSAL"), ("silent changes", "SILENT CHANGE"), ("failed", "failed")):
        bad = [r for r in rows if r["class"] == cls]
        if bad:
            print(f"{label}:")
            for r in bad:
                print(f"  {r['model']} {r['command']}: {r.get('note', '')}")
    print(f"wall time {wall:.0f} s")
    result = {"machine": {k: v for k, v in info.items() if k != "flags"}, "max_drop": MAX_DROP,
              "silent_drop": SILENT_DROP, "lossless_tolerance": f"max({NOISE_FACTOR} x ORT on/off noise, {ATOL} + {RTOL} |ref|)",
              "totals": totals, "prune_compact_cnns": prune, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

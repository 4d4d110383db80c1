"""Byte-identity check of every onnxopt command, before and after a refactoring.

Record a manifest of what every command writes, on the models of a checkout, with the ``onnxopt``
executable of the virtualenv this script runs in (the one next to ``sys.executable``)::

    python tests/benchmarks/byte_identity.py --repo DIR --out manifest.json [--jobs 1] [--only REGEX]
    python tests/benchmarks/byte_identity.py --merge RUN1.json RUN2.json --out BASELINE.json
    python tests/benchmarks/byte_identity.py --compare BASELINE.json OTHER.json [--only REGEX]
    python tests/benchmarks/byte_identity.py --list --repo DIR          # the matrix, nothing run

The baseline is two runs of the same checkout merged: ``--merge`` marks every case whose recorded
values differ between the runs ``"nondeterministic": true`` and lists what differed under
``"volatile"`` (file names, report key paths, stdout/stderr, exit codes); ``--compare`` then ignores
exactly those (the union of both manifests' marks) but still compares the exit code (accepting any
code the baseline runs gave).  ``--compare`` prints each differing case and exits 1, else prints
"N cases identical".

Each case runs in a fresh folder (cwd) holding copies of its inputs under their own names (the
model, ``data/...``), so relative paths are the same for every checkout.  Environment:
``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1``, ``PYTHONHASHSEED=0``,
``ONNXOPT_CACHE_DIR=off`` (no latency cache shared with other runs), ``TMPDIR`` a per-run folder.
Cases run one after the other (``--jobs N`` runs N model groups at a time).  Lossy commands run with
``--no-latency-guard`` (and quantize ``--no-cost-model``) so no decision depends on a timing.

Recorded per case:

* ``exit``: the exit code of every step (``"timeout"`` past ``--timeout``);
* ``files``: sha256 of every file the case wrote (models, ``.data`` external data, batch outputs).
  Binary files as written; ``.json`` files (other than the case's ``--report``) normalized as
  below, then hashed; text files (``.md``, ``.txt``, ``.log``, ``.csv``) masked as below, then
  hashed; ``.html``/``.svg`` (batch's summary: timing tables and plots) masked with every number
  replaced, then hashed.  ``inputs_modified`` lists staged inputs whose bytes changed;
* ``report``: the ``--report r.json`` with volatile keys removed (bench: only ``report_keys``, the
  sorted set of key paths, list indices as ``[]``);
* ``stdout`` and ``stderr``: masked text (bench: stdout not recorded, it is all timings).

Removed report keys (matched case-insensitively against the whole key name, anywhere in the tree):

* timings: ``*seconds*``, ``*_s``, ``*_ms``, ``*_us``, ``*_ns``, ``time``, ``*_time``, ``times``,
  ``timing(s)``, ``elapsed*``, ``wall*``, ``duration*``, ``latency`` (the measured latency block of
  quantize/prune: times, ratio, interval, pairs, verdict), ``latency_ratio``, ``*speedup*``,
  ``*speed_up*``, ``throughput*``, ``p50/p90/p95/p99``, ``mean``, ``std``, ``median``;
* dates: ``date``, ``*_date``, ``timestamp*``, ``created``, ``started``, ``finished``, ``*_at``;
* paths: ``path``, ``paths``, ``*_path``, ``dir``, ``*_dir``, ``cwd``, ``tmp*``, ``temp*``;
* versions: ``version``, ``versions``, ``*_version``, ``python``, ``platform``;
* hosts: ``host``, ``hostname``, ``machine``, ``node_name``, ``pid``;
* memory: ``*rss*``, ``*memory*`` (``peak_activation_bytes``, computed, stays);
* CPU: ``cpu_flags``, ``cpu_model``, ``cpu_name``, ``cpu_info``, ``cpu_brand``, ``cpu_features``,
  ``cpuinfo``, ``flags``, ``simd*``, ``isa`` (not ``cpu`` itself: the EP name keys per-EP results).

Kept on purpose: settings such as ``latency_guard`` and the recipe's ``latency_decisions`` (empty
with ``--no-latency-guard``), accuracy, validation errors, sizes, ratios of sizes.

Masked text (stdout, stderr, string values left in reports, text files): the case folder, the run's
temporary folder, the checkout (``--repo``), the virtualenv and the home folder become ``<CASE>``,
``<TMP>``, ``<REPO>``, ``<VENV>``, ``<HOME>``; any other ``/tmp/...`` path ``<TMPPATH>``; Python
source locations (``File "x.py", line N`` / ``x.py:N:``) ``<PY>:<N>`` (modules move in a
refactoring); dates/times ``<DATE>``; hex addresses ``<ADDR>``; a number followed by a time unit
(``s``, ``sec``, ``seconds``, ``ms``, ``us``, ``µs``, ``ns``, ``min``) ``<T>``, and the first number of a
``A -> B ms`` pair too; ``N.NNx`` speed-ups on a line that mentions speed, faster, slower or latency
``<X>``.

The matrix (``--list`` prints it): on every ``models/*.onnx``: ``optimize`` (default pipeline,
validated; token models on their committed ``models/data/*_inputs.npz``, others ``--shape`` as in
tests/test_cli.py), ``inspect --json``, ``inspect --cost``, ``validate`` original vs optimized.  On
the models in ``MATRIX``: ``optimize -p default,fuse-transformer``, ``--external-data``, a custom
pipeline, ``--verify-each``, ``--no-validate``; ``quantize`` static / ``--mode dynamic`` /
``--weights int4`` (gptq with data, rtn without); a saved recipe replayed; ``convert --fp16``;
``prune --sparsity 0.5``; ``prune --channels 0.25``; ``compress --cluster 16``; ``validate`` of
lossy results (``--layerwise``, cosine, snr); ``bench`` (exit code and report keys only);
``batch --command optimize`` over two models, run twice (the rerun skips both); ``passes``; bad
input (corrupt, truncated, missing files, wrong data, unknown pass, output = input).  ``--data``:
the committed model-ready batches, else 8 batches of 8 built here from the committed training
splits (digits, text lines, as ``models.tasks.write_calibration``), else 8 synthesized batches
(numpy, seed = batch index); their digests are in the manifest's ``data``.  Refusals (exit 2/3)
are cases too: already-quantized or fp16 models, nothing to quantize, over ``--max-drop``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMAT = 1

# ---------------------------------------------------------------------------------------------------
# Models, their inputs and the matrix
# ---------------------------------------------------------------------------------------------------

#: Symbolic dims for validation (tests/test_cli.py SHAPES).
SHAPES = {
    "cnn_dynamic": ["image:2x3x24x40"],
    "transformer_encoder": ["tokens:2x7x64"],
    "exporter_opset11": ["x:3x3x8x8"],
}

#: Committed model-ready single batches (models/data/<arch>_inputs.npz).
NPZ = {f"{arch}_{exp}": f"{arch}_inputs.npz" for arch in ("bert", "gpt2", "llama", "vit") for exp in ("ts", "dynamo")}

#: Calibration folders built from the committed training splits (as models.tasks.write_calibration:
#: digits below index 1024, nearest upscaling, x/16; text lines 1 - x/255), 8 batches of 8.
TASK_DATA = {
    "digits_cnn": {"kind": "digits", "size": 8},
    "digits_resnet": {"kind": "digits", "size": 32},
    "digits_mobilenet": {"kind": "digits", "size": 32},
    "text_crnn": {"kind": "text", "src": "text_crnn_calib.npz"},
    "glyph_crnn": {"kind": "text", "src": "glyph_crnn_calib.npz"},
}

#: Synthesized calibration folders (numpy seed = batch index: floats N(0,1), ints in [0, 4),
#: ``*mask*`` inputs all ones), symbolic dims as given (others 2), 8 batches.
SYNTH_DIMS = {
    "cnn_bn_depthwise": {},
    "cnn_dynamic": {"batch": 2, "height": 24, "width": 40},
    "control_flow": {"n": 3},
    "crnn": {"batch": 2, "width": 64},
    "custom_domain": {"batch": 2},
    "exporter_opset11": {"batch": 3},
    "fp16_mlp": {"batch": 2},
    "fp16_overflow": {"batch": 2},
    "integer_ops": {},
    "qdq_conv": {"batch": 2},
    "transformer_encoder": {"batch": 2, "seq": 7},
    "yolo_head": {"batch": 2},
    "bert_encoder": {"batch": 2, "seq": 8},
}

QUANT_FLAGS = ["--no-latency-guard", "--no-cost-model"]

# Which models each lossy command runs on (a model missing from --repo is recorded as missing).
MATRIX = {
    # transformer fusion: every transformer export
    "optimize-fuse-transformer": ["bert_ts", "bert_dynamo", "bert_encoder", "gpt2_ts", "gpt2_dynamo", "llama_ts",
                                  "llama_dynamo", "vit_ts", "vit_dynamo", "transformer_encoder"],
    "optimize-external-data": ["digits_resnet", "bert_ts"],
    "quantize-static": ["digits_cnn", "digits_resnet", "digits_mobilenet", "text_crnn", "cnn_bn_depthwise", "yolo_head",
                        "bert_ts", "vit_dynamo", "transformer_encoder", "control_flow", "custom_domain", "fp16_mlp",
                        "qdq_conv", "integer_ops"],
    "quantize-dynamic": ["bert_ts", "bert_dynamo", "gpt2_ts", "llama_dynamo", "vit_ts", "transformer_encoder",
                         "fp16_overflow", "custom_domain", "digits_cnn", "qdq_conv", "integer_ops"],
    "quantize-int4": ["bert_ts", "gpt2_dynamo", "llama_ts", "vit_dynamo", "transformer_encoder", "fp16_overflow",
                      "glyph_crnn", "custom_domain", "qdq_conv"],
    "convert-fp16": ["fp16_overflow", "cnn_bn_depthwise", "control_flow", "custom_domain", "fp16_mlp", "qdq_conv",
                     "bert_ts", "vit_ts", "yolo_head", "transformer_encoder", "digits_resnet", "crnn"],
    "prune-sparsity": ["digits_cnn", "digits_resnet", "text_crnn", "bert_ts", "transformer_encoder", "yolo_head",
                       "control_flow", "fp16_overflow"],
    "prune-channels": ["digits_resnet", "digits_mobilenet", "text_crnn", "transformer_encoder", "bert_encoder",
                       "cnn_bn_depthwise", "yolo_head", "control_flow"],
    "compress-cluster": ["digits_cnn", "text_crnn", "bert_ts", "vit_ts", "fp16_overflow", "cnn_dynamic", "yolo_head",
                         "transformer_encoder", "control_flow"],
    "bench": ["digits_cnn", "bert_ts", "control_flow"],
}
#: batch --command optimize over these two models
BATCH_MODELS = ["cnn_bn_depthwise", "exporter_opset11"]


def data_for(name: str) -> str | None:
    """The staged --data of a model (relative to the case folder), or None."""
    if name in NPZ:
        return "data/" + NPZ[name]
    if name in TASK_DATA or name in SYNTH_DIMS:
        return "data/calib"
    return None


def shape_args(name: str) -> list[str]:
    return [a for s in SHAPES.get(name, []) for a in ("--shape", s)]


def validation_args(name: str) -> list[str]:
    """Inputs for optimize/validate: the committed batch of a token model, else --shape (tests/test_cli.py)."""
    return ["--data", "data/" + NPZ[name]] if name in NPZ else shape_args(name)


class Case:
    def __init__(self, cid: str, group: str, steps: list[list[str]], models: list[str] = (), data: str | None = None,
                 report: str | None = "r.json", report_mode: str = "full", stdout: bool = True,
                 needs: list[tuple[str, str, str]] = (), setup: str | None = None):
        self.id, self.group, self.steps, self.models, self.data = cid, group, steps, list(models), data
        self.report, self.report_mode, self.stdout, self.needs, self.setup = report, report_mode, stdout, list(needs), setup


def build_matrix(repo: Path) -> list[Case]:
    models = sorted(p.stem for p in (repo / "models").glob("*.onnx"))
    have = set(models)
    cases: list[Case] = []

    def add(cid, group, steps, models=(), **kw):
        cases.append(Case(cid, group, steps, models, **kw))

    # every model: optimize (default pipeline, validated), inspect --json, inspect --cost, validate original vs optimized
    for m in models:
        f = m + ".onnx"
        va = validation_args(m)
        vdata = "data/" + NPZ[m] if m in NPZ else None
        add(f"optimize/{m}", m, [["optimize", f, "-o", "opt.onnx", "--report", "r.json", *va]], [m], data=vdata)
        add(f"inspect-json/{m}", m, [["inspect", f, "--json"]], [m], report=None)
        add(f"inspect-cost/{m}", m, [["inspect", f, "--cost", *shape_args(m)]], [m], report=None)
        add(f"validate/{m}", m, [["validate", f, "opt.onnx", "--report", "r.json", *va]], [m], data=vdata,
            needs=[(f"optimize/{m}", "opt.onnx", "opt.onnx")])

    def lossy(kind, argv_fn):
        for m in MATRIX[kind]:
            if m not in have:
                add(f"{kind}/{m}", m, [], [m])  # recorded as missing
                continue
            args, d = argv_fn(m)
            add(f"{kind}/{m}", m, [args], [m], data=d)

    lossy("optimize-fuse-transformer",
          lambda m: (["optimize", m + ".onnx", "-o", "opt.onnx", "-p", "default,fuse-transformer", "--report", "r.json",
                      *validation_args(m)], "data/" + NPZ[m] if m in NPZ else None))
    lossy("optimize-external-data",
          lambda m: (["optimize", m + ".onnx", "-o", "opt.onnx", "--external-data", "--report", "r.json",
                      *validation_args(m)], "data/" + NPZ[m] if m in NPZ else None))

    def quant(extra):
        def fn(m):
            d = data_for(m)
            dargs = ["--data", d] if d else []
            return ["quantize", m + ".onnx", "-o", "q.onnx", *extra, *QUANT_FLAGS, *dargs, "--report", "r.json"], d
        return fn

    lossy("quantize-static", quant([]))
    lossy("quantize-dynamic", quant(["--mode", "dynamic"]))
    # int4: with --data gptq rounding (the default then), without it rtn; both on some models
    int4_without_data = {"llama_ts", "vit_dynamo", "fp16_overflow"}

    def int4(m):
        d = None if m in int4_without_data else data_for(m)
        dargs = ["--data", d] if d else []
        return ["quantize", m + ".onnx", "-o", "q.onnx", "--weights", "int4", *QUANT_FLAGS, *dargs, "--report", "r.json"], d

    lossy("quantize-int4", int4)

    def withdata(cmd):
        def fn(m):
            d = data_for(m)
            return [*cmd(m), *(["--data", d] if d else []), "--report", "r.json"], d
        return fn

    lossy("convert-fp16", withdata(lambda m: ["convert", m + ".onnx", "-o", "fp16.onnx", "--fp16", *shape_args(m)]))
    lossy("prune-sparsity", withdata(lambda m: ["prune", m + ".onnx", "-o", "p.onnx", "--sparsity", "0.5"]))
    lossy("prune-channels", withdata(lambda m: ["prune", m + ".onnx", "-o", "p.onnx", "--channels", "0.25",
                                                "--no-latency-guard"]))
    lossy("compress-cluster", withdata(lambda m: ["compress", m + ".onnx", "-o", "c.onnx", "--cluster", "16"]))

    # variants: a custom pipeline with options, --verify-each, --no-validate
    for m, extra in (("exporter_opset11", ["-p", "cleanup,fold-constants{size-limit=4096},dedup"]),
                     ("yolo_head", ["-p", "cleanup,fold-constants{size-limit=4096},dedup"]),
                     ("exporter_opset11", ["--verify-each"]), ("crnn", ["--verify-each"]),
                     ("gpt2_ts", ["--no-validate"])):
        if m in have:
            tag = {"-p": "pipeline", "--verify-each": "verify-each", "--no-validate": "no-validate"}[extra[0]]
            add(f"optimize-{tag}/{m}", m, [["optimize", m + ".onnx", "-o", "opt.onnx", *extra, "--report", "r.json",
                                            *validation_args(m)]], [m], data="data/" + NPZ[m] if m in NPZ else None)
    # a recipe saved and replayed (static int8)
    if "digits_cnn" in have:
        add("quantize-recipe/digits_cnn", "digits_cnn",
            [["quantize", "digits_cnn.onnx", "-o", "q.onnx", *QUANT_FLAGS, "--data", "data/calib", "--save-recipe",
              "recipe.json", "--method", "minmax", "--per-tensor"],
             ["quantize", "digits_cnn.onnx", "-o", "q2.onnx", "--data", "data/calib", "--recipe", "recipe.json",
              "--report", "r.json"]], ["digits_cnn"], data="data/calib")
    # validate a lossy result against its original: --layerwise (first diverging node), other metrics
    for m, src, extra in (("digits_cnn", "quantize-static", ["--layerwise"]),
                          ("bert_ts", "quantize-dynamic", ["--metric", "cosine", "--tol", "0.999"]),
                          ("fp16_overflow", "convert-fp16", ["--layerwise"]),
                          ("transformer_encoder", "quantize-int4", ["--metric", "snr", "--tol", "30"])):
        if m in have and m in MATRIX[src]:
            name = {"quantize-static": "q.onnx", "quantize-dynamic": "q.onnx", "quantize-int4": "q.onnx",
                    "convert-fp16": "fp16.onnx"}[src]
            d = data_for(m)
            add(f"validate-lossy/{m}", m, [["validate", m + ".onnx", name, *extra, "--report", "r.json",
                                            *(["--data", d] if d else [])]], [m], data=d,
                needs=[(f"{src}/{m}", name, name)])

    for m in MATRIX["bench"]:
        if m not in have:
            add(f"bench/{m}", m, [], [m])
            continue
        d = "data/" + NPZ[m] if m in NPZ else None
        add(f"bench/{m}", m, [["bench", m + ".onnx", "--warmup", "2", "--runs", "5", "--report", "r.json",
                                *(["--data", d] if d else shape_args(m))]], [m], data=d, report_mode="keys", stdout=False)
    if "digits_cnn" in have:  # two models side by side (original vs optimized)
        add("bench/digits_cnn-vs-optimized", "digits_cnn",
            [["bench", "digits_cnn.onnx", "opt.onnx", "--warmup", "2", "--runs", "5", "--report", "r.json"]],
            ["digits_cnn"], report_mode="keys", stdout=False, needs=[("optimize/digits_cnn", "opt.onnx", "opt.onnx")])

    # batch: two models, one worker; the second step reruns it (resume: both skipped)
    bm = [m for m in BATCH_MODELS if m in have]
    batch = ["batch", *[m + ".onnx" for m in bm], "-o", "out", "--command", "optimize", "--workers", "1"]
    add("batch/optimize", "batch", [batch, batch], bm, report=None)

    add("passes", "misc", [["passes"]], report=None)

    # bad input: exit code and stderr
    add("bad/corrupt-optimize", "misc", [["optimize", "corrupt.onnx", "-o", "o.onnx"]], report=None, setup="corrupt")
    add("bad/corrupt-inspect", "misc", [["inspect", "corrupt.onnx"]], report=None, setup="corrupt")
    add("bad/truncated-optimize", "misc", [["optimize", "truncated.onnx", "-o", "o.onnx"]], report=None, setup="truncated")
    add("bad/missing-optimize", "misc", [["optimize", "missing.onnx", "-o", "o.onnx"]], report=None)
    add("bad/missing-validate", "misc", [["validate", "missing_a.onnx", "missing_b.onnx"]], report=None)
    if "digits_cnn" in have:
        add("bad/missing-data-quantize", "misc", [["quantize", "digits_cnn.onnx", "-o", "q.onnx", "--data", "nope.npz"]],
            ["digits_cnn"], report=None)
        add("bad/wrong-data-optimize", "misc", [["optimize", "digits_cnn.onnx", "-o", "o.onnx", "--data", "wrong.npz"]],
            ["digits_cnn"], report=None, setup="wrong-data")
        add("bad/unknown-pass", "misc", [["optimize", "digits_cnn.onnx", "-o", "o.onnx", "-p", "cleanup,no-such-pass"]],
            ["digits_cnn"], report=None)
        add("bad/output-is-input", "misc", [["optimize", "digits_cnn.onnx", "-o", "digits_cnn.onnx"]], ["digits_cnn"],
            report=None)
    return cases


# ---------------------------------------------------------------------------------------------------
# Data (generated in a child process of this interpreter: numpy and onnx from the venv, not onnxopt)
# ---------------------------------------------------------------------------------------------------

DATA_SNIPPET = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np
spec, repo, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
batches, size = 8, 8
digest = hashlib.sha256()
def save(b, arrays):
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        digest.update(f"{b}:{k}:{a.dtype.str}:{a.shape}".encode()); digest.update(a.tobytes())
    np.savez(out / f"batch_{b:04d}.npz", **arrays)
if spec["kind"] == "digits":
    with np.load(repo / "models" / "data" / "digits_calib.npz") as z:
        images = z["x"][:1024]
    for b in range(batches):
        idx = np.arange(b * size, (b + 1) * size) % len(images)
        x = images[idx].astype(np.float32)[:, None] / 16.0
        rep = spec["size"] // 8
        if rep > 1:
            x = np.repeat(np.repeat(x, rep, axis=2), rep, axis=3)
        save(b, {"image": x})
elif spec["kind"] == "text":
    with np.load(repo / "models" / "data" / spec["src"]) as z:
        images = z["x"]
    for b in range(batches):
        idx = np.arange(b * size, (b + 1) * size) % len(images)
        save(b, {"line": (1.0 - images[idx].astype(np.float32) / 255.0)[:, None]})
else:
    import onnx
    from onnx import helper
    m = onnx.load(str(repo / "models" / (spec["model"] + ".onnx")), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    for b in range(batches):
        rng = np.random.default_rng(b)
        arrays = {}
        for i in m.graph.input:
            if i.name in inits:
                continue
            t = i.type.tensor_type
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
            shape = [d.dim_value if d.HasField("dim_value") else spec["dims"].get(d.dim_param, 2) for d in t.shape.dim]
            if "mask" in i.name:
                a = np.ones(shape, dt)
            elif dt.kind == "f":
                a = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                a = rng.integers(0, 2, shape).astype(dt)
            else:
                a = rng.integers(0, 4, shape).astype(dt)
            arrays[i.name] = a
        save(b, arrays)
print(digest.hexdigest())
"""


def make_data(repo: Path, root: Path, env: dict) -> dict[str, str]:
    """Calibration folders under root/<model>/; returns {model: sha256 of the arrays}."""
    digests = {}
    specs = {m: s for m, s in TASK_DATA.items()}
    specs.update({m: {"kind": "synth", "model": m, "dims": d} for m, d in SYNTH_DIMS.items()})
    for m, spec in sorted(specs.items()):
        if not (repo / "models" / (m + ".onnx")).exists():
            continue
        r = subprocess.run([sys.executable, "-c", DATA_SNIPPET, json.dumps(spec), str(repo), str(root / m)],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"data for {m} failed:\n{r.stderr}")
        digests[m] = r.stdout.strip()
    for f in sorted(set(NPZ.values())):
        src = repo / "models" / "data" / f
        if src.exists():
            digests[f] = sha256_file(src)
    return digests


# ---------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------

_VOLATILE_KEY = re.compile(
    r"(?ix)^(?:"
    # timings (the latency dicts of quantize/prune: float_ms, ratio, interval, pairs, verdict, speedup, threads)
    r".*seconds.*|.*_s|.*_ms|.*_us|.*_ns|time|.*_time|times|timings?|elapsed.*|wall.*|duration.*|latency|latency_ratio"
    r"|.*speedup.*|.*speed_up.*|throughput.*|p50|p90|p95|p99|mean|std|median"
    # dates
    r"|date|.*_date|timestamp.*|created|started|finished|.*_at"
    # paths
    r"|path|paths|.*_path|dir|.*_dir|cwd|tmp.*|temp.*"
    # versions
    r"|version|versions|.*_version|python|platform"
    # hosts
    r"|host|hostname|machine|node_name|pid"
    # memory
    r"|.*rss.*|.*memory.*"
    # cpu (not ``cpu`` itself: the EP name keys per-EP results)
    r"|cpu_(?:flags|model|name|info|brand|features)|cpuinfo|flags|simd.*|isa"
    r")$")

_NUM = r"[-+]?\d+(?:[.,]\d+)?(?:e[-+]?\d+)?"
_UNIT = r"\s?(?:seconds|secs?|s|ms|us|µs|ns|min)(?![\w])"
_TIME_UNIT = re.compile(r"(?<![\w.])" + _NUM + _UNIT)
#: "0.153 -> 0.140 ms": the first number of a before -> after timing
_TIME_RANGE = re.compile(r"(?<![\w.])" + _NUM + r"(\s*(?:->|→)\s*)(?=" + _NUM + _UNIT + ")")
_ANY_NUM = re.compile(r"(?<![\w#])" + _NUM)
_SPEED_LINE = re.compile(r"(?i)speed|faster|slower|latency")
_SPEED_X = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?x(?![\w])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
_ADDR = re.compile(r"0x[0-9a-fA-F]{6,}")
_PYLOC = re.compile(r'File "[^"]+\.py", line \d+|[\w./<>-]+\.py:\d+(?=:)')
_TMPPATH = re.compile(r"/tmp/[\w.+-]+(?:/[\w.+-]+)*")


class Masker:
    def __init__(self, subs: list[tuple[str, str]]):
        # longest first: the case folder is inside the run's folder
        self.subs = sorted([(a, b) for a, b in subs if a], key=lambda s: -len(s[0]))

    def text(self, s: str) -> str:
        for a, b in self.subs:
            s = s.replace(a, b)
        s = _DATE.sub("<DATE>", s)
        s = _ADDR.sub("<ADDR>", s)
        s = _PYLOC.sub("<PY>:<N>", s)
        s = _TMPPATH.sub("<TMPPATH>", s)
        out = []
        for line in s.splitlines():
            line = _TIME_RANGE.sub(r"<T>\1", line)
            line = _TIME_UNIT.sub("<T>", line)
            if _SPEED_LINE.search(line):
                line = _SPEED_X.sub("<X>", line)
            out.append(line)
        return "\n".join(out)

    def json(self, v):
        if isinstance(v, dict):
            return {k: self.json(x) for k, x in v.items() if not _VOLATILE_KEY.match(str(k))}
        if isinstance(v, list):
            return [self.json(x) for x in v]
        if isinstance(v, str):
            return self.text(v)
        return v


def key_paths(v, prefix="") -> set[str]:
    out = set()
    if isinstance(v, dict):
        for k, x in v.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out.add(p)
            out |= key_paths(x, p)
    elif isinstance(v, list):
        for x in v:
            out |= key_paths(x, prefix + "[]")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


TEXT_SUFFIXES = {".md", ".txt", ".log", ".csv"}
HTML_SUFFIXES = {".html", ".htm", ".svg"}


def file_digest(path: Path, masker: Masker) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            v = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return sha256_file(path)
        return "json:" + sha256_bytes(json.dumps(masker.json(v), sort_keys=True).encode())
    if suffix in HTML_SUFFIXES:  # tables and SVG plots of timings: every number masked
        try:
            return "html:" + sha256_bytes(_ANY_NUM.sub("<N>", masker.text(path.read_text(encoding="utf-8"))).encode())
        except UnicodeDecodeError:
            return sha256_file(path)
    if suffix in TEXT_SUFFIXES:
        try:
            return "text:" + sha256_bytes(masker.text(path.read_text(encoding="utf-8")).encode())
        except UnicodeDecodeError:
            return sha256_file(path)
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------

def run_case(case: Case, ctx: dict) -> dict:
    repo, root, exe = ctx["repo"], ctx["root"], ctx["exe"]
    rec: dict = {"argv": [["onnxopt", *s] for s in case.steps]}
    if not case.steps:
        rec["missing"] = "model not in --repo"
        return rec
    folder = root / "cases" / case.id.replace("/", "__")
    folder.mkdir(parents=True)
    tmp = root / "tmp" / case.id.replace("/", "__")
    tmp.mkdir(parents=True)
    staged: dict[str, str] = {}
    for m in case.models:
        src = repo / "models" / (m + ".onnx")
        shutil.copyfile(src, folder / src.name)
    if case.data:
        dst = folder / case.data
        dst.parent.mkdir(parents=True, exist_ok=True)
        if case.data == "data/calib":
            shutil.copytree(ctx["data"] / case.models[0], dst)
        else:
            shutil.copyfile(repo / "models" / "data" / Path(case.data).name, dst)
    if case.setup == "corrupt":
        (folder / "corrupt.onnx").write_bytes(b"this is not an onnx model\x00\xff\x13" * 64)
    elif case.setup == "truncated":
        b = (repo / "models" / "digits_cnn.onnx").read_bytes()
        (folder / "truncated.onnx").write_bytes(b[: len(b) // 2])
    elif case.setup == "wrong-data":
        shutil.copyfile(repo / "models" / "data" / "bert_inputs.npz", folder / "wrong.npz")
    for src_case, name, dst in case.needs:
        src = root / "cases" / src_case.replace("/", "__") / name
        if not src.exists():
            rec["missing"] = f"needs {name} from {src_case}, which did not write it"
            shutil.rmtree(folder, ignore_errors=True)
            return rec
        shutil.copyfile(src, folder / dst)
    for p in folder.rglob("*"):
        if p.is_file():
            staged[p.relative_to(folder).as_posix()] = sha256_file(p)

    env = dict(ctx["env"], TMPDIR=str(tmp))
    masker = Masker([(str(folder), "<CASE>"), (str(root), "<TMP>"), (str(repo), "<REPO>"),
                     (str(Path(sys.prefix)), "<VENV>"), (os.path.expanduser("~"), "<HOME>")])
    exits, outs, errs = [], [], []
    t0 = time.perf_counter()
    for step in case.steps:
        try:
            r = subprocess.run([exe, *step], cwd=folder, env=env, capture_output=True, timeout=ctx["timeout"])
            exits.append(r.returncode)
            out, err = r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            exits.append("timeout")
            out, err = e.stdout or b"", e.stderr or b""
        outs.append(masker.text(out.decode("utf-8", "replace")))
        errs.append(masker.text(err.decode("utf-8", "replace")))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["exit"] = exits
    if case.stdout:
        rec["stdout"] = "\n--- next step ---\n".join(outs) if len(outs) > 1 else outs[0]
    rec["stderr"] = "\n--- next step ---\n".join(errs) if len(errs) > 1 else errs[0]
    if case.report and (folder / case.report).exists():
        try:
            report = json.loads((folder / case.report).read_text(encoding="utf-8"))
        except ValueError as e:
            rec["report_error"] = str(e)
        else:
            if case.report_mode == "keys":
                rec["report_keys"] = sorted(key_paths(report))
            else:
                rec["report"] = masker.json(report)
    files, modified = {}, []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel in staged:
            if sha256_file(p) != staged[rel]:
                modified.append(rel)
            continue
        if rel == case.report:
            continue
        files[rel] = file_digest(p, masker)
    rec["files"] = files
    if modified:
        rec["inputs_modified"] = modified
    leftover = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))
    if leftover:
        rec["tmp_leftovers"] = len(leftover)
    shutil.rmtree(tmp, ignore_errors=True)
    return rec


def cleanup_group(root: Path, cases: list[Case]) -> None:
    for c in cases:
        shutil.rmtree(root / "cases" / c.id.replace("/", "__"), ignore_errors=True)


def environment_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "nproc": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    snippet = ("import importlib.metadata as m, json\n"
               "out = {}\n"
               "for p in ('onnxopt', 'onnx', 'onnxruntime', 'onnx-ir', 'onnxscript', 'numpy', 'ml_dtypes', 'click'):\n"
               "    try: out[p] = m.version(p)\n"
               "    except Exception: out[p] = None\n"
               "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
    info["packages"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr
    return info


def git_info(repo: Path) -> dict:
    def git(*a):
        r = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def record(args) -> int:
    repo = Path(args.repo).resolve()
    exe = Path(sys.executable).parent / "onnxopt"
    if not exe.exists():
        raise SystemExit(f"no onnxopt next to {sys.executable}")
    cases = build_matrix(repo)
    if args.only:
        rx = re.compile(args.only)
        cases = [c for c in cases if rx.search(c.id)]
        # keep what they need
        need = {n[0] for c in cases for n in c.needs}
        ids = {c.id for c in cases}
        cases = [c for c in build_matrix(repo) if c.id in ids or c.id in need]
    if args.list:
        for c in cases:
            print(c.id, " ".join(c.steps[0]) if c.steps else "(missing)")
        print(len(cases), "cases")
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               ONNXOPT_CACHE_DIR="off")
    for k in ("PYTHONPATH", "PYTHONSTARTUP"):
        env.pop(k, None)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="byte_identity_"))
    try:
        ctx = {"repo": repo, "root": root, "exe": str(exe), "env": env, "timeout": args.timeout, "data": root / "data"}
        data = make_data(repo, root / "data", env)
        groups: dict[str, list[Case]] = {}
        for c in cases:
            groups.setdefault(c.group, []).append(c)
        results: dict[str, dict] = {}
        done = [0]

        def run_group(gcases):
            for c in gcases:
                rec = run_case(c, ctx)
                results[c.id] = rec
                done[0] += 1
                status = rec.get("missing") or ",".join(map(str, rec.get("exit", [])))
                print(f"[{done[0]}/{len(cases)}] {c.id}: {status} ({rec.get('seconds', 0)} s)", flush=True)
            if not args.keep:
                cleanup_group(root, gcases)

        if args.jobs <= 1:
            for g in groups.values():
                run_group(g)
        else:
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                for fut in [pool.submit(run_group, g) for g in groups.values()]:
                    fut.result()
    finally:
        if args.keep:
            print("kept", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    manifest = {
        "format": FORMAT,
        "repo": str(repo),
        "git": git_info(repo),
        "onnxopt": str(exe),
        "environment": environment_info(),
        "runs": 1,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "data": data,
        "cases": {c.id: results[c.id] for c in cases},
    }
    Path(args.out).write_text(json.dumps(manifest, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases in {manifest['wall_seconds']} s -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Merge and compare
# ---------------------------------------------------------------------------------------------------

def json_diff(a, b, prefix="", out=None, limit=50) -> list[str]:
    """Key paths where a and b differ."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                json_diff(a[k], b[k], p, out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            json_diff(x, y, f"{prefix}[{i}]", out, limit)
    elif a != b or type(a) is not type(b):
        out.append(prefix or "<root>")
    return out


def _strip_paths(v, paths: set[str], prefix=""):
    """v without the key paths listed (as json_diff names them)."""
    if prefix in paths:
        return "<volatile>"
    if isinstance(v, dict):
        return {k: _strip_paths(x, paths, f"{prefix}.{k}" if prefix else str(k)) for k, x in v.items()}
    if isinstance(v, list):
        return [_strip_paths(x, paths, f"{prefix}[{i}]") for i, x in enumerate(v)]
    return v


def merge(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in args.merge)
    out = dict(a)
    out["runs"] = a.get("runs", 1) + b.get("runs", 1)
    out["wall_seconds_runs"] = [a.get("wall_seconds"), b.get("wall_seconds")]
    if a.get("data") != b.get("data"):
        print("warning: the two runs generated different data", file=sys.stderr)
    cases, flagged = {}, []
    for cid in list(a["cases"]) + [c for c in b["cases"] if c not in a["cases"]]:
        ca, cb = a["cases"].get(cid), b["cases"].get(cid)
        if ca is None or cb is None:
            cases[cid] = dict(ca or cb, only_in_one_run=True)
            continue
        c = dict(ca)
        vol = {}
        for k, v in (ca.get("volatile") or {}).items():
            vol[k] = v
        if ca.get("exit") != cb.get("exit"):
            vol["exit"] = sorted({json.dumps(ca.get("exit")), json.dumps(cb.get("exit"))})
        fa, fb = ca.get("files") or {}, cb.get("files") or {}
        files = sorted({f for f in set(fa) | set(fb) if fa.get(f) != fb.get(f)} | set(vol.get("files", [])))
        if files:
            vol["files"] = files
        rep = json_diff(ca.get("report"), cb.get("report"), limit=10_000)
        if ca.get("report_keys") != cb.get("report_keys"):
            rep.append("<report_keys>")
        rep = sorted(set(rep) | set(vol.get("report", [])))
        if rep:
            vol["report"] = rep
        for k in ("stdout", "stderr", "missing", "inputs_modified"):
            if ca.get(k) != cb.get(k) or vol.get(k):
                vol[k] = True
        if vol:
            c["nondeterministic"] = True
            c["volatile"] = vol
            flagged.append(cid)
        cases[cid] = c
    out["cases"] = cases
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, {len(flagged)} nondeterministic -> {args.out}")
    for cid in flagged:
        v = cases[cid]["volatile"]
        print(f"  {cid}: " + "; ".join(f"{k}: {', '.join(x) if isinstance(x, list) else x}"
                                       for k, x in ((k, v[k]) for k in v))[:400])
    return 0


def compare(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in args.compare)
    ea, eb = a.get("environment", {}).get("packages"), b.get("environment", {}).get("packages")
    if ea != eb:
        print(f"warning: package versions differ: {ea} vs {eb}", file=sys.stderr)
    if a.get("data") != b.get("data"):
        print("warning: generated data differ (numpy/onnx or models/data changed)", file=sys.stderr)
    diffs = []
    ids = list(a["cases"]) + [c for c in b["cases"] if c not in a["cases"]]
    if args.only:
        ids = [c for c in ids if re.search(args.only, c)]
    for cid in ids:
        ca, cb = a["cases"].get(cid), b["cases"].get(cid)
        if ca is None or cb is None:
            diffs.append((cid, [f"only in {'B' if ca is None else 'A'}"]))
            continue
        vol: dict = {}
        for c in (ca, cb):
            for k, v in (c.get("volatile") or {}).items():
                if isinstance(v, list):
                    vol[k] = sorted(set(vol.get(k, [])) | set(v))
                else:
                    vol[k] = vol.get(k) or v
        why = []
        if ca.get("missing") != cb.get("missing") and not vol.get("missing"):
            why.append(f"missing: {ca.get('missing')!r} vs {cb.get('missing')!r}")
        if ca.get("exit") != cb.get("exit"):
            seen = set(vol.get("exit", []))  # exit codes the baseline runs gave, when they differed
            if not (seen and all(json.dumps(c.get("exit")) in seen for c in (ca, cb))):
                why.append(f"exit: {ca.get('exit')} vs {cb.get('exit')}" + (f" (baseline runs gave {sorted(seen)})" if seen else ""))
        fa, fb = ca.get("files") or {}, cb.get("files") or {}
        skip = set(vol.get("files", []))
        for f in sorted(set(fa) | set(fb)):
            if f in skip:
                continue
            if f not in fa or f not in fb:
                why.append(f"file {f}: only in {'A' if f in fa else 'B'}")
            elif fa[f] != fb[f]:
                why.append(f"file {f}: {fa[f][:16]}... vs {fb[f][:16]}...")
        ignore = set(vol.get("report", []))
        ra, rb = _strip_paths(ca.get("report"), ignore), _strip_paths(cb.get("report"), ignore)
        d = json_diff(ra, rb, limit=8)
        if d:
            why.append("report: " + ", ".join(d))
        if ca.get("report_keys") != cb.get("report_keys") and "<report_keys>" not in ignore:
            ka, kb = set(ca.get("report_keys") or []), set(cb.get("report_keys") or [])
            why.append(f"report keys: only A {sorted(ka - kb)[:5]}, only B {sorted(kb - ka)[:5]}")
        for k in ("stdout", "stderr"):
            if ca.get(k) != cb.get(k) and not vol.get(k):
                la, lb = (ca.get(k) or "").splitlines(), (cb.get(k) or "").splitlines()
                first = next((i for i in range(max(len(la), len(lb)))
                              if (la[i] if i < len(la) else None) != (lb[i] if i < len(lb) else None)), 0)
                why.append(f"{k} line {first + 1}: {(la[first] if first < len(la) else '<none>')!r} vs "
                           f"{(lb[first] if first < len(lb) else '<none>')!r}")
        if ca.get("inputs_modified") != cb.get("inputs_modified") and not vol.get("inputs_modified"):
            why.append(f"inputs modified: {ca.get('inputs_modified')} vs {cb.get('inputs_modified')}")
        if why:
            diffs.append((cid, why))
    for cid, why in diffs:
        print(f"DIFF {cid}")
        for w in why:
            print(f"    {w}")
    if diffs:
        print(f"{len(diffs)} of {len(ids)} cases differ")
        return 1
    nd = sum(1 for c in ids if (a["cases"].get(c) or {}).get("nondeterministic"))
    print(f"{len(ids)} cases identical" + (f" ({nd} nondeterministic: file hashes/fields ignored)" if nd else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", help="checkout whose models/*.onnx and models/data are used")
    p.add_argument("--out", help="manifest to write (record, --merge)")
    p.add_argument("--jobs", type=int, default=1, help="model groups run at the same time (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command before it is killed")
    p.add_argument("--only", help="regex: record (or --compare) only the cases whose id matches (recording adds what they need)")
    p.add_argument("--list", action="store_true", help="print the matrix and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (debugging)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--merge", nargs=2, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(args)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        return merge(args)
    if not args.repo or (not args.out and not args.list):
        p.error("--repo and --out are needed to record (or --compare A B, --merge A B --out C)")
    return record(args)


if __name__ == "__main__":
    sys.exit(main())

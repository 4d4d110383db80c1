"""onnxopt convert --fp16 vs onnxconverter-common's convert_float_to_float16, side by side in one run.

    python tests/benchmarks/compare_fp16.py [--models fp16_overflow bert_encoder ...] [--out bench-results/fp16.json]

Not a timed test.  For each model in ``models/``:

- ``onnxopt``: ``onnxopt.api.convert(model, out)`` with its defaults (keep-io-types, default block
  list, ranges from synthesized inputs since these models have no data; ``force`` so that a
  refused result is still measured, its validation verdict is reported in ``validated``);
- ``occ``: ``onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True)``,
  its defaults otherwise (it clamps weights to +-1e4 and blocks its own op list).

Each result runs at two synthesized input points (seeds 21 and 22; symbolic dims 1 then 3) on the
CPU EP in two ways: *faithful* (``onnxopt.precision.convert.faithful_session``: every fp16 tensor rounded
as fp16 kernels do, which is what a GPU EP computes) and *plain* (an ordinary CPU session, which
fuses chains of fp16 ops into float32 and so hides overflow).  Reported: inf/NaN count in the
outputs (faithful and plain), max abs diff vs fp32 and max abs diff / max |fp32| (faithful),
whether every output is within rtol 1e-2 / atol 1e-3, file size ratio, number of Cast nodes, and
whether ORT's CPU EP crashes creating a default-optimization session of the result (in a child
process; the plain run then uses optimizations off).

Output: the CPU (model, SIMD flags, cores, ORT version) first, then one table row per model and
tool; the JSON only with ``--out PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from onnxopt import api, runtime  # noqa: E402
from onnxopt import benchmark as bench  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402
from onnxopt.precision import convert  # noqa: E402

MODELS = ["fp16_overflow", "cnn_dynamic", "cnn_bn_depthwise", "crnn", "control_flow", "transformer_encoder", "bert_encoder",
          "yolo_head", "digits_cnn", "digits_resnet", "text_crnn", "custom_domain", "fp16_mlp", "qdq_conv"]
RTOL, ATOL = 1e-2, 1e-3


def input_points(src: Path) -> list[dict[str, np.ndarray]]:
    sess = runtime.session(str(src), "cpu")
    pts = []
    for seed, dim in ((21, 1), (22, 3)):
        shapes = {i.name: tuple(d if isinstance(d, int) and d >= 0 else dim for d in i.shape) for i in sess.get_inputs()}
        pts.append(runtime.synthesize(sess, shapes, seed=seed, quiet=True))
    return pts


def evaluate(src: Path, out: Path) -> dict:
    ref_sess = runtime.session(str(src), "cpu")
    faithful, _ = convert.faithful_session(out)
    crash = convert.crashes_default_session(out)  # ORT 1.32 segfaults on some fp16 graphs at its default level
    plain = runtime.session(str(out), "cpu", optimize=False) if crash else runtime.session(str(out), "cpu")
    names = [o.name for o in ref_sess.get_outputs()]
    half = {i.name for i in plain.get_inputs() if i.type == "tensor(float16)"}
    row = {"default_session_crash": crash or None, "nonfinite": 0, "nonfinite_plain": 0, "max_abs": 0.0,
           "max_rel_to_range": 0.0, "within_tolerance": True}
    for feeds in input_points(src):
        ref = runtime.run(ref_sess, feeds)
        fed = {k: v.astype(np.float16) if k in half else v for k, v in feeds.items()}
        got, got_plain = runtime.run(faithful, fed, names), runtime.run(plain, fed, names)
        for name in names:
            r = ref[name]
            if r.dtype.kind != "f":
                continue
            g, gp = got[name].astype(np.float64), got_plain[name].astype(np.float64)
            finite = np.isfinite(r)
            row["nonfinite"] += int(np.count_nonzero(~np.isfinite(g) & finite))
            row["nonfinite_plain"] += int(np.count_nonzero(~np.isfinite(gp) & finite))
            with np.errstate(invalid="ignore"):
                d = np.where(finite, np.abs(g - r), 0.0)
            d = np.where(np.isfinite(d), d, np.inf)
            row["max_abs"] = max(row["max_abs"], float(d.max()))
            row["max_rel_to_range"] = max(row["max_rel_to_range"], float(d.max() / max(float(np.abs(r[finite]).max()), 1e-12)))
            row["within_tolerance"] &= bool(np.all(d <= ATOL + RTOL * np.abs(np.where(finite, r, 0))))
    m = onnx.load(str(out))
    row["casts"] = sum(n.op_type == "Cast" for g in _graphs(m.graph) for n in g.node)
    row["size_ratio"] = out.stat().st_size / src.stat().st_size
    return row


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def run_onnxopt(src: Path, out: Path) -> dict:
    report = api.convert(src, out, force=True)
    c = report["conversion"]
    return {"validated": report["validation"]["ok"], "fp16_nodes": c["fp16_nodes"], "kept_fp32": c["kept_fp32_by_kind"]}


def run_occ(src: Path, out: Path) -> dict:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every clamped weight
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(out))
    return {}


def fmt(row: dict) -> str:
    if not row.get("ok"):
        return f"FAILED: {row['error']}"
    extra = f" validated={row['validated']}" if "validated" in row else ""
    return (f"inf/NaN {row['nonfinite']:>5} (plain CPU {row['nonfinite_plain']:>4})  max abs {row['max_abs']:9.3g}  "
            f"rel-to-range {row['max_rel_to_range']:8.2g}  tol {'ok ' if row['within_tolerance'] else 'NO '} "
            f"size {row['size_ratio']:.3f}  Casts {row['casts']:>3}{extra}"
            + ("  ORT CPU default session CRASHES" if row["default_session_crash"] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m in MODELS if (ROOT / "models" / f"{m}.onnx").exists()])
    p.add_argument("--out", type=Path, default=None, help="write the JSON here; default: print only")
    args = p.parse_args(argv)
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    results: dict = {"ort_version": ort.__version__, "machine": {k: v for k, v in info.items() if k != "flags"},
                     "rtol": RTOL, "atol": ATOL, "models": {}}
    try:
        import onnxconverter_common

        results["onnxconverter_common"] = onnxconverter_common.__version__
    except ImportError:
        print("onnxconverter-common is not installed (pip install -e .[bench]); measuring onnxopt only")
    with tempfile.TemporaryDirectory(prefix="onnxopt-fp16bench-") as tmp:
        for name in args.models:
            src = ROOT / "models" / f"{name}.onnx"
            entry = {}
            for tool, fn in (("onnxopt", run_onnxopt), ("occ", run_occ)):
                if tool == "occ" and "onnxconverter_common" not in results:
                    continue
                out = Path(tmp) / f"{name}.{tool}.onnx"
                try:
                    row = {"ok": True, **fn(src, out)}
                    row.update(evaluate(src, out))
                except (OnnxoptError, Exception) as e:  # noqa: BLE001 - a tool's failure is a result
                    text = (str(e).strip().splitlines() or [""])[0].replace(f"{ROOT}/", "")[:160]
                    row = {"ok": False, "error": f"{type(e).__name__}: {text}"}
                entry[tool] = row
                print(f"{name:20s} {tool:8s} {fmt(row)}", flush=True)
            results["models"][name] = entry
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

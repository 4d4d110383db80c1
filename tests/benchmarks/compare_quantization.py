"""onnxopt quantize vs onnxruntime.quantization.quantize_static, side by side in one run.

    python tests/benchmarks/compare_quantization.py [--models digits_cnn ...] [--no-rss] [--out bench-results/quantization.json]

Not a timed test.  For each reference model: success or the error, task accuracy (trained models,
``models.tasks``) or output cosine/SNR vs fp32 (others, on held-out random batches), CPU EP latency
ratio vs fp32 (1 thread, median of alternating runs in one process), file size.  Tools:

- ``onnxopt``: ``onnxopt quantize MODEL -o OUT --data DIR`` (defaults, nothing else);
- ``ort-default``: ``quantize_static(model, out, reader)`` with its defaults (QDQ, per-tensor, MinMax);
- ``ort-tuned``: the best hand settings we found: per-channel, Conv/MatMul/Gemm only, reduce_range.

Then calibration peak RSS at 16 vs 64 batches (fresh subprocess each, ``ru_maxrss``) for onnxopt
and for quantize_static's Entropy calibrator, on digits_resnet.

Output: the CPU it ran on (model, SIMD flags, cores, ORT version) first, then one line per model
and tool as it finishes, then the whole JSON.  Nothing is written unless ``--out PATH`` is given
(the JSON goes there); the committed ``docs/quantization.json`` is never overwritten by default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import tasks
from onnxopt import benchmark as bench
from onnxopt import runtime

TRAINED = ["digits_cnn", "digits_resnet", "digits_mobilenet", "text_crnn"]
OTHERS = ["cnn_bn_depthwise", "cnn_dynamic", "yolo_head", "crnn", "transformer_encoder", "bert_encoder"]
SHAPES = {"cnn_dynamic": {"image": (8, 3, 64, 64)}, "cnn_bn_depthwise": None, "yolo_head": {"images": (4, 3, 64, 64)},
          "crnn": {"line": (8, 1, 32, 128)}, "transformer_encoder": {"tokens": (8, 64, 64)},
          "bert_encoder": None}


def session(path: str) -> ort.InferenceSession:
    """One-thread CPU session (onnxopt.runtime's)."""
    return runtime.session(path, "cpu", threads=1)


def calib_dir(name: str, folder: Path, batches: int = 16) -> Path:
    if name in TRAINED:
        return tasks.write_calibration(name, folder, batches, 8)
    return tasks.write_random_calibration(ROOT / "models" / f"{name}.onnx", folder, batches, SHAPES.get(name))


def load_batches(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def latency(paths: list[str], feeds: dict, runs: int = 30) -> list[float]:
    sessions = [session(p) for p in paths]
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in times]


def fidelity(ref_path: str, path: str, batches: list[dict]) -> dict:
    a, b = session(ref_path), session(path)
    cos, snr = [], []
    for feeds in batches:
        for r, g in zip(a.run(None, feeds), b.run(None, feeds)):
            r, g = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
            cos.append(float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30)))
            snr.append(float(10 * np.log10((r @ r) / max(((r - g) ** 2).sum(), 1e-30))))
    return {"cosine": float(np.mean(cos)), "snr_db": float(np.mean(snr))}


class Reader:
    def __init__(self, batches):
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


def run_onnxopt(src: Path, out: Path, data: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxopt.cli", "-q", "quantize", str(src), "-o", str(out), "--data", str(data)],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1])


def run_ort(src: Path, out: Path, data: Path, tuned: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    kw = {}
    if tuned:
        kw = {"per_channel": True, "reduce_range": True, "op_types_to_quantize": ["Conv", "MatMul", "Gemm"],
              "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
    quantize_static(str(src), str(out), Reader(load_batches(data)), quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.MinMax, **kw)


def evaluate(name: str, src: Path, path: Path, held_out: list[dict]) -> dict:
    row = {"bytes": path.stat().st_size}
    if name in tasks.METRICS:
        row["task"] = tasks.METRICS[name](session(str(path)))
    row.update(fidelity(str(src), str(path), held_out))
    t_q, t_f = latency([str(path), str(src)], held_out[0])
    row.update(latency_ms=t_q, float_ms=t_f, speedup=t_f / t_q)
    return row


RSS_SNIPPET = """
import resource, sys
sys.path.insert(0, {root!r})
tool, src, data, out = sys.argv[1:5]
if tool == "onnxopt":
    from onnxopt.quantization import static as quantize
    quantize.quantize(src, out, data=data, latency_guard=False, recovery=())
else:
    sys.path.insert(0, {bench!r})
    from compare_quantization import Reader, load_batches
    from pathlib import Path
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    quantize_static(src, out, Reader(load_batches(Path(data))), quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.Entropy)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(tool: str, src: Path, data: Path, out: Path) -> float:
    code = RSS_SNIPPET.format(root=str(ROOT), bench=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", code, tool, str(src), str(data), str(out)],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return int(r.stdout.strip().splitlines()[-1]) / 1024  # MB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[m for m in TRAINED + OTHERS if (ROOT / "models" / f"{m}.onnx").exists()])
    p.add_argument("--out", type=Path, default=None, help="write the JSON here; default: print only")
    p.add_argument("--no-rss", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    results: dict = {"ort_version": ort.__version__, "machine": {k: v for k, v in info.items() if k != "flags"},
                     "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxopt-qbench-") as tmp:
        tmp = Path(tmp)
        for name in args.models:
            src = ROOT / "models" / f"{name}.onnx"
            data = calib_dir(name, tmp / name)
            held = load_batches(calib_dir(name, tmp / f"{name}_held", 4)) if name not in TRAINED else \
                load_batches(tasks.write_calibration(name, tmp / f"{name}_held", 4, 8, offset=800))
            entry = {"float": {"task": tasks.METRICS[name](session(str(src)))} if name in tasks.METRICS else {}}
            for tool in ("onnxopt", "ort-default", "ort-tuned"):
                out = tmp / f"{name}.{tool}.onnx"
                t0 = time.perf_counter()
                try:
                    if tool == "onnxopt":
                        run_onnxopt(src, out, data)
                    else:
                        run_ort(src, out, data, tuned=tool == "ort-tuned")
                    row = {"ok": True, "seconds": time.perf_counter() - t0, **evaluate(name, src, out, held)}
                except Exception as e:  # noqa: BLE001 - a peer's failure is a result
                    row = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"}
                entry[tool] = row
                show = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                print(f"{name:20s} {tool:12s} {show}", flush=True)
            results["models"][name] = entry
        if not args.no_rss and (ROOT / "models" / "digits_resnet.onnx").exists():
            rss = {}
            for tool in ("onnxopt", "ort-entropy"):
                for n in (16, 64):
                    data = tasks.write_calibration("digits_resnet", tmp / f"rss{n}", n, 8)
                    try:
                        rss[f"{tool}_{n}"] = peak_rss(tool, ROOT / "models" / "digits_resnet.onnx", data, tmp / "rss.onnx")
                    except Exception as e:  # noqa: BLE001
                        rss[f"{tool}_{n}"] = f"failed: {e}"
                    print(f"calibration peak RSS {tool} {n} batches: {rss[f'{tool}_{n}']}", flush=True)
            results["calibration_peak_rss_mb"] = rss
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

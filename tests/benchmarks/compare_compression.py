"""onnxopt prune / compress on the trained models: accuracy, latency and size per technique, side by side.

    python tests/benchmarks/compare_compression.py [--models digits_resnet ...] [--out bench-results/compression.json]

Not a timed test.  Per model (``models/``, data from ``models/data``).  The budgeted runs' ``--metric``
is a validation split (``models.tasks:digits_val_accuracy`` / ``text_val_exact_match``: neither the
eval split nor the calibration batches), so no choice is made on the data the table reports; the
table's ``accuracy`` is the eval split (``models.tasks.METRICS``), ``val_accuracy`` the validation split:

- structured pruning, 30% of each group's channels (``digits_resnet``, ``digits_mobilenet``,
  ``text_crnn``): ``refit/activation`` (the command: budget 1 point, latency guard on), ``refit/l1``
  (magnitude-only criterion, same budget and guard), and, every group removed without budget or
  guard, ``all/refit`` vs ``all/plain`` (the same removal with and without the least-squares refit);
- magnitude pruning 50% global (``digits_cnn``), with and without refit (no budget);
- clustering to 16 values + 50% pruning + Huffman (``digits_cnn``): the Deep Compression ratio; once
  more on the model converted to opset 21, where the file stores the cluster indices as uint4.

Latency: CPU EP, 1 thread, the original and every variant of a model run interleaved in one
process (100 rounds, order reversed every other round): median ms, and speed-up = the median of
the per-round ratios original / variant (robust to load from other processes).  Size: the ONNX file's bytes (and the
Deep Compression storage for ``compress``).  Wall time of each command.  The CPU (model, SIMD flags)
is printed first.  Nothing is written unless ``--out PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import tasks  # noqa: E402
from onnxopt import api, runtime  # noqa: E402
from onnxopt import benchmark as bench  # noqa: E402
from onnxopt.errors import ValidationRefused  # noqa: E402

STRUCTURED = ["digits_resnet", "digits_mobilenet", "text_crnn"]
METRIC = {name: f"models.tasks:{fn.__name__}" for name, fn in tasks.VAL_METRICS.items()}  # budget: validation split


def latency(paths: list[Path], feeds: dict, rounds: int = 100) -> tuple[list[float], list[float]]:
    """Median ms per model and the median of the per-round ratios original / model (rounds run
    every model once, order reversed every other round, so load from other processes hits all)."""
    sessions = [runtime.session(str(p), "cpu", 1) for p in paths]
    for s in sessions:
        for _ in range(5):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            times[i].append(bench.timed_run(sessions[i], feeds))
    t = np.asarray(times)
    return [float(np.median(x)) for x in t], [float(np.median(t[0] / x)) for x in t]


def run(label: str, fn, **kwargs) -> dict:
    t0 = time.perf_counter()
    try:
        report = fn(**kwargs)
    except ValidationRefused as e:
        report = e.result or {}
    return {"label": label, "seconds": time.perf_counter() - t0, "report": report}


def variants(name: str, src: Path, data: Path, tmp: Path) -> list[dict]:
    common = {"data": data, "metric": METRIC[name], "input_path": src}
    out = []
    if name in STRUCTURED:
        specs = [("refit/activation", {"max_drop": 0.01}), ("refit/l1", {"max_drop": 0.01, "criterion": "l1"}),
                 ("all/refit", {"max_drop": 1.0, "latency_guard": False}),
                 ("all/plain", {"max_drop": 1.0, "latency_guard": False, "refit": False}),
                 ("all/plain-l1", {"max_drop": 1.0, "latency_guard": False, "refit": False, "criterion": "l1"})]
        for label, kw in specs:
            path = tmp / f"{name}.{label.replace('/', '_')}.onnx"
            out.append({**run(f"channels 0.3 {label}", api.prune, output_path=path, channels=0.3, **common, **kw),
                        "path": path})
    if name == "digits_cnn":
        for label, kw in [("refit", {}), ("plain", {"refit": False})]:
            path = tmp / f"{name}.mag_{label}.onnx"
            out.append({**run(f"magnitude 0.5 global {label}", api.prune, output_path=path, sparsity=0.5, max_drop=1.0,
                              **common, **kw), "path": path})
        path = tmp / f"{name}.compress.onnx"
        out.append({**run("cluster 16 + 50% + Huffman", api.compress, output_path=path, clusters=16, sparsity=0.5,
                          max_drop=0.01, **common), "path": path})
        src21 = tmp / f"{name}.opset21.onnx"  # the same model at opset 21: uint4 cluster indices in the file
        m21 = onnx.version_converter.convert_version(onnx.load(str(src)), 21)
        m21.ir_version = max(m21.ir_version, 10)
        onnx.save(m21, str(src21))
        path = tmp / f"{name}.compress21.onnx"
        out.append({**run("cluster 16 + 50% + Huffman, opset 21", api.compress, output_path=path, clusters=16,
                          sparsity=0.5, max_drop=0.01, **{**common, "input_path": src21}), "path": path})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["digits_cnn", *STRUCTURED])
    p.add_argument("--out", type=Path, default=None, help="write the JSON here; default: print only")
    args = p.parse_args(argv)
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    results: dict = {"machine": {k: v for k, v in info.items() if k != "flags"}, "budget_metric": METRIC,
                     "accuracy": "eval split (models.tasks.METRICS); val_accuracy: the budget's validation split",
                     "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxopt-cbench-") as tmp_name:
        tmp = Path(tmp_name)
        warm = tasks.write_calibration("digits_cnn", tmp / "warm", 4, 8)  # imports and first sessions, not timed
        api.prune(ROOT / "models" / "digits_cnn.onnx", tmp / "warm.onnx", sparsity=0.1, data=warm, max_drop=1.0)
        for name in args.models:
            src = ROOT / "models" / f"{name}.onnx"
            data = tasks.write_calibration(name, tmp / name, 16, 8)
            vs = [v for v in variants(name, src, data, tmp) if v["path"].exists()]
            feeds = dict(np.load(next(iter(sorted(data.glob("*.npz"))))))
            times, speedups = latency([src, *[v["path"] for v in vs]], feeds)
            metric, val_metric = tasks.METRICS[name], tasks.VAL_METRICS[name]
            base_sess = runtime.session(str(src), "cpu", 1)
            base, base_val = metric(base_sess), val_metric(base_sess)
            rows = [{"technique": "fp32 original", "accuracy": base, "val_accuracy": base_val, "latency_ms": times[0],
                     "speedup": 1.0, "file_bytes": src.stat().st_size, "seconds": 0.0}]
            for v, t, speedup in zip(vs, times[1:], speedups[1:]):
                rep = v["report"]
                sess = runtime.session(str(v["path"]), "cpu", 1)
                row = {"technique": v["label"], "accuracy": metric(sess), "val_accuracy": val_metric(sess),
                       "latency_ms": t, "speedup": speedup, "file_bytes": v["path"].stat().st_size,
                       "seconds": v["seconds"], "written": rep.get("written")}
                if rep.get("deep_compression"):
                    row["deep_compression"] = rep["deep_compression"]
                if rep.get("conv_channels"):
                    row["conv_channels"] = sum(rep["conv_channels"]["after"].values())
                    row["groups_kept"] = [g["group"] for g in rep["groups"] if g.get("accepted")]
                rows.append(row)
            for row in rows:
                row["drop_points"] = 100 * (base - row["accuracy"])
                row["val_drop_points"] = 100 * (base_val - row["val_accuracy"])
                extra = f", Deep Compression {row['deep_compression'][-1]['compression_ratio']:.2f}x" \
                    if row.get("deep_compression") else ""
                print(f"{name:17s} {row['technique']:34s} acc {row['accuracy']:.4f} (drop {row['drop_points']:5.2f} pt, val "
                      f"{row['val_drop_points']:5.2f} pt) "
                      f"{row['latency_ms']:7.3f} ms {row['speedup']:5.2f}x {row['file_bytes']:>8d} B "
                      f"{row['seconds']:6.1f} s{extra}", flush=True)
            results["models"][name] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

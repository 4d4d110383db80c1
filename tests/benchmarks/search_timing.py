"""Wall time of ``onnxopt quantize --search`` built in this process, on a local pool of 2
processes and as Ray tasks on a local cluster, on the trained digits ResNet and the text
recognizer (task metrics from models/tasks.py), in one run; checks that every mode finds the same
candidates (labels, scores, bytes) and prints the Pareto front.

    python tests/benchmarks/search_timing.py [--budget 12] [--skip-ray] [--out search_timing.json]

Calibration data: models/data/<name>_calib.npz (8 batches of 8).  Prints the CPU and its flags.
Latency numbers inside a search come from its own round-robin measurement (one process, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import tasks
from onnxopt import __version__, api
from onnxopt import benchmark as bench

MODELS = {"digits_resnet": "models.tasks:digits_accuracy", "text_crnn": "models.tasks:text_exact_match"}


def _summary(report: dict) -> list:
    return [(c["label"], c["accuracy"], c["bytes"]) for c in report["search"]["candidates"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    args = ap.parse_args()
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    result: dict = {"onnxopt": __version__, "machine": info, "budget": args.budget, "models": {}}
    modes = [("in-process", {"workers": 1}), ("pool-2", {"workers": 2})]
    if not args.skip_ray:
        try:
            import ray  # noqa: F401

            modes.append(("ray-local-2", {"workers": 2, "ray_address": "local"}))
        except ImportError:
            print("ray not installed: skipping the Ray mode")
    with tempfile.TemporaryDirectory(prefix="onnxopt-search-timing-") as tmp:
        for name, metric in MODELS.items():
            data = tasks.write_calibration(name, Path(tmp) / name, batches=8, batch_size=8)
            rows, summaries = {}, {}
            for mode, kw in modes:
                t0 = time.perf_counter()
                rep = api.quantize(ROOT / "models" / f"{name}.onnx", Path(tmp) / f"{name}-{mode}.onnx", data=data,
                                   metric=metric, search=True, budget=args.budget, **kw)
                s = rep["search"]
                chosen = s["candidates"][s["chosen"]]
                rows[mode] = {"wall_seconds": round(time.perf_counter() - t0, 2), "search_seconds": round(s["seconds"], 2),
                              "discarded_builds": s["discarded_builds"], "chosen": chosen["label"],
                              "front": [(c["label"], round(c["accuracy"], 4), round(c["latency_ms"], 3), c["bytes"])
                                        for c in s["candidates"] if c["on_front"]]}
                summaries[mode] = _summary(rep)
                print(f"{name} {mode}: search {rows[mode]['search_seconds']} s (command {rows[mode]['wall_seconds']} s), "
                      f"chosen {chosen['label']} ({chosen['latency_ms']:.3f} ms, acc {chosen['accuracy']:.4f})")
            same = all(v == summaries["in-process"] for v in summaries.values())
            base = rows["in-process"]["search_seconds"]
            ratios = {m: round(r["search_seconds"] / base, 2) for m, r in rows.items()}
            print(f"{name}: same candidates in every mode: {same}; search time / in-process: {ratios}")
            print(f"{name}: Pareto front (label, accuracy, ms, bytes): {rows['in-process']['front']}")
            result["models"][name] = {"modes": rows, "same_candidates": same, "ratio_to_in_process": ratios}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

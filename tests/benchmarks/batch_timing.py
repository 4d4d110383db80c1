"""Wall time of ``onnxopt batch --command optimize`` over every models/*.onnx: sequential
(workers=1), the local process pool (workers=2) and Ray (a local cluster, num_cpus=2), in one
process, each into a fresh output folder (nothing reused).

    python tests/benchmarks/batch_timing.py [--workers 2] [--skip-ray] [--out batch_timing.json]

Prints the CPU, the three wall times, the ratios to sequential, and the sum of per-model seconds
(each model's process, start-up included).  Ray's time includes starting and stopping the local
cluster (``ray.init``/``ray.shutdown``), reported separately as ``ray_init_seconds`` measured on its own;
``ray_joined`` is the batch on a cluster this process started beforehand (``ray.init(num_cpus=2)``, as a
test or a long-lived driver does), so it excludes the start-up.  Ratios to the pool are ``ray_vs_pool``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from onnxopt import __version__, api
from onnxopt import benchmark as bench


def timed(models: list[str], **kwargs) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxopt-batch-timing-") as out:
        t0 = time.perf_counter()
        summary = api.batch(models, out, command="optimize", **kwargs)
        wall = time.perf_counter() - t0
    counts = {k: v for k, v in summary["totals"].items() if k not in ("models", "seconds_run")}
    return {"wall_seconds": round(wall, 2), "model_seconds_sum": summary["totals"]["seconds_run"], "statuses": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    args = ap.parse_args()
    models = sorted(str(p) for p in (ROOT / "models").glob("*.onnx"))
    info = bench.machine()
    result = {"onnxopt": __version__, "machine": info, "cpus": os.cpu_count(), "models": len(models),
              "workers": args.workers}
    print(f"{bench.machine_line(info)}; {len(models)} models, onnxopt {__version__}")
    result["sequential"] = timed(models, workers=1)
    print(f"sequential (workers=1):  {result['sequential']}")
    result["pool"] = timed(models, workers=args.workers)
    print(f"pool (workers={args.workers}):        {result['pool']}")
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and not args.skip_ray:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.shutdown()
        result["ray_init_seconds"] = round(time.perf_counter() - t0, 2)
        result["ray"] = timed(models, workers=args.workers, ray_address="local")
        print(f"ray (num_cpus={args.workers}):       {result['ray']} (init+shutdown alone {result['ray_init_seconds']} s)")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            result["ray_joined"] = timed(models, workers=args.workers, ray_address="local")
        finally:
            ray.shutdown()
        print(f"ray, cluster already up:  {result['ray_joined']}")
    seq = result["sequential"]["wall_seconds"]
    result["ratios"] = {k: round(seq / result[k]["wall_seconds"], 2) for k in ("pool", "ray", "ray_joined") if k in result}
    print("speed-up over sequential: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
    pool = result["pool"]["wall_seconds"]
    result["ray_vs_pool"] = {k: round(result[k]["wall_seconds"] / pool, 2) for k in ("ray", "ray_joined") if k in result}
    if result["ray_vs_pool"]:
        print("wall time / pool's: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ray_vs_pool"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Quantize wall time: onnxopt quantize (static, static without the latency guard, --mode dynamic) vs
NNCF's ``nncf.quantize`` (ONNX backend, its defaults: preset performance), same models and calibration data.

    python tests/benchmarks/compare_nncf.py [--batches 16] [--size tiny|small] [--models bert_ts gpt2_ts gpt2_dynamo digits_resnet]
        [--out bench-results/nncf_wall_time.json]

Not a timed test; needs ``pip install -e .[bench]`` (nncf).  Models: the committed tiny transformer
exports (``models/{bert,gpt2}_{ts,dynamo}.onnx``, inputs from ``models.transformers.feeds`` seeds 0..,
batch 2, seq 16, past 8) and ``models/digits_resnet.onnx`` (batches of 8 from
``models/data/digits_calib.npz`` via ``models.tasks.write_calibration``); ``--size small``: the
transformers rebuilt at hidden 256, 4 layers, vocab 8,192 as ``compare_transformer_quant.py`` does.  Every tool gets the same
``--batches`` batches: ours as a ``--data`` folder of ``.npz``, NNCF as an ``nncf.Dataset`` of the same
feed dicts (``subset_size`` = that many).  Timed: the whole call, from the fp32 file to the written
quantized file (NNCF: load + ``nncf.quantize`` + save; ours: ``api.quantize``, which also validates
and writes reports), after an untimed warm-up of every tool on the first model with 2 batches
(lazy imports, first-call setup).  ``onnxopt-static-bc-noguard`` is our static mode doing what NNCF's
default does (min/max ranges + bias correction; no latency guard, no adaround).  The region cache of
the latency guard's cost model starts empty after the warm-up: ``onnxopt-static`` is the first run on
this machine (regions measured), ``onnxopt-static-cached`` the same command again (regions read from
the cache), ``onnxopt-static-nocostmodel`` the guard measuring every decision in the whole model.  Printed side by side
per model with the ratio ours / NNCF (the issue's target: <= 3x) and the mean cosine of the first
output vs fp32 on 4 batches the tools did not see.  The CPU (model, SIMD flags) is printed first.  JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import tasks
from models import transformers as mt
from onnxopt import benchmark as bench
from onnxopt import data, runtime
from tests.benchmarks.compare_transformer_quant import ours

MODELS = ("bert_ts", "gpt2_ts", "gpt2_dynamo", "digits_resnet")
SHAPE = {"batch": 2, "seq": 16, "past": 8}


def calibration(name: str, folder: Path, count: int, seed0: int = 0) -> Path:
    """``count`` .npz batches for ``name`` in ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if name.startswith("digits"):
        return tasks.write_calibration(name, folder, batches=count, batch_size=8, offset=seed0 * 8)
    folder.mkdir(parents=True, exist_ok=True)
    arch = name.rsplit("_", 1)[0]
    for i in range(count):
        np.savez(folder / f"b{i:03d}.npz", **mt.feeds(arch, seed=seed0 + i, **SHAPE))
    return folder


def feed_dicts(src: Path, folder: Path) -> list[dict]:
    sess = runtime.session(str(src), "cpu", 1, optimize=False)
    return list(data.batches(folder, sess, None, None))


def nncf_quantize(src: Path, out: Path, feeds: list[dict]) -> str:
    import nncf
    import onnx

    model = onnx.load(str(src))
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(quantized, str(out))
    return ""


TOOLS = {
    "nncf": lambda src, out, folder, feeds: nncf_quantize(src, out, feeds),
    # the latency guard's cost model times each layer alone once per machine (onnxopt.quantization.latency_cache):
    # the first run on a model measures its regions (cold), a second one reads them from the cache
    "onnxopt-static": lambda src, out, folder, feeds: ours(src, out, folder),
    "onnxopt-static-cached": lambda src, out, folder, feeds: ours(src, out, folder),
    "onnxopt-static-nocostmodel": lambda src, out, folder, feeds: ours(src, out, folder, cost_model=False),
    "onnxopt-static-noguard": lambda src, out, folder, feeds: ours(src, out, folder, latency_guard=False),
    # NNCF's default does min/max + fast bias correction: the same work without our guard and rounding
    "onnxopt-static-bc-noguard": lambda src, out, folder, feeds: ours(src, out, folder, latency_guard=False,
                                                                      recovery=["bias-correction"]),
    "onnxopt-dynamic": lambda src, out, folder, feeds: ours(src, out, folder, mode="dynamic"),
}


def cosine(src: Path, out: Path, evaluation: list[dict]) -> float:
    ref, got = runtime.session(str(src), "cpu", 1), runtime.session(str(out), "cpu", 1)
    first = ref.get_outputs()[0].name
    cos = []
    for feeds in evaluation:
        a = ref.run([first], feeds)[0].reshape(-1).astype(np.float64)
        b = got.run([first], feeds)[0].reshape(-1).astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return float(np.mean(cos))


def run_model(name: str, tmp: Path, count: int, quiet: bool = False, src: Path | None = None) -> dict:
    src = src or ROOT / "models" / f"{name}.onnx"
    folder = calibration(name, tmp / f"{name}_calib", count)
    feeds = feed_dicts(src, folder)
    evaluation = feed_dicts(src, calibration(name, tmp / f"{name}_eval", 4, seed0=1000))
    entry: dict = {"batches": len(feeds), "tools": {}}
    for tool, fn in TOOLS.items():
        out = tmp / f"{name}.{tool}.onnx"
        t0 = time.perf_counter()
        try:
            note = fn(src, out, folder, feeds) or ""
        except Exception as e:  # noqa: BLE001 - a tool failing is a result
            entry["tools"][tool] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if not quiet:
                print(f"{name:14s} {tool:26s} failed: {entry['tools'][tool]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        result = {"seconds": seconds, "note": note}
        if out.exists():
            result["cosine"] = cosine(src, out, evaluation)
        entry["tools"][tool] = result
    base = entry["tools"].get("nncf", {}).get("seconds")
    for tool, r in entry["tools"].items():
        if "seconds" not in r or quiet:
            continue
        r["ratio_to_nncf"] = r["seconds"] / base if base else None
        ratio = f"{r['ratio_to_nncf']:5.2f}x nncf" if base else "   -      "
        cos = f"cosine {r['cosine']:.5f}" if "cosine" in r else "not written"
        print(f"{name:14s} {tool:26s} {r['seconds']:7.2f} s  {ratio}  {cos}  {r['note']}", flush=True)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--size", choices=("tiny", "small"), default="tiny")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here; default: print only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    for name in ("nncf", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import nncf

    info = bench.machine()
    print(bench.machine_line(info) + f"; nncf {nncf.__version__}", flush=True)
    results: dict = {"machine": {k: v for k, v in info.items() if k != "flags"}, "nncf": nncf.__version__,
                     "batches": args.batches, "size": args.size, "shape": SHAPE, "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxopt-nncfbench-") as tmp_text:
        # warm-up, untimed: every tool once on the first model (lazy imports, ORT/NNCF first-call setup);
        # then an empty region cache, so "onnxopt-static" is the first run on this machine
        os.environ["ONNXOPT_CACHE_DIR"] = str(Path(tmp_text) / "cache-warmup")
        run_model(args.models[0], Path(tmp_text) / "warmup", 2, quiet=True)
        os.environ["ONNXOPT_CACHE_DIR"] = str(Path(tmp_text) / "cache")
        srcs: dict[str, Path] = {}
        if args.size == "small":
            sys.path.insert(0, str(Path(__file__).parent))
            import compare_transformer_quant as ctq

            srcs = ctq.build_small([m for m in args.models if not m.startswith("digits")], Path(tmp_text))
        for name in args.models:
            results["models"][name] = run_model(name, Path(tmp_text), args.batches, src=srcs.get(name))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

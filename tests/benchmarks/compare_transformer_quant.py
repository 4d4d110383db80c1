"""onnxopt quantize --mode dynamic / --weights int4 vs ORT's quantize_dynamic and MatMulNBitsQuantizer, one run.

    python tests/benchmarks/compare_transformer_quant.py [--size tiny|small] [--models gpt2_ts bert_ts ...]
        [--runs 60] [--tools ort-dynamic onnxopt-dynamic-0.1 ...] [--out bench-results/transformer_quant.json]

Not a timed test.  Models: ``models/transformers.py`` exports (TorchScript ``_ts`` / dynamo ``_dynamo``);
``--size tiny`` uses the committed files (hidden 64, vocab 1,000), ``--size small`` (default) builds
the same architectures at hidden 256, 4 layers, 4 heads, inner 1,024, vocab 8,192 into a temporary
folder (needs ``pip install -e .[models]``; ~10 s per model) so latencies are not all overhead.
Tools, each from the same fp32 file:

- ``ort-dynamic``: ``quant_pre_process`` then ``quantize_dynamic(per_channel=True)`` (its defaults otherwise:
  QInt8 weights, embeddings (Gather) included in its op types); where ``quant_pre_process`` fails (its
  symbolic shape inference on the BERT export), ``quantize_dynamic`` on the file as is;
- ``onnxopt-dynamic``: ``onnxopt quantize --mode dynamic --data DIR`` (defaults: budget 0.01, latency guard on);
- ``onnxopt-dynamic-0.1``: the same with ``--max-drop 0.1`` (a budget ORT's result would pass);
- ``ort-int4``: ``MatMulNBitsQuantizer(block_size=32)`` (RTN, its default asymmetric) on the file as is
  (it reaches MatMul only, not the Gemm of TorchScript exports);
- ``ort-int4-all``: the same on the file after our default pipeline and ``gemm-to-matmul`` (every weight
  matmul reached, as in our prepare step; embeddings stay float);
- ``onnxopt-int4-eq``: ours at that coverage (``--embeddings none --head-bits 4``, GPTQ): the rounding
  comparison at equal coverage;
- ``onnxopt-int4-rtn`` / ``onnxopt-int4-gptq``: ``--weights int4 --block-size 32 --rounding rtn|gptq``
  with ``--max-drop 1`` (int4 is for size: every weight matmul int4, the output head 8-bit, embeddings
  int4; the fidelity is what is compared).

Measured per tool: file size ratio vs fp32; fidelity vs fp32 on 16 evaluation batches (seeds 1000+, not
the calibration data): top-1 agreement at every position of ``logits`` (GPT-2) and the mean cosine of
the first output; latency ratio vs fp32 (CPU EP, 1 thread, median of interleaved runs, every model of
one architecture in one process, same feeds); quantize wall time.  The CPU (model, SIMD flags) is printed
first.  JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
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

from models import transformers as mt
from onnxopt import api, runtime
from onnxopt import benchmark as bench
from onnxopt.errors import ValidationRefused

SMALL = {"HIDDEN": 256, "LAYERS": 4, "HEADS": 4, "INNER": 1024, "VOCAB": 8192, "HEAD_DIM": 64}
SHAPE = {"batch": 2, "seq": 32, "past": 16}


def build_small(names: list[str], folder: Path) -> dict[str, Path]:
    for key, value in SMALL.items():
        setattr(mt, key, value)
    out = {}
    for name in names:
        path = folder / f"{name}.onnx"
        if not path.exists():
            mt.build(name, folder)
        out[name] = path
    return out


def write_batches(arch: str, folder: Path, count: int, seed0: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        np.savez(folder / f"b{i:03d}.npz", **mt.feeds(arch, seed=seed0 + i, **SHAPE))
    return folder


def ort_dynamic(src: Path, out: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    try:
        with contextlib.chdir(out.parent):  # it writes temporary files into the current directory
            quant_pre_process(str(src), str(pre))
    except Exception as e:  # noqa: BLE001 - its symbolic shape inference fails on some exports
        logging.getLogger("bench").warning("quant_pre_process failed (%s): quantize_dynamic on the file as is", e)
        pre = src
    quantize_dynamic(str(pre), str(out), per_channel=True)


def ort_int4(src: Path, out: Path, all_gemms: bool = False) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    model = onnx.load(str(src))
    if all_gemms:
        import onnx_ir as ir

        from onnxopt import pipeline
        from onnxopt.passes.gemm_to_matmul import GemmToMatMul

        converted = ir.from_proto(model)
        converted = pipeline.run(converted, pipeline.parse(pipeline.DEFAULT_PIPELINE)).model  # as our prepare does
        GemmToMatMul()(converted)
        model = ir.to_proto(pipeline.run(converted, pipeline.parse("cleanup")).model)  # drops the Gemms' weights
    q = MatMulNBitsQuantizer(model, block_size=32)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


def ours(src: Path, out: Path, data: Path, **settings) -> str:
    try:
        report = api.quantize(src, out, data=data, **settings)
    except ValidationRefused as e:
        return f"refused: {str(e).splitlines()[0]}"
    r = report["recipe"]
    return f"{r['quantized_layers']} layers quantized, {len(r['float_layers'])} float" + (
        ", wrote the float model" if report["wrote_float_model"] else "")


TOOLS = {
    "ort-dynamic": lambda src, out, data: ort_dynamic(src, out),
    "onnxopt-dynamic": lambda src, out, data: ours(src, out, data, mode="dynamic"),
    "onnxopt-dynamic-0.1": lambda src, out, data: ours(src, out, data, mode="dynamic", max_drop=0.1),
    "ort-int4": lambda src, out, data: ort_int4(src, out),
    "ort-int4-all": lambda src, out, data: ort_int4(src, out, all_gemms=True),
    "onnxopt-int4-rtn": lambda src, out, data: ours(src, out, data, weights="int4", block_size=32, rounding="rtn", max_drop=1.0),
    "onnxopt-int4-gptq": lambda src, out, data: ours(src, out, data, weights="int4", block_size=32, rounding="gptq", max_drop=1.0),
    "onnxopt-int4-eq": lambda src, out, data: ours(src, out, data, weights="int4", block_size=32, rounding="gptq", max_drop=1.0,
                                                   embeddings="none", head_bits=4),
}


def fidelity(ref_sess, sess, batches: list[dict]) -> dict:
    first = ref_sess.get_outputs()[0].name
    agree, total, cos = 0, 0, []
    for feeds in batches:
        ref = ref_sess.run([first], feeds)[0]
        got = sess.run([first], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
        if first == "logits":
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += ref.argmax(-1).size
        a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1]).astype(np.float64)
        cos.append(float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30))))
    return {"top1_agreement": agree / total if total else None, "cosine": float(np.mean(cos))}


def latencies(paths: list[Path], feeds: dict, runs: int) -> list[float]:
    sessions = [runtime.session(str(p), "cpu", 1) for p in paths]
    inputs = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
    for s, f in zip(sessions, inputs):
        for _ in range(5):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            times[k].append(bench.timed_run(sessions[k], inputs[k]))
    return [float(np.median(t)) for t in times]


def run_model(name: str, src: Path, tmp: Path, runs: int, tools=()) -> dict:
    arch = name.rsplit("_", 1)[0]
    data = write_batches(arch, tmp / f"{name}_calib", 80, 0)
    evaluation = [mt.feeds(arch, seed=1000 + i, batch=2, seq=32, past=16) for i in range(16)]
    ref = runtime.session(str(src), "cpu", 1)
    entry: dict = {"fp32_bytes": src.stat().st_size, "tools": {}}
    paths = {"fp32": src}
    for tool, fn in TOOLS.items():
        if tools and tool not in tools:
            continue
        out = tmp / f"{name}.{tool}.onnx"
        t0 = time.perf_counter()
        try:
            note = fn(src, out, data) or ""
        except Exception as e:  # noqa: BLE001 - a peer failing is a result
            entry["tools"][tool] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{name:12s} {tool:18s} failed: {entry['tools'][tool]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        if not out.exists():
            entry["tools"][tool] = {"error": note}
            print(f"{name:12s} {tool:18s} {note}", flush=True)
            continue
        paths[tool] = out
        entry["tools"][tool] = {"seconds": seconds, "note": note, "size_ratio": out.stat().st_size / src.stat().st_size,
                                **fidelity(ref, runtime.session(str(out), "cpu", 1), evaluation)}
    names = list(paths)
    ms = latencies([paths[n] for n in names], evaluation[0] | mt.feeds(arch, seed=7, **SHAPE), runs)
    entry["fp32_ms"] = ms[0]
    for n, t in zip(names[1:], ms[1:]):
        entry["tools"][n]["latency_ratio"] = t / ms[0]
        e = entry["tools"][n]
        top1 = f"{e['top1_agreement']:.4f}" if e["top1_agreement"] is not None else "   -  "
        print(f"{name:12s} {n:18s} size {e['size_ratio']:.3f}x  latency {e['latency_ratio']:.3f}x  top-1 {top1}  "
              f"cosine {e['cosine']:.5f}  {e['seconds']:6.1f} s  {e['note']}", flush=True)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--models", nargs="*", default=["gpt2_ts", "gpt2_dynamo", "bert_ts"])
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--tools", nargs="*", choices=list(TOOLS), default=[], help="a subset of the tools (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here; default: print only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    results: dict = {"machine": {k: v for k, v in info.items() if k != "flags"}, "size": args.size, "shape": SHAPE,
                     "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxopt-tqbench-") as tmp_text:
        tmp = Path(tmp_text)
        if args.size == "small":
            srcs = build_small(args.models, tmp)
        else:
            srcs = {n: ROOT / "models" / f"{n}.onnx" for n in args.models}
        for name in args.models:
            results["models"][name] = run_model(name, srcs[name], tmp, args.runs, args.tools)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""Int8 placements on ORT's OpenVINO EP and CPU EP: onnxopt quantize --ep openvino / --ep cpu vs NNCF vs
ORT quantize_static, side by side.

    /work/venv/bin/python tests/benchmarks/compare_openvino.py [--models digits_cnn ...] [--runs 200]
        [--ov-python /work/venv-ov/bin/python] [--out docs/openvino_placement.json]

Not a timed test.  One command, run with the main virtualenv's python (plain onnxruntime, CPU EP): it
prepares the data and the CPU-side variants, then runs itself with ``--part openvino --workdir DIR``
under ``--ov-python`` (onnxruntime-openvino, nncf), which makes the OpenVINO-side variants and measures
them on the OpenVINO EP, then measures every variant on the CPU EP in the main process.  CPU-EP numbers
never come from the OpenVINO virtualenv (its ORT 1.24.1 CPU EP computes int8 QLinearMatMul wrongly on
some CPUs).  Variants per model, all from the same calibration batches (16 x 8 from
``models.tasks.write_calibration``; ``cnn_bn_depthwise`` has a fixed batch of 1 and no task: 16
synthesized batches, ``write_random_calibration``):

- ``fp32``: the model as committed;
- ``onnxopt-openvino``: ``onnxopt quantize M -o OUT --data DIR --ep openvino --report R.json`` (the OV venv's
  ``onnxopt``, so its latency guard measures on OpenVINO);
- ``onnxopt-cpu``: the same with ``--ep cpu`` (main venv's ``onnxopt``); both with a fresh ``ONNXOPT_CACHE_DIR``;
- ``nncf``: ``nncf.quantize(model, nncf.Dataset(batches))``, ONNX backend, defaults (OV venv);
- ``ort-qdq``: ``quantize_static`` with its defaults: QDQ, per-tensor, MinMax, QUInt8 activations, QInt8 weights.

Per variant: int8 layers by kind (an op is int8 when every input, a Conv/Gemm bias aside, is made by a
DequantizeLinear; ``depthwise`` is a Conv with group > 1 and one input channel per group), the task
metric (``models.tasks.METRICS``) on each EP and the mean cosine of the first output vs fp32 on the same
EP (8 held-out batches), latency on each EP (one thread: ``intra_op_num_threads=1``, OpenVINO
``num_of_threads=1``, ``device_type=CPU``; median of ``--runs`` interleaved rounds over all variants of a
model, ``onnxopt.benchmark.round_robin``) and the speed-up vs fp32 on the same EP.  The CPU line is
printed first.  ``--out X.json`` writes the JSON and ``X.md`` (a table, one row per model x variant).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models import tasks
from onnxopt import benchmark as bench
from onnxopt import runtime
from tests.benchmarks.compare_nncf import nncf_quantize
from tests.benchmarks.compare_quantization import load_batches, run_ort

MODELS = ("digits_cnn", "digits_mobilenet", "text_crnn", "cnn_bn_depthwise")
VARIANTS = ("fp32", "onnxopt-openvino", "onnxopt-cpu", "nncf", "ort-qdq")
OV_SIDE = ("onnxopt-openvino", "nncf")  # made in the OpenVINO virtualenv
KINDS = ("conv", "depthwise", "matmul/gemm", "pool", "add/mul", "concat")
KIND_OF = {"MatMul": "matmul/gemm", "Gemm": "matmul/gemm", "MaxPool": "pool", "AveragePool": "pool",
           "GlobalAveragePool": "pool", "GlobalMaxPool": "pool", "Add": "add/mul", "Mul": "add/mul", "Concat": "concat"}
HELD_OUT = 8
VENV_BIN = Path(sys.executable).parent


def first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return (f"{type(e).__name__}: " if isinstance(e, BaseException) else "") + (text.splitlines()[0][:300] if text else "")


# ---------------------------------------------------------------------------------------------- data
def prepare(name: str, work: Path, batches: int) -> None:
    """work/NAME/calib (the calibration batches every tool gets) and work/NAME/held (HELD_OUT batches no tool saw)."""
    src = ROOT / "models" / f"{name}.onnx"
    if name in tasks.METRICS:
        tasks.write_calibration(name, work / name / "calib", batches, 8)
        tasks.write_calibration(name, work / name / "held", HELD_OUT, 8, offset=800)
        return
    tasks.write_random_calibration(src, work / name / "calib", batches)  # seeds 0..batches-1
    held = work / name / "held"
    held.mkdir(parents=True, exist_ok=True)
    sess = runtime.session(str(src), "cpu", 1)
    for b in range(HELD_OUT):
        np.savez(held / f"batch_{b:04d}.npz", **runtime.synthesize(sess, None, seed=1000 + b, quiet=True))


# ---------------------------------------------------------------------------------------------- variants
def onnxopt_quantize(exe: Path, src: Path, out: Path, calib: Path, ep: str, work: Path) -> dict:
    report = out.with_suffix(".report.json")
    env = dict(os.environ, ONNXOPT_CACHE_DIR=str(work / f"cache-{ep}"))
    r = subprocess.run([str(exe), "quantize", str(src), "-o", str(out), "--data", str(calib), "--ep", ep,
                        "--report", str(report)], capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if r.returncode != 0 or not out.exists():
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        raise RuntimeError(next((ln for ln in lines if "rror" in ln), lines[-1] if lines else f"exit {r.returncode}"))
    rep = json.loads(report.read_text())
    return {"stdout": r.stdout.strip().splitlines(), "wrote_float_model": rep.get("wrote_float_model"),
            "latency": rep.get("latency"), "latency_decisions": rep.get("recipe", {}).get("latency_decisions")}


def make_variant(variant: str, name: str, work: Path) -> dict:
    src, calib = ROOT / "models" / f"{name}.onnx", work / name / "calib"
    out = work / name / f"{variant}.onnx"
    t0 = time.perf_counter()
    try:
        info: dict = {}
        if variant == "fp32":
            shutil.copyfile(src, out)
        elif variant.startswith("onnxopt-"):
            ep = variant.split("-", 1)[1]
            info = onnxopt_quantize(VENV_BIN / "onnxopt", src, out, calib, ep, work)
        elif variant == "nncf":
            nncf_quantize(src, out, load_batches(calib))
        else:
            run_ort(src, out, calib, tuned=False)
    except Exception as e:  # noqa: BLE001 - a tool failing is a result
        return {"ok": False, "error": first_line(e)}
    return {"ok": True, "quantize_seconds": round(time.perf_counter() - t0, 2), **info}


# ---------------------------------------------------------------------------------------------- counts
def int8_by_kind(path: Path) -> dict:
    """{kind: [int8, total]} over the graph (main graph; these models have no subgraphs)."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}

    def weight_shape(name: str):
        n = producer.get(name)
        while n is not None and n.op_type in ("DequantizeLinear", "Identity", "Cast"):
            name, n = n.input[0], producer.get(n.input[0])
        if name in inits:
            return tuple(inits[name].dims)
        if n is not None and n.op_type == "Constant":
            return tuple(n.attribute[0].t.dims)
        return None

    counts = {k: [0, 0] for k in KINDS}
    for n in g.node:
        kind = KIND_OF.get(n.op_type)
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w = weight_shape(n.input[1])
            kind = "depthwise" if group > 1 and w is not None and len(w) > 1 and w[1] == 1 else "conv"
        if kind is None:
            continue
        ins = [x for i, x in enumerate(n.input) if x and not (n.op_type in ("Conv", "Gemm") and i == 2)]
        counts[kind][1] += 1
        counts[kind][0] += bool(ins) and all(getattr(producer.get(x), "op_type", "") == "DequantizeLinear" for x in ins)
    return counts


# ---------------------------------------------------------------------------------------------- measuring
def measure(name: str, ep: str, work: Path, variants: list[str], runs: int) -> dict:
    """Per variant on ``ep``: task metric, cosine vs fp32, median latency (interleaved rounds), speed-up vs fp32."""
    held = load_batches(work / name / "held")
    res: dict = {}
    sessions: dict = {}
    for v in variants:
        try:
            sessions[v] = runtime.session(str(work / name / f"{v}.onnx"), ep, threads=1)
            runtime.run(sessions[v], held[0])
        except Exception as e:  # noqa: BLE001
            res[v] = {"error": first_line(e)}
            sessions.pop(v, None)
    ref = sessions.get("fp32")
    for v, s in sessions.items():
        row = res.setdefault(v, {})
        try:
            if name in tasks.METRICS:
                row["task"] = tasks.METRICS[name](s)
            if ref is not None:
                first = s.get_outputs()[0].name
                cos = []
                for feeds in held:
                    a = ref.run([first], feeds)[0].astype(np.float64).ravel()
                    b = s.run([first], feeds)[0].astype(np.float64).ravel()
                    cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
                row["cosine"] = float(np.mean(cos))
        except Exception as e:  # noqa: BLE001
            row["error"] = first_line(e)
    names = [v for v in sessions if "error" not in res[v]]
    for v in names:
        for _ in range(10):
            sessions[v].run(None, held[0])
    times = bench.round_robin([(sessions[v], held[0]) for v in names], runs, float("inf"), rotate=True)
    for v, t in zip(names, times):
        res[v].update(ms=float(np.median(t)), rounds=len(t))
    base = res.get("fp32", {}).get("ms")
    for v in names:
        res[v]["speedup"] = base / res[v]["ms"] if base else None
    if ep == "openvino":
        for v in names:
            res[v]["providers"] = sessions[v].get_providers()
    return res


def part_openvino(work: Path, models: list[str], runs: int) -> int:
    """In the OpenVINO venv: make its variants, then measure every variant on the OpenVINO EP."""
    import nncf
    import onnxruntime as ort

    out: dict = {"onnxruntime": ort.__version__, "nncf": nncf.__version__, "variants": {}, "measure": {}}
    for name in models:
        out["variants"][name] = {v: make_variant(v, name, work) for v in OV_SIDE}
        for v, r in out["variants"][name].items():
            print(f"[openvino venv] {name:18s} {v:17s} {'ok' if r['ok'] else r['error']}", flush=True)
        present = [v for v in VARIANTS if (work / name / f"{v}.onnx").exists()]
        out["measure"][name] = measure(name, "openvino", work, present, runs)
    (work / "openvino.json").write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- output
def fmt_counts(c: dict) -> str:
    short = {"conv": "conv", "depthwise": "dw", "matmul/gemm": "mm", "pool": "pool", "add/mul": "add", "concat": "cat"}
    return " ".join(f"{short[k]} {c[k][0]}/{c[k][1]}" for k in KINDS if c[k][1])


def markdown(results: dict) -> str:
    lines = ["# Int8 placement on ORT's OpenVINO EP and CPU EP", "",
             f"{results['machine_line']}; OpenVINO venv: onnxruntime-openvino {results['openvino']['onnxruntime']}, "
             f"nncf {results['openvino']['nncf']}.  One thread, median of {results['runs']} interleaved rounds; "
             "speed-up = fp32 ms / variant ms on the same EP.  int8 by kind: int8/total "
             "(conv, dw = depthwise, mm = MatMul/Gemm, pool, add = Add/Mul, cat = Concat).  Accuracy: task metric on the "
             "eval split (digits: top-1, text_crnn: exact match), CPU EP / OpenVINO EP; cnn_bn_depthwise: cosine vs fp32.  "
             f"Generated by `tests/benchmarks/compare_openvino.py` in {results['seconds']:.0f} s.", "",
             "| model | variant | int8 by kind | accuracy CPU / OV | OV ms | OV speed-up | CPU ms | CPU speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        for v in VARIANTS:
            r = m[v]
            if not r.get("ok"):
                lines.append(f"| {name} | {v} | failed: {r.get('error', '')} | | | | | |")
                continue
            ov, cpu = r.get("openvino", {}), r.get("cpu", {})

            def acc(x):
                if "error" in x:
                    return "error"
                return f"{x['task']:.4f}" if "task" in x else (f"cos {x['cosine']:.5f}" if "cosine" in x else "-")

            def speed(x):
                return (f"{x['ms']:.3f}", f"{x['speedup']:.2f}x") if "ms" in x else (x.get("error", "-"), "-")

            note = " (float model written)" if r.get("wrote_float_model") else ""
            lines.append(f"| {name} | {v}{note} | {fmt_counts(r['int8'])} | {acc(cpu)} / {acc(ov)} | "
                         f"{' | '.join(speed(ov))} | {' | '.join(speed(cpu))} |")
    return "\n".join(lines + ["", *kind_table(results)]) + "\n"


def kind_table(results: dict) -> list[str]:
    """What each EP runs faster in int8, per layer kind, as onnxopt's latency guard measured it on that EP
    (the whole kind in int8 against it in float, the rest as placed; ratio = int8 time / float time)."""
    lines = ["## Per layer kind, measured on each EP (onnxopt's latency guard)", "",
             "Each row: the kind's layers in int8 against the same model with them in float, the other kinds as "
             "placed, on the EP named (`--ep cpu` by the main virtualenv, `--ep openvino` by the OpenVINO one); "
             "ratio = int8 ms / float ms, verdict as the guard decided (a kind stays int8 only when confidently "
             "faster by the 3% margin; `cost model` rows were decided from cached region timings).", "",
             "| model | kind | layers | CPU EP ratio | CPU verdict | OpenVINO EP ratio | OpenVINO verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        per_ep = {ep: {d["kind"]: d for d in (m.get(f"onnxopt-{ep}", {}).get("latency_decisions") or []) if "kind" in d}
                  for ep in ("cpu", "openvino")}
        for kind in dict.fromkeys([*per_ep["cpu"], *per_ep["openvino"]]):
            cells = []
            for ep in ("cpu", "openvino"):
                d = per_ep[ep].get(kind)
                cells += [f"{d['ratio']:.3f}" if d and d.get("ratio") is not None else "-", d["verdict"] if d else "-"]
            layers = (per_ep["cpu"].get(kind) or per_ep["openvino"].get(kind) or {}).get("layers", "")
            lines.append(f"| {name} | {kind} | {layers} | {' | '.join(cells)} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--ov-python", default="/work/venv-ov/bin/python")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here and the table next to it (.md)")
    p.add_argument("--part", choices=("all", "openvino"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part == "openvino":
        return part_openvino(args.workdir, args.models, args.runs)
    t_start = time.perf_counter()
    info = bench.machine()
    results: dict = {"machine_line": bench.machine_line(info), "machine": {k: v for k, v in info.items() if k != "flags"},
                     "runs": args.runs, "batches": args.batches, "models": {}}
    print(results["machine_line"], flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxopt-ovbench-") as tmp:
        work = Path(tmp)
        for name in args.models:
            prepare(name, work, args.batches)
            results["models"][name] = {v: make_variant(v, name, work) for v in VARIANTS if v not in OV_SIDE}
        r = subprocess.run([args.ov_python, __file__, "--part", "openvino", "--workdir", str(work), "--runs", str(args.runs),
                            "--models", *args.models], cwd=ROOT, check=False, text=True, stderr=subprocess.PIPE)
        ov_json = work / "openvino.json"
        if r.returncode != 0 or not ov_json.exists():
            print(r.stderr, file=sys.stderr)
            raise SystemExit(f"the OpenVINO part failed: {first_line(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else '')}")
        ov = json.loads(ov_json.read_text())
        results["openvino"] = {k: ov[k] for k in ("onnxruntime", "nncf")}
        for name in args.models:
            entry = results["models"][name]
            entry.update(ov["variants"][name])
            present = [v for v in VARIANTS if entry[v].get("ok")]
            cpu = measure(name, "cpu", work, present, args.runs)
            for v in present:
                entry[v].update(int8=int8_by_kind(work / name / f"{v}.onnx"), cpu=cpu.get(v, {}),
                                openvino=ov["measure"][name].get(v, {}))
            results["models"][name] = {v: entry[v] for v in VARIANTS}
            for v in VARIANTS:
                e = entry[v]
                if not e.get("ok"):
                    print(f"{name:18s} {v:17s} failed: {e['error']}", flush=True)
                    continue
                show = lambda x: (f"{x.get('task', x.get('cosine', float('nan'))):.4f} {x['ms']:7.3f} ms {x['speedup']:5.2f}x"  # noqa: E731
                                  if "ms" in x else x.get("error", "-"))
                print(f"{name:18s} {v:17s} {fmt_counts(e['int8']):40s} OV: {show(e['openvino'])}  CPU: {show(e['cpu'])}",
                      flush=True)
    results["seconds"] = time.perf_counter() - t_start
    print(f"total {results['seconds']:.0f} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

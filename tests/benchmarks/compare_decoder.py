"""onnxopt quantize/optimize vs onnxruntime.quantization on an LLM-size (>2 GB) decoder export, one run.

    python tests/benchmarks/compare_decoder.py [--model /work/big/qwen2_34l_dynamo.onnx] [--tools ...]
        [--pairs 15] [--timeout 900] [--workdir DIR] [--out docs/decoder.json]

Not a timed test.  The model is a ``models/decoder.py`` export (random-init Qwen2-style decoder with past
key values, weights in ``MODEL.data``; build it with ``python -m models.decoder OUT.onnx --preset
qwen2-0.5b-34l``).  Each variant is produced from the same fp32 file in a child process whose wall time
and peak RSS are measured (``/usr/bin/time -v``, "Maximum resident set size"):

- ``onnxopt-dynamic``: ``onnxopt quantize M -o OUT --mode dynamic`` (no --data: scoring inputs synthesized);
- ``onnxopt-int4-rtn``: ``onnxopt quantize M -o OUT --weights int4 --rounding rtn --max-drop 0.1``;
- ``ort-dynamic``: ``quantize_dynamic(M, OUT, weight_type=QInt8, use_external_data_format=True)`` (ORT's
  advice for >2 GB models; no ``quant_pre_process``);
- ``ort-int4-rtn``: ``MatMulNBitsQuantizer(M, block_size=32, algo_config=RTNWeightOnlyQuantConfig())``,
  saved with external data (asymmetric, MatMul weights only; the RTN code ships inside onnxruntime
  1.32 as ``onnxruntime.quantization.neural_compressor``).  Should it fail (older releases import Intel
  Neural Compressor), the error is recorded and ``ort-int4-default`` runs instead:
  ``DefaultWeightOnlyQuantConfig(block_size=32)``, ORT's own blockwise round-to-nearest;
- ``onnxopt-optimize``: ``onnxopt optimize M -o OUT`` (validated default pipeline);
- ``onnxopt-fused``: ``onnxopt optimize M -o OUT -p default,fuse-transformer``;
- ``onnxopt-fp16``: ``onnxopt convert M -o OUT --fp16`` (the CPU EP runs most fp16 ops through casts: its
  latency here says little about a GPU);
- ``onnxsim`` / ``onnxslim`` (``--no-shape-infer``: its shape inference fails on this model), when installed
  (the ``bench`` extra); not installed -> recorded as failed with the import error.

Then in this process, for fp32 and each variant written: size on disk (model + external data), decode-step
latency ratio vs fp32 (batch 1, 1 new token after a past of 16, 1 intra-op thread; the variant's session
and fp32's run in interleaved pairs, ratio = median of the per-pair ratios; at most two sessions alive),
and fidelity vs fp32 on held-out prompts (4 prompts of 16 tokens, ``decoder.feeds`` seeds 100..103):
cosine of all logits pooled, the lowest per-position cosine, top-1 agreement over every position.
Errors are recorded per variant.  The CPU line is printed first.  JSON (and a .md table beside it) only
with ``--out``; it is rewritten after every step so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = Path("/work/big/qwen2_34l_dynamo.onnx")
NOTE = "random-init Qwen2-style decoder, 34 layers, hidden 896, 14/2 heads, vocab 151936, dynamo export"
TOOLS = ["onnxopt-dynamic", "onnxopt-int4-rtn", "ort-dynamic", "ort-int4-rtn", "onnxopt-optimize", "onnxopt-fused",
         "onnxopt-fp16", "onnxsim", "onnxslim"]
FALLBACK = {"ort-int4-rtn": "ort-int4-default"}
DECODE = {"batch": 1, "prompt": 1, "past": 16, "seed": 0}
PROMPTS = {"batch": 1, "prompt": 16, "past": 0}
SEEDS = [100, 101, 102, 103]


# ----- children -------------------------------------------------------------------------------------------
def child(tool: str, src: str, out: str) -> None:
    """Run inside the child process: one ORT quantization (onnxopt tools run through the CLI)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if tool == "onnxsim":
        import onnx
        import onnxsim

        model, ok = onnxsim.simplify(src)  # a path: onnxsim loads the external data itself
        if not ok:
            raise SystemExit("onnxsim: its check failed")
        onnx.save(model, out, save_as_external_data=True, location=Path(out).name + ".data")
        return
    if tool == "onnxslim":
        import onnxslim

        onnxslim.slim(src, out, no_shape_infer=True)  # its shape inference fails on this model (issue 24)
        return
    if tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, out, weight_type=QuantType.QInt8, use_external_data_format=True)
        return
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    if tool == "ort-int4-rtn":
        config = mnb.RTNWeightOnlyQuantConfig()
    elif tool == "ort-int4-default":
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=32)
    else:
        raise SystemExit(f"unknown tool {tool}")
    q = mnb.MatMulNBitsQuantizer(src, block_size=32, algo_config=config)  # loads the external data itself
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=True)


def command(tool: str, src: Path, out: Path) -> list[str]:
    if tool == "onnxopt-dynamic":
        return ["onnxopt", "quantize", str(src), "-o", str(out), "--mode", "dynamic"]
    if tool == "onnxopt-int4-rtn":
        return ["onnxopt", "quantize", str(src), "-o", str(out), "--weights", "int4", "--rounding", "rtn",
                "--max-drop", "0.1"]
    if tool == "onnxopt-optimize":
        return ["onnxopt", "optimize", str(src), "-o", str(out)]
    if tool == "onnxopt-fused":
        return ["onnxopt", "optimize", str(src), "-o", str(out), "-p", "default,fuse-transformer"]
    if tool == "onnxopt-fp16":
        return ["onnxopt", "convert", str(src), "-o", str(out), "--fp16"]
    return [sys.executable, str(Path(__file__).resolve()), "--child", tool, str(src), str(out)]


def first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"error|Error|Exception|Traceback|Killed|refus", ln) and not ln.startswith("Traceback"):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


def folder_bytes(out: Path) -> int:
    """The model file plus every file beside it (its external data): each variant has its own folder."""
    return sum(f.stat().st_size for f in out.parent.iterdir() if f.is_file() and not f.name.endswith(".time"))


def produce(tool: str, src: Path, work: Path, timeout: float) -> dict:
    folder = work / tool
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "model.onnx"
    timing = work / f"{tool}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(timing), *command(tool, src, out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=folder,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
        rc, text = proc.returncode, proc.stderr + "\n" + proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"error: timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}"
    seconds = time.perf_counter() - start
    entry = {"command": " ".join(command(tool, src, out)).replace(sys.executable, "python"), "seconds": round(seconds, 1)}
    if timing.exists():
        t = timing.read_text()
        if m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", t):
            entry["peak_rss_gb"] = round(int(m.group(1)) * 1024 / 1e9, 2)
        if m := re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", t):
            parts = [float(p) for p in m.group(1).split(":")]
            entry["seconds"] = round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))), 1)
    tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
    if rc == 0 and out.exists():
        entry["status"] = "ok"
        entry["bytes"] = folder_bytes(out)
        entry["path"] = str(out)
        entry["note"] = " / ".join(tail)[-400:]
    else:
        entry["status"] = "failed"
        entry["exit"] = rc
        entry["error"] = first_error(text)
        if rc == 0:
            entry["error"] = "exit 0 but no output written: " + " / ".join(tail)[-300:]
        shutil.rmtree(folder, ignore_errors=True)
    return entry


# ----- measurements ---------------------------------------------------------------------------------------
def session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def only(sess, feeds: dict) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def latency_pairs(ref, sess, feeds: dict, pairs: int) -> dict:
    a, b = only(ref, feeds), only(sess, feeds)
    for _ in range(2):
        ref.run(["logits"], a)
        sess.run(["logits"], b)
    tr, tv = [], []
    for i in range(pairs):
        order = [(ref, a, tr), (sess, b, tv)] if i % 2 == 0 else [(sess, b, tv), (ref, a, tr)]
        for s, f, acc in order:
            t0 = time.perf_counter()
            s.run(None, f)  # presents too: a real decode step returns the cache
            acc.append((time.perf_counter() - t0) * 1e3)
    ratios = [v / r for v, r in zip(tv, tr)]
    return {"fp32_ms": round(statistics.median(tr), 1), "ms": round(statistics.median(tv), 1),
            "latency_ratio": round(statistics.median(ratios), 3)}


def fidelity(refs: list[np.ndarray], sess, prompts: list[dict]) -> dict:
    dot = na = nb = 0.0
    agree = total = 0
    worst = 1.0
    for ref, feeds in zip(refs, prompts):
        got = sess.run(["logits"], only(sess, feeds))[0]
        a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        b = got.reshape(-1, got.shape[-1]).astype(np.float64)
        dot += float((a * b).sum())
        na += float((a * a).sum())
        nb += float((b * b).sum())
        per = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        worst = min(worst, float(per.min()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"cosine": round(dot / (np.sqrt(na * nb) + 1e-30), 6), "min_position_cosine": round(worst, 6),
            "top1_agreement": round(agree / total, 4), "positions": total}


# ----- output ---------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    w = results["fp32"]["bytes"]
    lines = [f"Model: `{results['model']}` ({w / 1e9:.2f} GB fp32: {results['fp32'].get('note', '')}). "
             f"Decode step: batch 1, 1 token after a past of 16, 1 thread, median of {results['pairs']} "
             "interleaved pairs with fp32. Fidelity vs fp32: 4 prompts x 16 tokens (seeds 100..103).", "",
             "| tool | seconds | peak RSS GB (x weights) | size GB (x fp32) | decode latency vs fp32 | logits cosine | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    fp = results["fp32"]
    lines.append(f"| fp32 | - | - | {w / 1e9:.2f} (1.00) | 1.00 ({fp.get('ms', '?')} ms) | 1 | 1 |")
    for name, e in results["tools"].items():
        rss = f"{e['peak_rss_gb']:.1f} ({e['peak_rss_gb'] * 1e9 / w:.1f}x)" if "peak_rss_gb" in e else "-"
        if e["status"] != "ok":
            lines.append(f"| {name} | {e['seconds']} | {rss} | failed: {e.get('error', '')[:120]} | | | |")
            continue
        size = f"{e['bytes'] / 1e9:.2f} ({e['bytes'] / w:.2f})"
        lat = f"{e['latency_ratio']:.2f} ({e['ms']} ms)" if "latency_ratio" in e else e.get("eval_error", "-")[:80]
        cos = f"{e['cosine']:.4f}" if "cosine" in e else "-"
        top = f"{e['top1_agreement']:.3f}" if "top1_agreement" in e else "-"
        lines.append(f"| {name} | {e['seconds']} | {rss} | {size} | {lat} | {cos} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS + list(FALLBACK.values()))
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--workdir", type=Path, help="where variants are written (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the variants")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from models import decoder
    from onnxopt import benchmark as bench

    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    src = args.model.resolve()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="decoder-bench-", dir=src.parent))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fp_bytes = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data"))
    results: dict = {"machine": {k: v for k, v in info.items() if k != "flags"}, "model": str(src),
                     "decode": DECODE, "prompts": PROMPTS | {"seeds": SEEDS}, "pairs": args.pairs,
                     "fp32": {"bytes": fp_bytes, "note": NOTE if src == DEFAULT_MODEL else src.name},
                     "tools": {}}

    def save() -> None:
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(f"{bench.machine_line(info)}\n\n{markdown(results)}")

    try:
        for tool in args.tools:
            entry = produce(tool, src, work, args.timeout)
            results["tools"][tool] = entry
            print(f"{tool}: {entry['status']} {entry['seconds']} s, peak {entry.get('peak_rss_gb')} GB"
                  + (f", {entry['bytes'] / 1e9:.2f} GB" if entry["status"] == "ok" else f": {entry['error']}"), flush=True)
            if tool in FALLBACK and entry["status"] != "ok":
                alt = FALLBACK[tool]
                results["tools"][alt] = e2 = produce(alt, src, work, args.timeout)
                print(f"{alt}: {e2['status']} {e2['seconds']} s, peak {e2.get('peak_rss_gb')} GB"
                      + (f", {e2['bytes'] / 1e9:.2f} GB" if e2["status"] == "ok" else f": {e2['error']}"), flush=True)
            save()

        decode = decoder.feeds(src, **DECODE)
        prompts = [decoder.feeds(src, seed=s, **PROMPTS) for s in SEEDS]
        t0 = time.perf_counter()
        ref = session(str(src))
        results["fp32"]["session_s"] = round(time.perf_counter() - t0, 1)
        refs = [ref.run(["logits"], only(ref, f))[0] for f in prompts]
        fp_ms = []
        for name, e in results["tools"].items():
            if e["status"] != "ok":
                continue
            try:
                t0 = time.perf_counter()
                sess = session(e["path"])
                e["session_s"] = round(time.perf_counter() - t0, 1)
                e |= latency_pairs(ref, sess, decode, args.pairs)
                fp_ms.append(e["fp32_ms"])
                e |= fidelity(refs, sess, prompts)
            except Exception as exc:  # noqa: BLE001 - recorded per variant
                e["eval_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            finally:
                sess = None
                gc.collect()
            print(f"{name}: latency x{e.get('latency_ratio')} ({e.get('ms')} vs {e.get('fp32_ms')} ms), cosine "
                  f"{e.get('cosine')}, top-1 {e.get('top1_agreement')}" + (f" [{e['eval_error']}]" if "eval_error" in e else ""),
                  flush=True)
            save()
        if fp_ms:
            results["fp32"]["ms"] = round(statistics.median(fp_ms), 1)
    finally:
        save()
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    if args.out:
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side graph optimizers: onnxopt vs onnxsim, onnxslim, onnxoptimizer and ORT's offline
basic-level optimizer, in one process, on the same inputs.

    pip install -e ".[bench]"
    python tests/benchmarks/compare_graph_tools.py [MODEL.onnx ...] [--runs 20] [--out bench-results/graph_tools.json]

Per model and tool: node count (subgraphs included), file size, tool wall time, max abs diff vs
the original on ORT (same synthesized inputs), ORT CPU speed-up original/optimized (medians of
``--runs`` alternating runs of both, 1 thread), whether the tool crashed and whether an output
shape changed.  Missing peers are reported as "not installed".  Not a test: nothing is asserted.

Output: the CPU it ran on (model, SIMD flags, cores, ORT version) first, then one table row per
model as it finishes, then the whole Markdown table.  Nothing is written unless ``--out PATH`` is
given: then the JSON goes to PATH and the Markdown table beside it (PATH with suffix ``.md``).
The committed ``docs/graph_tools.json`` / ``docs/results.md`` are never overwritten by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from onnxopt import api, runtime
from onnxopt import benchmark as bench
from tests.helpers import count_graph_nodes as count_nodes

SHAPES = {  # concrete sizes for symbolic dims, as in tests/test_cli.py
    "cnn_dynamic": {"image": (2, 3, 24, 40)},
    "transformer_encoder": {"tokens": (2, 7, 64)},
    "exporter_opset11": {"x": (3, 3, 8, 8)},
}


def tool_onnxopt(src: Path, dst: Path) -> None:
    api.optimize(src, dst, validate_result=False)


def tool_onnxsim(src: Path, dst: Path) -> None:
    import onnxsim
    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, str(dst))


def tool_onnxslim(src: Path, dst: Path) -> None:
    import onnxslim
    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))


def tool_onnxoptimizer(src: Path, dst: Path) -> None:
    import onnxoptimizer
    onnx.save(onnxoptimizer.optimize(onnx.load(str(src))), str(dst))


def tool_ort_basic(src: Path, dst: Path) -> None:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


TOOLS = {"onnxopt": tool_onnxopt, "onnxsim": tool_onnxsim, "onnxslim": tool_onnxslim,
         "onnxoptimizer": tool_onnxoptimizer, "ort-basic": tool_ort_basic}


def latency_ratio(original: Path, candidate: Path, feeds: dict, runs: int) -> tuple[float, float, float]:
    """(original ms, candidate ms, speed-up) from alternating runs, medians, 1 thread each:
    interleaving makes drift of the machine hit both sides alike."""
    a, b = runtime.session(original, threads=1), runtime.session(candidate, threads=1)
    for _ in range(3):
        a.run(None, feeds)
        b.run(None, feeds)
    ta, tb = [], []
    for _ in range(runs):
        for sess, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma, mb, ma / mb


def bench_model(src: Path, runs: int, workdir: Path) -> dict:
    ref_sess = runtime.session(src)
    feeds = runtime.synthesize(ref_sess, SHAPES.get(src.stem, {}))
    ref = runtime.run(ref_sess, feeds)
    row = {"model": src.name, "nodes": count_nodes(onnx.load(str(src)).graph), "bytes": src.stat().st_size,
           "tools": {}}
    for name, fn in TOOLS.items():
        dst = workdir / f"{src.stem}.{name}.onnx"
        entry: dict = {}
        try:
            t0 = time.perf_counter()
            fn(src, dst)
            entry["seconds"] = time.perf_counter() - t0
        except ImportError:
            entry["status"] = "not installed"
            row["tools"][name] = entry
            continue
        except Exception as e:  # noqa: BLE001 - a peer crashing is a result
            entry.update(status="crashed", error=f"{type(e).__name__}: {str(e)[:200]}")
            row["tools"][name] = entry
            continue
        try:
            out = runtime.run(runtime.session(dst), feeds)
            entry["nodes"] = count_nodes(onnx.load(str(dst)).graph)
            entry["bytes"] = dst.stat().st_size
            entry["shape_changed"] = any(np.shape(out.get(k)) != np.shape(v) for k, v in ref.items())
            diffs = [float(np.max(np.abs(out[k].astype(np.float64) - v.astype(np.float64)))) if v.size else 0.0
                     for k, v in ref.items() if k in out and np.shape(out[k]) == np.shape(v)]
            entry["max_abs_diff"] = max(diffs, default=float("nan"))
            entry["latency_original_ms"], entry["latency_ms"], entry["latency_ratio"] = latency_ratio(src, dst, feeds, runs)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - the tool wrote a model ORT cannot run
            entry.update(status="broken output", error=f"{type(e).__name__}: {str(e)[:200]}")
        row["tools"][name] = entry
    return row


def markdown(rows: list[dict]) -> str:
    names = list(TOOLS)
    lines = ["| model | original | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            e = r["tools"][n]
            if e.get("status") != "ok":
                cells.append(e.get("status", "?"))
                continue
            flag = " **shape!**" if e["shape_changed"] else ""
            cells.append(f"{e['nodes']} ({e['max_abs_diff']:.1g}, {e['latency_ratio']:.2f}x, {e['seconds']:.2f}s){flag}")
        lines.append(f"| {r['model']} | {r['nodes']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: nodes after (max abs diff vs original, ORT CPU speed-up original/optimized, tool wall time).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", type=Path)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path, default=None,
                   help="write the JSON here and the Markdown table beside it (.md); default: print only")
    a = p.parse_args(argv)
    models = a.models or sorted((ROOT / "models").glob("*.onnx"))
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            try:
                rows.append(bench_model(m, a.runs, Path(tmp)))
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            if rows:
                print(markdown(rows[-1:]).splitlines()[2], flush=True)
    print(markdown(rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {k: v for k, v in info.items() if k != "flags"}
        a.out.write_text(json.dumps({"onnxruntime": ort.__version__, "machine": machine, "runs": a.runs, "rows": rows},
                                    indent=2))
        md = a.out.with_suffix(".md")
        md.write_text(f"{bench.machine_line(info)}\n\n{markdown(rows)}")
        print(f"wrote {a.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

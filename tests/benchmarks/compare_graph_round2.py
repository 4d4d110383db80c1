"""Issue 22 ("Graph round 2"): onnxopt's default pipeline vs onnxsim, onnxslim and onnxoptimizer on
the round-2 exports (models/round2.py), node counts and Transpose counts per tool, and the
latency of the NHWC Keras U-Net (every tool's output vs ours, interleaved runs, 1 thread, medians).

    pip install -e ".[bench,models]"
    python tests/benchmarks/compare_graph_round2.py [--runs 200] [--out docs/graph_round2.json]

Every tool's output is run on ORT against the original on the same inputs (models.round2.SHAPES):
a tool whose output differs (max abs diff > 1e-3 or another shape) is marked "wrong" and its
counts are not compared.  Not a test: nothing is asserted.  Nothing is written unless ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.round2 import BUILDERS, SHAPES
from onnxopt import api, bench, runtime
from tests.benchmarks.compare_graph_tools import tool_onnxoptimizer, tool_onnxsim, tool_onnxslim
from tests.helpers import count_graph_nodes


def tool_onnxopt(src: Path, dst: Path) -> None:
    api.optimize(src, dst, validate_result=False)


TOOLS = {"onnxopt": tool_onnxopt, "onnxsim": tool_onnxsim, "onnxslim": tool_onnxslim, "onnxoptimizer": tool_onnxoptimizer}
LATENCY_MODEL = "keras_unet"
LATENCY_SHAPES = [(2, 48, 64, 3), (1, 256, 256, 3)]
TOLERANCE = 1e-3


def op_counts(graph: onnx.GraphProto) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                counts.update(op_counts(g))
    return counts


def run_tools(src: Path, workdir: Path) -> dict:
    feeds = runtime.synthesize(runtime.session(src), SHAPES.get(src.stem, {}))
    ref = runtime.run(runtime.session(src), feeds)
    model = onnx.load(str(src))
    row = {"model": src.stem, "nodes": count_graph_nodes(model.graph), "transposes": op_counts(model.graph)["Transpose"],
           "tools": {}}
    for name, fn in TOOLS.items():
        dst = workdir / f"{src.stem}.{name}.onnx"
        entry: dict = {}
        try:
            t0 = time.perf_counter()
            fn(src, dst)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            out = runtime.run(runtime.session(dst), feeds)
        except ImportError:
            row["tools"][name] = {"status": "not installed"}
            continue
        except Exception as e:  # noqa: BLE001 - a peer crashing is a result
            row["tools"][name] = {"status": "crashed", "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        optimized = onnx.load(str(dst))
        counts = op_counts(optimized.graph)
        same_shapes = all(np.shape(out.get(k)) == np.shape(v) for k, v in ref.items())
        diff = max((float(np.max(np.abs(out[k].astype(np.float64) - v.astype(np.float64)))) if v.size else 0.0
                    for k, v in ref.items()), default=0.0) if same_shapes else float("inf")
        entry.update(nodes=count_graph_nodes(optimized.graph), transposes=counts["Transpose"], max_abs_diff=diff,
                     ops=dict(sorted(counts.items())), status="ok" if diff <= TOLERANCE else "wrong", path=str(dst))
        row["tools"][name] = entry
    return row


def latency(paths: dict[str, Path], feeds: dict, runs: int) -> dict[str, float]:
    """Median ms per tool, the tools' sessions run interleaved (one run of each in turn), 1 thread."""
    sessions = {name: runtime.session(p, threads=1) for name, p in paths.items()}
    for _ in range(5):
        for s in sessions.values():
            s.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def markdown(rows: list[dict]) -> str:
    names = list(TOOLS)
    lines = ["| export | original | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            e = r["tools"][n]
            cells.append(f"{e['nodes']} ({e['transposes']} T)" if e.get("status") == "ok" else e.get("status", "?"))
        lines.append(f"| {r['model']} | {r['nodes']} ({r['transposes']} T) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: nodes after the tool (Transposes); 'wrong': the tool's output differs from the original.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(BUILDERS), help="names in models/round2.py (built if missing)")
    p.add_argument("--runs", type=int, default=200, help="interleaved latency runs of the NHWC U-Net")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (and the Markdown table beside it)")
    a = p.parse_args(argv)
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    rows, lat = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            src = ROOT / "models" / f"{name}.onnx"
            if not src.exists():
                model = BUILDERS[name]()
                if model is None:
                    print(f"{name}: skipped (framework not installed)")
                    continue
                src = Path(tmp) / f"{name}.onnx"
                onnx.save(model, str(src))
            rows.append(run_tools(src, Path(tmp)))
            print(markdown(rows[-1:]).splitlines()[2], flush=True)
            if name == LATENCY_MODEL:
                row = rows[-1]
                paths = {"original": src} | {n: Path(e["path"]) for n, e in row["tools"].items() if e.get("status") == "ok"}
                lat = {"model": name, "runs": a.runs, "threads": 1, "median_ms": {}}
                for shape in LATENCY_SHAPES:
                    feeds = runtime.synthesize(runtime.session(src), {"image": shape})
                    lat["median_ms"]["x".join(map(str, shape))] = latency(paths, feeds, a.runs)
                    print(f"latency at {shape} (median ms, interleaved, 1 thread):", lat["median_ms"]["x".join(map(str, shape))],
                          flush=True)
        for r in rows:
            for e in r["tools"].values():
                e.pop("path", None)
    print(markdown(rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {k: v for k, v in info.items() if k != "flags"}
        import onnxoptimizer
        import onnxsim
        import onnxslim
        versions = {"onnxruntime": ort.__version__, "onnxsim": onnxsim.__version__, "onnxslim": onnxslim.__version__,
                    "onnxoptimizer": onnxoptimizer.__version__}
        a.out.write_text(json.dumps({"versions": versions, "machine": machine, "rows": rows, "latency": lat}, indent=2) + "\n")
        a.out.with_suffix(".md").write_text(f"{bench.machine_line(info)}\n\n{markdown(rows)}")
        print(f"wrote {a.out} and {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

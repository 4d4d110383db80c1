"""Transformer and RNN exports: onnxopt's default pipeline and fuse-transformer vs ORT's
``optimize_model``, onnxsim and onnxslim, in one process, on the same inputs.

    pip install -e ".[bench,models]"
    python tests/benchmarks/compare_transformers.py [--out bench-results/transformers.json]

Models: ``models/{bert,gpt2,vit,llama}_{ts,dynamo}.onnx`` (models/transformers.py: TorchScript and
dynamo exporters) and the CTC recognizers ``crnn`` (a bidirectional LSTM), ``text_crnn`` and
``glyph_crnn`` (conv-only: the trained "crnn"s have no recurrent layer).  Per model and
tool: node count (subgraphs included), com.microsoft attention ops, Softmax left, op histogram,
tool wall time, and the max abs diff vs the original on ORT CPU at two input points (different
batch/sequence/past lengths), and the ORT CPU speed-up original/optimized (``--runs``
alternating runs per side, medians, 1 thread; the models are tiny, so these are noisy).  A tool
that crashes is reported with its error.  Tools:

- ``default``: ``onnxopt optimize`` (default pipeline),
- ``default+fuse`` / ``fuse+default``: ``-p "default,fuse-transformer"`` and the other order,
- ``ort-optimizer``: ``onnxruntime.transformers.optimizer.optimize_model`` (opt_level 0, model type
  bert/gpt2/vit with the heads given; gpt2 for llama, which it has no type for),
- ``onnxsim``, ``onnxslim``: their Python APIs with default settings.

Prints the CPU it ran on first.  Not a test: nothing is asserted.  JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
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

from models import transformers as tmodels
from onnxopt import api, runtime
from onnxopt import benchmark as bench
from passes.fuse_transformer import ATTENTION_OPS, ORT_MODEL_TYPE
from tests.benchmarks.compare_graph_tools import latency_ratio
from tests.helpers import count_graph_nodes as count_nodes

RNNS = {"crnn": [{"line": (1, 1, 32, 64)}, {"line": (3, 1, 32, 48)}],
        "text_crnn": [{"line": (1, 1, 32, 128)}, {"line": (2, 1, 32, 96)}],
        "glyph_crnn": [{"line": (1, 1, 32, 128)}, {"line": (2, 1, 32, 96)}]}
HEADS = {arch: (tmodels.HEADS, tmodels.HIDDEN) for arch in tmodels.ARCHS}  # llama: 4 query heads (2 key/value)


def _arch(stem: str) -> str | None:
    arch = stem.rsplit("_", 1)[0]
    return arch if arch in tmodels.ARCHS else None


def tool_default(src: Path, dst: Path, data: Path | None) -> None:
    api.optimize(src, dst, data=data, validate_result=False)


def tool_default_fuse(src: Path, dst: Path, data: Path | None) -> None:
    api.optimize(src, dst, pipeline_text="default,fuse-transformer", data=data, validate_result=False)


def tool_fuse_default(src: Path, dst: Path, data: Path | None) -> None:
    api.optimize(src, dst, pipeline_text="fuse-transformer,default", data=data, validate_result=False)


def tool_ort_optimizer(src: Path, dst: Path, data: Path | None) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    arch = _arch(src.stem)
    if arch is None:
        raise RuntimeError("not a transformer")
    heads, hidden = HEADS[arch]
    optimize_model(str(src), model_type=ORT_MODEL_TYPE.get(arch, arch), num_heads=heads, hidden_size=hidden,
                   opt_level=0).save_model_to_file(str(dst))


def tool_onnxsim(src: Path, dst: Path, data: Path | None) -> None:
    import onnxsim
    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, str(dst))


def tool_onnxslim(src: Path, dst: Path, data: Path | None) -> None:
    import onnxslim
    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))


TOOLS = {"default": tool_default, "default+fuse": tool_default_fuse, "fuse+default": tool_fuse_default,
         "ort-optimizer": tool_ort_optimizer, "onnxsim": tool_onnxsim, "onnxslim": tool_onnxslim}


def points(src: Path) -> list[dict[str, np.ndarray]]:
    arch = _arch(src.stem)
    if arch is not None:
        return [tmodels.feeds(arch, batch=2, seq=8, past=4, seed=1), tmodels.feeds(arch, batch=3, seq=5, past=7, seed=2)]
    sess = runtime.session(src)
    return [runtime.synthesize(sess, shapes, seed=i) for i, shapes in enumerate(RNNS[src.stem])]


def histogram(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
                               for n in model.graph.node)


def bench_model(src: Path, workdir: Path, runs: int = 20) -> dict:
    arch = _arch(src.stem)
    data = ROOT / "models" / "data" / f"{arch}_inputs.npz" if arch else None
    feeds = points(src)
    ref_sess = runtime.session(src)
    refs = [runtime.run(ref_sess, f) for f in feeds]
    row = {"model": src.stem, "nodes": count_nodes(onnx.load(str(src)).graph), "tools": {}}
    for name, fn in TOOLS.items():
        if arch is None and name in ("default+fuse", "fuse+default", "ort-optimizer"):
            continue
        dst = workdir / f"{src.stem}.{name}.onnx"
        entry: dict = {}
        try:
            t0 = time.perf_counter()
            fn(src, dst, data)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
        except ImportError:
            row["tools"][name] = {"status": "not installed"}
            continue
        except Exception as e:  # noqa: BLE001 - a peer crashing is a result
            row["tools"][name] = {"status": "crashed", "error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        model = onnx.load(str(dst))
        hist = histogram(model)
        entry.update(nodes=count_nodes(model.graph), histogram=dict(sorted(hist.items())),
                     attention=sum(n for op, n in hist.items() if op.split("::")[-1] in ATTENTION_OPS and "::" in op),
                     softmax=hist.get("Softmax", 0))
        try:
            sess = runtime.session(dst)
            diffs = []
            for f, ref in zip(feeds, refs):
                out = runtime.run_candidate(sess, f, list(ref))
                diffs += [float(np.max(np.abs(out[k].astype(np.float64) - v.astype(np.float64)))) for k, v in ref.items()]
            entry["max_abs_diff"] = max(diffs)
            if runs:
                entry["latency_original_ms"], entry["latency_ms"], entry["speedup"] = latency_ratio(src, dst, feeds[0], runs)
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
            e = r["tools"].get(n)
            if e is None:
                cells.append("")
            elif e.get("status") != "ok":
                cells.append(e.get("status", "?"))
            else:
                att = f", attn {e['attention']}/{e['attention'] + e['softmax']}" if _arch(r["model"]) else ""
                speed = f", {e['speedup']:.2f}x" if "speedup" in e else ""
                cells.append(f"{e['nodes']}{att} ({e['max_abs_diff']:.1g}{speed})")
        lines.append(f"| {r['model']} | {r['nodes']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: nodes after (attn fused/attention blocks for transformers; max abs diff vs the original "
              "at two input points; ORT CPU speed-up original/optimized, 1 thread, medians of alternating runs)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model names (default: all transformer and RNN exports)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (and the table beside it, .md)")
    p.add_argument("--runs", type=int, default=20, help="latency runs per side (0: no latency)")
    a = p.parse_args(argv)
    names = a.models or [*tmodels.NAMES, *RNNS]
    info = bench.machine()
    print(bench.machine_line(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                rows.append(bench_model(ROOT / "models" / f"{name}.onnx", Path(tmp), a.runs))
                print(markdown(rows[-1:]).splitlines()[2], flush=True)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    print(markdown(rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {k: v for k, v in info.items() if k != "flags"}
        a.out.write_text(json.dumps({"onnxruntime": ort.__version__, "machine": machine, "runs": a.runs, "rows": rows}, indent=2))
        a.out.with_suffix(".md").write_text(f"{bench.machine_line(info)}\n\n{markdown(rows)}")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

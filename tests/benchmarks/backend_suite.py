"""The onnx package's own backend test models as a regression suite for onnxopt.

    pip install -e ".[bench]"
    python tests/benchmarks/backend_suite.py [--kind simple,light,...] [--only NAME ...]
        [--out docs/backend_suite.json] [--no-onnxslim]

Models come from the installed onnx wheel (``onnx/backend/test/data``):

- ``simple``, ``pytorch-converted``, ``pytorch-operator``: one folder per model with
  ``model.onnx`` and ``test_data_set_*/{input,output}_*.pb`` (the shipped references);
- ``light``: ``light_<name>.onnx`` with ``light_<name>_output_0.pb``; the input is what the onnx
  backend runner feeds (``arange(n)/n`` in the input's shape, ``generate_dummy_data(random=False)``),
  tolerances come from ``real/test_<name>/data.json`` (``real`` holds only those descriptors; its
  models *are* the light ones, so it adds no models of its own).

Per model: can ORT 1.32 CPU load and run the original (else the model is skipped with ORT's
reason); the original's ORT outputs vs the shipped reference; ``onnxopt.api.optimize`` with
validation on (refused / failed / ok); the optimized model's ORT outputs vs the reference, judged
relative to the original (when the original itself misses the reference, the optimized one must
equal the original's ORT outputs instead); node counts (subgraphs included) before, after, and
after ``onnxslim.slim`` in-process (with onnxslim's own outputs checked the same way).
Tolerance: the model's own (``data.json``) rtol, and ``atol = max(its atol, 1e-4)`` -
``np.testing.assert_allclose`` style ``|got - ref| <= atol + rtol * |ref|``; exact for
integers/bools/strings; NaN positions must match.  One ORT thread.  Not a timed test: the fast
subset is asserted by tests/test_backend_suite.py, which imports the loader from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxopt import api  # noqa: E402
from onnxopt.errors import OnnxoptError, ValidationRefused  # noqa: E402
from tests.helpers import count_graph_nodes as count_nodes  # noqa: E402

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("simple", "pytorch-operator", "pytorch-converted", "light")
RTOL, ATOL = 1e-3, 1e-4


@dataclasses.dataclass
class Case:
    kind: str
    name: str
    model: Path
    datasets: list  # [(inputs: list, outputs: list)] in graph input/output order
    rtol: float = RTOL
    atol: float = ATOL

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


# ---------------------------------------------------------------- loading

def _read_value(path: str, type_proto: onnx.TypeProto | None):
    """A test_data_set pb file as numpy (tensor), list (sequence) or None/value (optional)."""
    data = Path(path).read_bytes()
    kind = type_proto.WhichOneof("value") if type_proto is not None else "tensor_type"
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _folder_case(kind: str, folder: Path) -> Case:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs, outputs = _feed_inputs(model), list(model.graph.output)
    datasets = []
    for ds in sorted(glob.glob(str(folder / "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
        ins = [_read_value(os.path.join(ds, f"input_{i}.pb"), inputs[i].type if i < len(inputs) else None)
               for i in range(n_in)]
        outs = [_read_value(os.path.join(ds, f"output_{i}.pb"), outputs[i].type if i < len(outputs) else None)
                for i in range(n_out)]
        datasets.append((ins, outs))
    return Case(kind, folder.name, folder / "model.onnx", datasets)


def _light_case(path: Path) -> Case:
    name = path.stem[len("light_"):]
    model = onnx.load(str(path), load_external_data=False)
    ins = []
    for x in _feed_inputs(model):
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        ins.append((np.arange(n).reshape(shape) / n).astype(np.float32))  # the onnx runner's dummy input
    outs = []
    for i in range(len(model.graph.output)):
        ref = path.with_name(f"{path.stem}_output_{i}.pb")
        outs.append(_read_value(str(ref), model.graph.output[i].type))
    rtol, atol = RTOL, ATOL
    desc = DATA / "real" / f"test_{name}" / "data.json"
    if desc.exists():
        meta = json.loads(desc.read_text())
        rtol, atol = meta.get("rtol", rtol), max(meta.get("atol", atol), ATOL)
    return Case("light", path.stem, path, [(ins, outs)], rtol, atol)


def case_paths(kinds=KINDS) -> list[tuple[str, Path]]:
    """(kind, model folder or light .onnx file) for every model, sorted; cheap (no parsing)."""
    found = []
    for kind in kinds:
        if kind == "light":
            found += [("light", p) for p in sorted((DATA / "light").glob("light_*.onnx"))]
        else:
            found += [(kind, p) for p in sorted((DATA / kind).iterdir()) if (p / "model.onnx").exists()]
    return found


def load_case(kind: str, path: Path) -> Case:
    return _light_case(path) if kind == "light" else _folder_case(kind, path)


# ---------------------------------------------------------------- running and comparing

def ort_session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def ort_outputs(model, case: Case) -> list[list]:
    """ORT outputs for every data set of ``case`` (feeds by position over the non-initializer inputs)."""
    sess = ort_session(model)
    names = [i.name for i in sess.get_inputs()]
    proto = onnx.load(str(model), load_external_data=False) if not isinstance(model, onnx.ModelProto) else model
    order = [i.name for i in _feed_inputs(proto)]
    results = []
    for ins, _ in case.datasets:
        feeds = {n: v for n, v in zip(order, ins) if n in names}
        results.append(sess.run(None, feeds))
    return results


def _flatten(v):
    if isinstance(v, list):
        return [x for item in v for x in _flatten(item)]
    return [v]


def mismatch(got, ref, rtol: float, atol: float) -> str | None:
    """None when ``got`` equals ``ref`` within tolerance, else a short description."""
    g_all, r_all = _flatten(got), _flatten(ref)
    if len(g_all) != len(r_all):
        return f"{len(g_all)} tensors vs {len(r_all)}"
    for g, r in zip(g_all, r_all):
        if g is None or r is None:
            if g is not r:
                return "optional presence differs"
            continue
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            return f"shape {g.shape} vs {r.shape}"
        if r.dtype.kind in "fc":
            wide = np.complex128 if r.dtype.kind == "c" else np.float64
            g64, r64 = g.astype(wide), r.astype(wide)
            if not np.array_equal(np.isnan(g64), np.isnan(r64)):
                return "NaN positions differ"
            ok = np.isnan(r64) | (g64 == r64) | (np.abs(g64 - r64) <= atol + rtol * np.abs(r64))
            if not ok.all():
                err = np.abs(g64 - r64)[~ok]
                return f"max abs diff {float(err.max()):.3g} ({int((~ok).sum())} of {r.size} elements)"
        elif not np.array_equal(g, r):
            return "values differ"
    return None


def compare_all(got_sets: list[list], case: Case, refs: list[list] | None = None) -> str | None:
    refs = refs if refs is not None else [outs for _, outs in case.datasets]
    for i, (got, ref) in enumerate(zip(got_sets, refs)):
        why = mismatch(got, ref, case.rtol, case.atol)
        if why:
            return f"data set {i}: {why}"
    return None


def judge(case: Case, candidate, original_sets: list[list] | None, original_ref: str | None) -> tuple[bool, str | None]:
    """(ok, why not): the candidate must equal the references, or, where the original itself
    misses them, the original's ORT outputs."""
    try:
        got = ort_outputs(candidate, case)
    except Exception as e:  # noqa: BLE001
        return False, f"ORT cannot run it: {_line(e)}"
    why = compare_all(got, case)
    if why is None:
        return True, None
    if original_ref is not None and original_sets is not None:
        same = compare_all(got, case, original_sets)
        if same is None:
            return True, None
        return False, f"vs original: {same}"
    return False, why


def run_case(case: Case, tmp: Path, onnxslim_nodes: bool = True) -> dict:
    row: dict = {"model": case.id, "rtol": case.rtol, "atol": case.atol}
    proto = onnx.load(str(case.model))
    row["nodes_before"] = count_nodes(proto.graph)
    row["bytes_before"] = proto.ByteSize()
    row["ir_version"] = proto.ir_version
    row["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        original_sets = ort_outputs(case.model, case)
    except Exception as e:  # noqa: BLE001
        row["status"] = "skipped"
        row["reason"] = f"ORT cannot run the original: {_line(e)}"
        return row
    row["original_vs_reference"] = compare_all(original_sets, case)
    out = tmp / (case.name + ".opt.onnx")
    data = _validation_data(case, tmp)
    row["validation_data"] = "reference inputs" if data else "synthesized"
    t0 = time.perf_counter()
    try:
        report = api.optimize(case.model, out, data=data, latency_runs=0)
        row["status"] = "ok"
        row["nodes_after"] = report["output"]["nodes"]
        row["bytes_after"] = report["output"]["file_bytes"]
    except ValidationRefused as e:
        row["status"] = "refused"
        row["reason"] = _line(e)
    except OnnxoptError as e:
        row["status"] = f"error (exit {e.exit_code})" if hasattr(e, "exit_code") else "error"
        row["reason"] = _line(e)
    except Exception as e:  # noqa: BLE001
        row["status"] = "crash"
        row["reason"] = f"{type(e).__name__}: {_line(e)}"
        logging.debug("%s", traceback.format_exc())
    row["onnxopt_seconds"] = round(time.perf_counter() - t0, 2)
    if row["status"] == "ok":
        ok, why = judge(case, out, original_sets, row["original_vs_reference"])
        row["reference_ok"] = ok
        if why:
            row["reference_mismatch"] = why
    if onnxslim_nodes:
        row.update(_onnxslim(case, proto, original_sets, row["original_vs_reference"]))
    return row


def _validation_data(case: Case, tmp: Path) -> Path | None:
    """The first data set's inputs as an .npz for ``--data`` (synthesized inputs may be invalid for
    the model: an Expand target shape, split sizes); None when an input is not a tensor."""
    proto = onnx.load(str(case.model), load_external_data=False)
    names = [i.name for i in _feed_inputs(proto)]
    ins = case.datasets[0][0] if case.datasets else []
    if not ins or not all(isinstance(v, np.ndarray) and v.dtype != object for v in ins):
        return None
    path = tmp / (case.name + ".inputs.npz")
    np.savez(path, **dict(zip(names, ins)))
    return path


def _onnxslim(case: Case, proto: onnx.ModelProto, original_sets, original_ref) -> dict:
    try:
        import onnxslim
    except ImportError:
        return {"onnxslim": "not installed"}
    t0 = time.perf_counter()
    note = None
    try:
        slim = onnxslim.slim(onnx.ModelProto.FromString(proto.SerializeToString()))
    except Exception as e:  # noqa: BLE001 - e.g. its symbolic shape inference returns None below opset 7
        note = f"default settings crash ({type(e).__name__}: {_line(e)[:80]}); run with no_shape_infer=True"
        try:
            slim = onnxslim.slim(onnx.ModelProto.FromString(proto.SerializeToString()), no_shape_infer=True)
        except Exception as e2:  # noqa: BLE001
            return {"onnxslim": f"crash: {type(e2).__name__}: {_line(e2)}"}
    row = {"onnxslim_nodes": count_nodes(slim.graph), "onnxslim_bytes": slim.ByteSize(),
           "onnxslim_seconds": round(time.perf_counter() - t0, 2)}
    if note:
        row["onnxslim_note"] = note
    ok, why = judge(case, slim, original_sets, original_ref)
    row["onnxslim_reference_ok"] = ok
    if why:
        row["onnxslim_mismatch"] = why
    return row


def _line(e: BaseException) -> str:
    text = str(e).replace(str(DATA) + os.sep, "").strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# ---------------------------------------------------------------- report

def summary(rows: list[dict]) -> dict:
    ran = [r for r in rows if r["status"] != "skipped"]
    return {
        "models": len(rows),
        "skipped_by_ort": len(rows) - len(ran),
        "ran": len(ran),
        "optimized": sum(r["status"] == "ok" for r in ran),
        "refused": [r["model"] for r in ran if r["status"] == "refused"],
        "errors": [r["model"] for r in ran if r["status"] not in ("ok", "refused")],
        "reference_mismatches": [r["model"] for r in ran if r.get("reference_ok") is False],
        "original_misses_reference": [r["model"] for r in ran if r.get("original_vs_reference")],
        "above_onnxslim": {r["model"]: [r["nodes_after"], r["onnxslim_nodes"]] for r in ran
                           if "nodes_after" in r and "onnxslim_nodes" in r and r["nodes_after"] > r["onnxslim_nodes"]},
        "onnxslim_default_crashes": sum(1 for r in ran if r.get("onnxslim_note")),
        "below_onnxslim": sum(1 for r in ran if "nodes_after" in r and "onnxslim_nodes" in r
                              and r["nodes_after"] < r["onnxslim_nodes"]),
        "nodes_before": sum(r["nodes_before"] for r in ran),
        "nodes_after": sum(r.get("nodes_after", r["nodes_before"]) for r in ran),
        "bytes_before": sum(r["bytes_before"] for r in ran),
        "bytes_after": sum(r.get("bytes_after", r["bytes_before"]) for r in ran),
        "onnxslim_bytes": sum(r.get("onnxslim_bytes", r["bytes_before"]) for r in ran),
        "onnxslim_nodes": sum(r.get("onnxslim_nodes", r["nodes_before"]) for r in ran),
    }


def markdown(rows: list[dict], summ: dict) -> str:
    lines = [
        "# onnx backend test models through onnxopt",
        "",
        f"Generated by `tests/benchmarks/backend_suite.py` (onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}, CPU, 1 thread).",
        "",
        f"- models: {summ['models']}; ORT cannot run {summ['skipped_by_ort']}; ran {summ['ran']}; "
        f"optimized {summ['optimized']}",
        f"- refused: {len(summ['refused'])} {summ['refused'] or ''}; "
        f"errors: {len(summ['errors'])} {summ['errors'] or ''}",
        f"- optimized outputs differ from the reference (beyond what the original achieves): "
        f"{len(summ['reference_mismatches'])} {summ['reference_mismatches'] or ''}",
        f"- nodes: {summ['nodes_before']} -> onnxopt {summ['nodes_after']}, onnxslim {summ['onnxslim_nodes']} "
        f"(models where onnxopt has more nodes than onnxslim: {len(summ['above_onnxslim'])}, "
        f"fewer: {summ['below_onnxslim']})",
        f"- onnxslim's default settings crash on {summ['onnxslim_default_crashes']} models (opset < 7: its "
        f"symbolic shape inference returns None); those ran with `no_shape_infer=True`",
        "",
    ]
    above = {m: (a, b) for m, (a, b) in summ["above_onnxslim"].items()}
    if above:
        by_model = {r["model"]: r for r in rows}
        lines += [
            "Where onnxopt keeps more nodes than onnxslim: " + ", ".join(
                f"{m} {a} vs {b} ({by_model[m].get('bytes_after', '?')} B vs "
                f"{by_model[m].get('onnxslim_bytes', '?')} B)" for m, (a, b) in above.items()) + ".",
            "",
            "The `light_*` models are the real networks with every weight replaced by a "
            "`ConstantOfShape` fill (to keep the wheel small).  onnxslim materializes every fill and "
            "then fuses BatchNormalization (and the Mul/Add after it) into the Conv weights; "
            "fold-constants' size guard keeps a fill above the budget as its `ConstantOfShape` "
            "node (dedup + cse leave one per distinct shape and value), and fuse-affine does not "
            "fuse into a Conv whose weight is not an initializer.  The difference is those fill "
            "nodes plus the unfused BatchNormalization/Mul/Add nodes.",
            "",
        ]
    lines += [
        "| model | status | nodes | onnxopt | onnxslim | bytes | onnxopt bytes | onnxslim bytes "
        "| original vs ref | onnxopt vs ref | onnxslim vs ref | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        def mark(flag, why=None):
            return "" if flag is None else ("ok" if flag else f"**differs** ({why})")
        orig = "" if r["status"] == "skipped" else ("ok" if not r.get("original_vs_reference") else
                                                    f"misses ({r['original_vs_reference']})")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["status"], r["nodes_before"], r.get("nodes_after", ""),
            r.get("onnxslim_nodes", r.get("onnxslim", "")), r["bytes_before"], r.get("bytes_after", ""),
            r.get("onnxslim_bytes", ""), orig, mark(r.get("reference_ok"), r.get("reference_mismatch")),
            mark(r.get("onnxslim_reference_ok"), r.get("onnxslim_mismatch")),
            (r.get("reason") or "").replace("|", "\\|")[:160]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default=",".join(KINDS))
    ap.add_argument("--only", nargs="*", help="substrings of model names")
    ap.add_argument("--out", type=Path, default=None,
                    help="write JSON here and the Markdown table beside it (.md); without it, print only")
    ap.add_argument("--no-onnxslim", action="store_true")
    args = ap.parse_args(argv)
    from onnxopt import benchmark as bench
    print(bench.machine_line(), flush=True)
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(4)
    rows = []
    with tempfile.TemporaryDirectory(prefix="backend-suite-") as tmp:
        for kind, path in case_paths(args.kind.split(",")):
            if args.only and not any(s in f"{kind}/{path.name}" for s in args.only):
                continue
            case = load_case(kind, path)
            t0 = time.perf_counter()
            row = run_case(case, Path(tmp), not args.no_onnxslim)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(f"{row['model']:<58} {row['status']:<8} {row['nodes_before']:>5} -> "
                  f"{row.get('nodes_after', '-')!s:>5}  slim {row.get('onnxslim_nodes', '-')!s:>5}  "
                  f"ref {'' if row.get('reference_ok') is None else ('ok' if row['reference_ok'] else 'DIFF')}"
                  f"{'(orig misses)' if row.get('original_vs_reference') else ''}  {row['seconds']:.1f}s  "
                  f"{row.get('reason') or row.get('reference_mismatch') or ''}"[:220], flush=True)
    summ = summary(rows)
    print(json.dumps(summ, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summ, "models": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(rows, summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The summary fields ``onnxopt batch`` reads from one command's JSON report: node counts and sizes
before and after, the validation (lossless commands: max abs diff; lossy ones and convert: the budget's
metric and drop; validate: per EP) and latency ratios."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def summary_fields(command: str, report: dict | None, opts: Mapping[str, Any]) -> dict:
    """The summary fields found in one command's JSON report."""
    out: dict[str, Any] = {}
    if not report:
        return out
    inp, outp = report.get("input") or {}, report.get("output") or {}
    out["nodes_before"], out["nodes_after"] = inp.get("nodes"), outp.get("nodes")
    if inp.get("file_bytes") is not None:
        out["size_before"] = inp["file_bytes"]
    out["size_after"] = outp.get("file_bytes")
    ep = str(opts.get("ep") or "cpu").split(",")[0]
    v = report.get("validation")
    if command == "convert" and report.get("accuracy"):  # convert --fp16 is judged by its budget
        command = "quantize"  # (summarized as the lossy commands are, below)
    if command in ("optimize", "convert") and v:  # lossless (fp16: its tolerances): outputs compared
        out["validation"] = {"status": "ok" if v.get("ok") else "diverged", "max_abs": v.get("max_abs"),
                             "metric": "allclose", "value": v.get("max_abs")}
        if v.get("latency_ref_ms") and v.get("latency_new_ms"):
            out["latency_ratio"] = {ep: v["latency_ref_ms"] / v["latency_new_ms"]}
    elif command in ("optimize", "convert"):
        out["validation"] = {"status": "skipped"}
    elif command in ("quantize", "prune", "compress"):  # lossy: a metric within a budget
        acc, lat = report.get("accuracy") or {}, report.get("latency") or {}
        if acc:
            value = next((acc[k] for k in ("quantized", "pruned", "compressed", "converted") if k in acc), None)
            out["validation"] = {"status": "ok" if acc.get("drop", 0) <= acc.get("max_drop", float("inf")) else "over budget",
                                 "max_abs": None, "metric": acc.get("metric"), "value": value,
                                 "float": acc.get("float"), "drop": acc.get("drop")}
        if lat.get("speedup"):
            out["latency_ratio"] = {report.get("ep") or ep: lat["speedup"]}
    elif command == "validate":
        comp = report.get("comparison") or {}
        outputs = [o for r in (comp.get("per_ep") or {}).values() for o in r.get("outputs", [])]
        max_abs = max((o.get("max_abs") or 0 for o in outputs), default=None)
        out["validation"] = {"status": "ok" if comp.get("ok") else "diverged", "max_abs": max_abs,
                             "metric": report.get("tolerance"), "value": max_abs,
                             "per_ep": {e: r.get("ok") for e, r in (comp.get("per_ep") or {}).items()}}
    elif command == "bench":
        results = report.get("results") or []
        first = results[0]["model"] if results else None
        ratios = {}
        for r in results:  # speedup_vs_first is the first model's p50 / this one's: above 1, B is faster
            if r.get("model") != first and r.get("speedup_vs_first"):
                ratios[r["ep"]] = r["speedup_vs_first"]
        if ratios:
            out["latency_ratio"] = ratios
        out["latency_p50_ms"] = {f"{'input' if r.get('model') == first else 'result'}@{r['ep']}": r.get("p50_ms")
                                 for r in results}
    return out

"""Report dicts -> JSON or Markdown files (written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from onnxopt import io
from onnxopt.errors import BadInputError, UsageError

FORMATS = (".json", ".md")


def check_path(path: str | os.PathLike) -> None:
    """Fail early (before any work) on a report path we cannot write."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise UsageError(f"--report {p}: unsupported format '{p.suffix}' (use {' or '.join(FORMATS)})")
    try:
        io.check_writable(p)
    except BadInputError as e:
        raise BadInputError(f"--report {e}") from None


def write(report: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    text = json.dumps(report, indent=2, default=str) + "\n" if p.suffix.lower() == ".json" else markdown(report)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxopt-report-", dir=p.parent if str(p.parent) else ".")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as e:
        raise BadInputError(f"--report {p}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def markdown(report: dict) -> str:
    inp, out = report["input"], report.get("output", {})
    lines = [
        "# onnxopt optimize report", "",
        f"- input: `{inp['path']}`", f"- output: `{out.get('path', '-')}`"
        + ("" if report.get("written") else " (**not written**)"),
        f"- pipeline: `{report['pipeline']}` ({report['iterations']} iteration(s), "
        f"{'converged' if report['converged'] else 'did not converge'})",
        f"- time: {report.get('seconds', 0):.2f} s (passes {report['optimize_seconds']:.2f} s)", "",
        "| | nodes | initializers | weights | file |", "|---|---:|---:|---:|---:|",
        f"| before | {inp['nodes']} | {inp['initializers']} | {_mb(inp['weight_bytes'])} | {_mb(inp.get('file_bytes'))} |",
    ]
    if out:
        lines.append(f"| after | {out['nodes']} | {out['initializers']} | {_mb(out['weight_bytes'])} | {_mb(out.get('file_bytes'))} |")
    lines += ["", "## Passes", "", "| pass | changed | skipped (reason: count) |", "|---|---|---|"]
    for name, entry in report["passes"].items():
        changed = ", ".join(f"{k}: {v}" for k, v in entry["changed"].items()) or "-"
        skipped = ", ".join(f"{k}: {v}" for k, v in entry["skipped"].items()) or "-"
        lines.append(f"| `{name}` | {changed} | {skipped} |")
    ops_before, ops_after = inp["ops"], out.get("ops", {})
    lines += ["", "## Op types", "", "| op | before | after |", "|---|---:|---:|"]
    for op in sorted(set(ops_before) | set(ops_after), key=lambda o: -ops_before.get(o, 0)):
        lines.append(f"| {op} | {ops_before.get(op, 0)} | {ops_after.get(op, 0)} |")
    v = report.get("validation")
    lines += ["", "## Validation (ONNX Runtime, CPU)", ""]
    if not v:
        lines.append("Not run (`--no-validate`).")
    else:
        tol = v["tolerance"]
        lines.append(f"Result: **{'pass' if v['ok'] else 'FAIL'}** (rtol {tol['rtol']:g}, atol {tol['atol']:g})")
        if v.get("latency_ref_ms"):
            lines.append(f"; median latency {v['latency_ref_ms']:.3f} ms -> {v['latency_new_ms']:.3f} ms "
                         f"({v['latency_ref_ms'] / max(v['latency_new_ms'], 1e-9):.2f}x)")
        lines += ["", "| output | shape | dtype | max abs | max rel | ok | note |", "|---|---|---|---:|---:|---|---|"]
        for o in v["outputs"]:
            lines.append(f"| {o['name']} | {tuple(o['shape_ref'])} | {o['dtype']} | {o['max_abs']:.3g} | "
                         f"{o['max_rel']:.3g} | {'yes' if o['ok'] else 'NO'} | {o['reason']} |")
    return "\n".join(lines) + "\n"

"""Report dicts -> JSON, Markdown or one self-contained HTML file (written atomically).

Every report is a dict with ``"command"`` in optimize / validate / bench / quantize; its JSON form follows
``docs/report.schema.json``.  HTML embeds its SVG plots (onnxopt.plots) and style: no network.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from onnxopt import io, plots
from onnxopt.errors import BadInputError, UsageError
from onnxopt.plots import SORT_JS as _SORT_JS
from onnxopt.plots import page as _page
from onnxopt.plots import sortable_cell as _batch_cell
from onnxopt.plots import status as _status
from onnxopt.plots import table as _table

FORMATS = (".json", ".md", ".html")


def check_path(path: str | os.PathLike) -> None:
    """Fail early (before any work) on a report path we cannot write."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise UsageError(f"--report {p}: unsupported format '{p.suffix}' (use {', '.join(FORMATS)})")
    try:
        io.check_writable(p)
    except BadInputError as e:
        raise BadInputError(f"--report {e}") from None


def render(report: dict, suffix: str) -> str:
    suffix = suffix.lower()
    if suffix == ".json":
        return json.dumps(report, indent=2, default=str, allow_nan=False) + "\n"
    renderers = {".md": MARKDOWN, ".html": HTML}[suffix]
    fallback = _generic_markdown if suffix == ".md" else _generic_html
    return renderers.get(report["command"], fallback)(report)


def _generic_markdown(report: dict) -> str:
    """A command without a report layout of its own (inspect): its JSON, fenced."""
    return f"# onnxopt {report['command']}\n\n```json\n{json.dumps(report, indent=2, default=str)}\n```\n"


def _generic_html(report: dict) -> str:
    return _page(f"onnxopt {report['command']}", f"<pre>{html.escape(json.dumps(report, indent=2, default=str))}</pre>")


def write(report: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    text = render(_json_safe(report), p.suffix)
    tmp = None
    try:
        folder = p.parent if str(p.parent) else Path(".")
        io.remove_stale_staging(folder)  # leftovers of a killed run are removed like the model's
        fd, tmp = tempfile.mkstemp(prefix=io.staging_prefix() + "report-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, p)
    except OSError as e:
        raise BadInputError(f"--report {p}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_safe(obj):
    """inf/nan -> strings so the JSON is standard (a perfect SNR is +inf dB)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _num(v, fmt=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt)


# ---------------------------------------------------------------- Markdown

def _md_outputs(outputs: list[dict]) -> list[str]:
    lines = ["| output | shape | dtype | max abs | max rel | cosine | SNR dB | top-1 | ok | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for o in outputs:
        lines.append(f"| {o['name']} | {tuple(o['shape_ref'])} | {o['dtype']} | {_num(o['max_abs'])} | "
                     f"{_num(o['max_rel'])} | {_num(o.get('cosine'), '.6f')} | {_num(o.get('snr_db'), '.1f')} | "
                     f"{_num(o.get('top1'), '.3f')} | {'yes' if o['ok'] else 'NO'} | {o['reason']} |")
    return lines


def _md_points(points: list[dict]) -> list[str]:
    """The input points validation ran on (see validate.variation_points)."""
    if not points:
        return []
    lines = ["Inputs exercised:", "", "| point | input shapes | status |", "|---|---|---|"]
    for p in points:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in p["shapes"].items())
        lines.append(f"| {p['label']} | {shapes or '-'} | {p['status']}{': ' + p['reason'] if p.get('reason') else ''} |")
    return lines


def _points_html(points: list[dict]) -> str:
    if not points:
        return ""
    return "<p>Inputs exercised:</p>" + _table(["point", "input shapes", "status"], [
        [html.escape(p["label"]), html.escape(", ".join(f"{k} {tuple(v)}" for k, v in p["shapes"].items()) or "-"),
         html.escape(p["status"] + (": " + p["reason"] if p.get("reason") else ""))] for p in points])


def _md_cost(cost: dict | None, title: str) -> list[str]:
    if not cost:
        return []
    lines = ["", f"## Cost ({title})", "",
             f"{cost['macs']:,} MACs, {cost['flops']:,} FLOPs, peak activations {_mb(cost['peak_activation_bytes'])}"
             + (f" ({len(cost['unknown_nodes'])} nodes with unknown shapes)" if cost["unknown_nodes"] else ""), "",
             "| op | count | MACs | FLOPs |", "|---|---:|---:|---:|"]
    for op, e in cost["by_op"].items():
        lines.append(f"| {op} | {e['count']} | {e['macs']:,} | {e['flops']:,} |")
    return lines


def markdown_optimize(report: dict) -> str:
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
    for m in report.get("declared_output_shape_mismatches", []):
        lines.append(f"\n> output `{m['output']}` is declared {m['declared']} but the model produces {m['actual']}")
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
        lines += [""] + _md_outputs(v["outputs"]) + [""] + _md_points(v.get("points", []))
    lines += _md_cost(inp.get("cost"), "before") + _md_cost(out.get("cost"), "after")
    return "\n".join(lines) + "\n"


def markdown_validate(report: dict) -> str:
    lines = ["# onnxopt validate report", "", f"- A (reference): `{report['a']}`", f"- B (candidate): `{report['b']}`",
             f"- tolerance: {report['tolerance']}", f"- batches: {report['comparison']['batches']}",
             f"- result: **{'pass' if report['comparison']['ok'] else 'FAIL'}**"]
    for ep, r in report["comparison"]["per_ep"].items():
        lines += ["", f"## {ep}", ""] + _md_outputs(r["outputs"])
    lw = report.get("layerwise")
    if lw:
        first = lw["first_divergence"]
        lines += ["", "## Layerwise", "", f"{lw['pairs']} of {lw['values_in_b']} intermediate values paired."]
        lines.append(f"First divergence: node `{first['node']}` ({first['op_type']}), value `{first['value_b']}`, "
                     f"max abs {first['max_abs']:.3g}" if first else "No divergence inside the graph.")
    return "\n".join(lines) + "\n"


def _labels(report: dict) -> dict[str, str]:
    from onnxopt.benchmark import labels
    return labels([r["model"] for r in report["results"]])


def _vs_cpu(r: dict) -> str:
    """Speed-up against the first model on the CPU EP (the cross-EP ratio users ask for)."""
    return f"{r['speedup_vs_cpu_first']:.2f}x" if r.get("speedup_vs_cpu_first") is not None else "-"


def markdown_bench(report: dict) -> str:
    label = _labels(report)
    lines = ["# onnxopt bench report", "", f"- threads: {report['threads']}, warm-up {report['warmup']}, runs {report['runs']}", "",
             "| model | EP | batch | p50 ms | p90 ms | p99 ms | mean ms | std | samples/s | load ms | RSS MB | vs first "
             "| vs cpu first |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {label[r['model']]} | {r['ep']} | {r['batch'] or '-'} | {r['p50_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['std_ms']:.3f} | "
                     f"{r['throughput']:.1f} | {r['load_ms']:.1f} | {r['rss_mb']:.1f} | {r['speedup_vs_first']:.2f}x | "
                     f"{_vs_cpu(r)} |")
    return "\n".join(lines) + "\n"



def _quantize_rows(report: dict) -> tuple[list[list], list[list]]:
    """The summary rows and the latency-guard rows (kind/layer, int8 ms, float ms, time ratio int8/float
    with its interval, pairs, verdict, kept) of a quantize report."""
    acc, lat, r, ep = report["accuracy"], report["latency"], report["recipe"], report["ep"]
    final = f", {lat['verdict']} vs fp32" if lat.get("verdict") else ""
    summary = [["metric", acc["metric"]], ["float score", _num(acc["float"], ".5f")],
               ["quantized score", _num(acc["quantized"], ".5f")],
               ["drop (budget)", f"{_num(acc['drop'], '.5f')} ({acc['max_drop']:g})"],
               [f"latency float -> int8 on {ep}", f"{_num(lat['float_ms'])} -> {_num(lat['quantized_ms'])} ms "
                                                  f"({_num(lat['speedup'], '.2f')}x, {lat['threads']} thread{final})"],
               ["layers int8 / float", f"{r['quantized_layers']} / {len(r['float_layers'])}"],
               ["method", report["method"] + (f" p={report['percentile']}" if report.get("percentile") else "")],
               ["weights", (f"int4 blocks of {r.get('block_size')} ({r.get('rounding')})" if report.get("mode") == "weight-only"
                            else f"int{report['weight_bits']} {'per-channel' if report['per_channel'] else 'per-tensor'}")
                + f", activations {report['activation_type']}" + (f", mode {report['mode']}" if report.get("mode") else "")],
               ["recovery", ", ".join(r["recovery"]) or "none"],
               ["calibration", f"{report['calibration']['batches']} batches ({report['calibration']['held_out']} held out), "
                               f"{report['calibration']['tensors']} tensors, {report['calibration']['bins']} bins"],
               ["recipe", f"replayed from {r['replayed_from']}" if r.get("replayed_from") else
                ("searched (latency guard on " + ep + ", accuracy budget)" if r.get("latency_guard", True)
                 else "searched (accuracy budget; --no-latency-guard)")],
               ["written", "float model (quantizing was not faster on " + ep + ")" if report.get("wrote_float_model") else
                ("yes" if report.get("written") else "no")]]
    decisions = []
    for d in r["latency_decisions"]:
        interval = d.get("interval")
        ratio = _num(d.get("ratio"), ".3f") + (f" [{_num(interval[0], '.3f')}, {_num(interval[1], '.3f')}]" if interval else "")
        decisions.append([d.get("kind") or d.get("layer"), _num(d["quantized_ms"]), _num(d["float_ms"]), ratio,
                          d.get("pairs", "-"), d.get("verdict", "-"), "int8" if d["quantized"] else "float"])
    return summary, decisions


_DECISION_HEADERS = ["kind / layer", "int8 ms", "float ms", "time ratio [95% interval]", "pairs", "verdict", "kept"]
_FIDELITY_HEADERS = ["output", "metric", "why", "agreement [95% interval]", "cosine", "SNR dB", "score"]


def _fidelity_rows(report: dict) -> list[list[str]]:
    """Per output of the default fidelity metric: metric, why, agreement and its interval, cosine, SNR, score."""
    rows = []
    for o in report["accuracy"].get("outputs") or []:
        agreement = "-"
        if o.get("agreement") is not None:
            lo, hi = o.get("agreement_interval") or (None, None)
            agreement = (f"{_num(o['agreement'], '.4f')} [{_num(lo, '.4f')}, {_num(hi, '.4f')}] of {o['positions']}"
                         + (f", judged by {o['judged_by']}" if o.get("judged_by") else ""))
        rows.append([o["name"], o["metric"], o["reason"], agreement, _num(o.get("cosine"), ".6f"),
                     _num(o.get("snr_db"), ".1f"), _num(o["score"], ".5f")])
    return rows


def _float_rows(report: dict) -> list[list[str]]:
    reasons = report["recipe"].get("float_reasons") or {}
    return [[name, reasons.get(name, "-")] for name in report["recipe"]["float_layers"]]


def _md_table(headers: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


_SEARCH_HEADERS = ["#", "candidate", "layers float", "score", "drop", "latency ms", "bytes", "front", "chosen"]


def _search_rows(report: dict) -> list[list[str]]:
    """One row per ``--search`` candidate (empty without a search)."""
    found = report.get("search") or {}
    return [[str(c["id"]), c["label"], str(len(c["recipe"]["float_layers"])), _num(c["accuracy"], ".5f"),
             _num(c["drop"], ".4g") + ("" if c["meets_budget"] else " (over budget)"), _num(c["latency_ms"], ".4g"),
             str(c["bytes"]), "yes" if c["on_front"] else "", "**chosen**" if c["chosen"] else ""]
            for c in found.get("candidates", [])]


def _search_intro(report: dict) -> str:
    found = report["search"]
    return (f"{found['evaluated'] - 1} candidate recipes (budget {found['budget']}) and the float model, calibrated "
            f"once; latency on {report['ep']} measured round-robin in one process (median, "
            f"{report['latency']['threads']} thread); chosen: the fastest on the Pareto front (accuracy up, latency "
            f"and size down) within --max-drop {found['max_drop']:g}.")


def markdown_quantize(report: dict) -> str:
    summary, decisions = _quantize_rows(report)
    lines = [f"# onnxopt quantize: {os.path.basename(report['input']['path'])}", "", "| | |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in summary]
    if report["notes"]:
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    fidelity = _fidelity_rows(report)
    if fidelity:
        lines += ["", "## Fidelity per output", ""] + _md_table(_FIDELITY_HEADERS, fidelity)
    if decisions:
        lines += ["", f"## Latency guard ({report['ep']})", ""] + _md_table(_DECISION_HEADERS, decisions)
    floats = _float_rows(report)
    if floats:
        lines += ["", "## Layers kept float", ""] + _md_table(["layer", "why"], floats)
    if report.get("search"):
        lines += ["", "## Search", "", _search_intro(report), ""] + _md_table(_SEARCH_HEADERS, _search_rows(report))
    sens = report["recipe"]["sensitivity"]
    if sens:
        lines += ["", "## Sensitivity (drop with only this layer quantized)", ""] + _md_table(
            ["layer", "kind", "drop", "kept float"],
            [[s["layer"], s["kind"], _num(s["drop"], ".5f"), "yes" if s.get("kept_float") else ""] for s in sens])
    return "\n".join(lines) + "\n"


def html_quantize(report: dict) -> str:
    summary, decisions = _quantize_rows(report)
    ep = report["ep"]
    parts = [_table(["", "value"], [[html.escape(str(a)), html.escape(str(b))] for a, b in summary])]
    if report["notes"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    fidelity = _fidelity_rows(report)
    if fidelity:
        parts.append("<h2>Fidelity per output</h2>" + _table(_FIDELITY_HEADERS, [[html.escape(str(c)) for c in row]
                                                                                for row in fidelity]))
    lat = report["latency"]
    parts.append(plots.bars(f"Latency on {ep} (ms, median)", ["model"],
                            {"float": [lat["float_ms"]], "int8": [lat["quantized_ms"]]}))
    if decisions:
        parts.append(f"<h2>Latency guard ({html.escape(ep)})</h2>" + _table(
            _DECISION_HEADERS, [[html.escape(str(c)) for c in row] for row in decisions]))
        parts.append(plots.bars(f"Latency guard on {ep}: model latency (ms) with each kind / layer int8 vs float",
                                [str(d[0]) for d in decisions],
                                {"float": [float(d["float_ms"]) for d in report["recipe"]["latency_decisions"]],
                                 "int8": [float(d["quantized_ms"]) for d in report["recipe"]["latency_decisions"]]}))
    floats = _float_rows(report)
    if floats:
        parts.append("<h2>Layers kept float</h2>" + _table(["layer", "why"], [[html.escape(a), html.escape(b)]
                                                                              for a, b in floats]))
    if report.get("search"):
        rows = [[html.escape(c) if c != "**chosen**" else "<b>chosen</b>" for c in row] for row in _search_rows(report)]
        parts.append("<h2>Search</h2><p>" + html.escape(_search_intro(report)) + "</p>"
                     + plots.scatter("Candidates: accuracy vs latency (Pareto front highlighted, chosen ringed)",
                                     report["search"]["candidates"], x_label=f"latency on {ep} (ms)",
                                     y_label="score")
                     + _table(_SEARCH_HEADERS, rows))
    sens = report["recipe"]["sensitivity"]
    if sens:
        parts.append("<h2>Sensitivity</h2>" + plots.bars("Metric drop with only this layer quantized",
                                                          [s["layer"] for s in sens][:30],
                                                          {"drop": [max(s["drop"], 0.0) for s in sens][:30]}))
    return _page(f"onnxopt quantize: {os.path.basename(report['input']['path'])}", "".join(parts))

MARKDOWN: dict[str, Callable[[dict], str]] = {"optimize": markdown_optimize, "validate": markdown_validate, "bench": markdown_bench,
            "quantize": markdown_quantize}


# ---------------------------------------------------------------- HTML

def _outputs_table(outputs: list[dict]) -> str:
    return _table(["output", "shape", "dtype", "max abs", "max rel", "cosine", "SNR dB", "top-1", "result", "note"],
                  [[html.escape(o["name"]), html.escape(str(tuple(o["shape_ref"]))), o["dtype"], _num(o["max_abs"]),
                    _num(o["max_rel"]), _num(o.get("cosine"), ".6f"), _num(o.get("snr_db"), ".1f"),
                    _num(o.get("top1"), ".3f"), _status(o["ok"]), html.escape(o["reason"])] for o in outputs])


def _cost_plot(before: dict | None, after: dict | None) -> str:
    if not before:
        return ""
    ops = list(dict.fromkeys(list(before["by_op"]) + list((after or {}).get("by_op", {}))))[:20]
    series = {"before": [before["by_op"].get(o, {}).get("flops", 0) for o in ops]}
    if after:
        series["after"] = [after["by_op"].get(o, {}).get("flops", 0) for o in ops]
    text = (f"<p>{before['macs']:,} MACs / {before['flops']:,} FLOPs, peak activations "
            f"{_mb(before['peak_activation_bytes'])}" + (f" &rarr; {after['macs']:,} MACs / {after['flops']:,} FLOPs, "
                                                        f"peak {_mb(after['peak_activation_bytes'])}" if after else "") + "</p>")
    return text + plots.bars("FLOPs by op type", ops, series, log=True)


def html_optimize(report: dict) -> str:
    inp, out = report["input"], report.get("output", {})
    parts = [_table(["", "nodes", "initializers", "weights", "file"],
                    [["before", inp["nodes"], inp["initializers"], _mb(inp["weight_bytes"]), _mb(inp.get("file_bytes"))]]
                    + ([["after", out["nodes"], out["initializers"], _mb(out["weight_bytes"]), _mb(out.get("file_bytes"))]]
                       if out else [])),
             f"<p>pipeline <code>{html.escape(report['pipeline'])}</code>, {report['iterations']} iteration(s), "
             f"{report.get('seconds', 0):.2f} s; output {'written' if report.get('written') else '<b>not written</b>'}</p>"]
    ops = sorted(set(inp["ops"]) | set(out.get("ops", {})), key=lambda o: -inp["ops"].get(o, 0))[:24]
    parts.append(plots.bars("Nodes by op type", ops, {"before": [inp["ops"].get(o, 0) for o in ops],
                                                      "after": [out.get("ops", {}).get(o, 0) for o in ops]}))
    parts.append("<h2>Passes</h2>" + _table(["pass", "changed", "skipped"], [
        [f"<code>{html.escape(n)}</code>", html.escape(", ".join(f"{k}: {v}" for k, v in e["changed"].items()) or "-"),
         html.escape(", ".join(f"{k}: {v}" for k, v in e["skipped"].items()) or "-")] for n, e in report["passes"].items()]))
    v = report.get("validation")
    parts.append("<h2>Validation</h2>" + (_outputs_table(v["outputs"]) + _points_html(v.get("points", []))
                                          if v else "<p>not run</p>"))
    cost = _cost_plot(inp.get("cost"), out.get("cost"))
    if cost:
        parts.append("<h2>Cost</h2>" + cost)
    return _page(f"onnxopt optimize: {os.path.basename(inp['path'])}", "".join(parts))


def html_validate(report: dict) -> str:
    comp = report["comparison"]
    parts = [f"<p>A (reference) <code>{html.escape(report['a'])}</code>, B <code>{html.escape(report['b'])}</code>, "
             f"tolerance {html.escape(report['tolerance'])}, {comp['batches']} batch(es): {_status(comp['ok'])}</p>"]
    for ep, r in comp["per_ep"].items():
        parts.append(f"<h2>{html.escape(ep)}</h2>" + _outputs_table(r["outputs"]))
        samples = report.get("error_samples", {}).get(ep, {})
        if samples:
            parts.append(plots.histogram(f"|A - B| per output ({ep})", samples, log_x=True))
    lw = report.get("layerwise")
    if lw:
        layers = lw["layers"]
        first = lw["first_divergence"]
        mark = next((i for i, r in enumerate(layers) if not r["ok"]), None)
        parts.append("<h2>Layerwise</h2>" + f"<p>{lw['pairs']} of {lw['values_in_b']} intermediate values paired; "
                     + (f"first divergence at node <code>{html.escape(first['node'])}</code> ({html.escape(first['op_type'])}),"
                        f" value <code>{html.escape(first['value_b'])}</code>, max abs {first['max_abs']:.3g}</p>"
                        if first else "no divergence inside the graph.</p>"))
        parts.append(plots.line("max |A - B| along the graph", [f"{r['op_type']} {r['value_b']}" for r in layers],
                                [r["max_abs"] for r in layers], log=True, mark=mark))
    return _page(f"onnxopt validate: {os.path.basename(report['a'])} vs {os.path.basename(report['b'])}", "".join(parts))


def html_bench(report: dict) -> str:
    results = report["results"]
    label = _labels(report)
    rows = [[html.escape(label[r["model"]]), r["ep"], r["batch"] or "-", round(r["p50_ms"], 3),
             round(r["p90_ms"], 3), round(r["p99_ms"], 3), round(r["mean_ms"], 3), round(r["std_ms"], 3),
             round(r["throughput"], 1), round(r["load_ms"], 1), round(r["rss_mb"], 1), f"{r['speedup_vs_first']:.2f}x",
             _vs_cpu(r)] for r in results]
    parts = [f"<p>threads {report['threads']}, warm-up {report['warmup']}, runs {report['runs']}</p>",
             _table(["model", "EP", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std", "samples/s", "load ms",
                     "RSS MB", "vs first", "vs cpu first"], rows)]
    groups: dict[str, dict[str, list[float]]] = {}
    for r in results:
        groups.setdefault(f"{r['ep']} batch {r['batch'] or '-'}", {})[label[r["model"]]] = r.get("times_ms", [])
    for title, samples in groups.items():
        parts.append(plots.histogram(f"Latency distribution (ms), {title}", dict(samples)))
    return _page("onnxopt bench", "".join(parts))


HTML: dict[str, Callable[[dict], str]] = {"optimize": html_optimize, "validate": html_validate, "bench": html_bench,
                                          "quantize": html_quantize}


# --- batch summary (onnxopt batch) -------------------------------------------------------------

def batch_rows(summary: dict) -> list[dict]:
    """Per model: name, status, reason, seconds, nodes, sizes, size ratio, speed-up, validation."""
    rows = []
    for e in summary.get("models", []):
        before, after = e.get("size_before"), e.get("size_after")
        lat = e.get("latency_ratio") or {}
        v = e.get("validation") or {}
        rows.append({"name": e["name"], "status": e["status"], "finished": e.get("finished_status") or e["status"],
                     "reason": e.get("reason") or "", "exit_code": e.get("exit_code"), "seconds": e.get("seconds"),
                     "nodes_before": e.get("nodes_before"), "nodes_after": e.get("nodes_after"),
                     "size_before": before, "size_after": after,
                     "size_ratio": after / before if before and after else None,
                     "speedup": next(iter(lat.values()), None) if lat else None, "speedup_ep": next(iter(lat), None),
                     "validation": v.get("status"), "max_abs": v.get("max_abs"), "metric_value": v.get("value")})
    return rows


def html_batch(summary: dict) -> str:
    """One page: totals, a sortable table (inline JS), size-ratio and speed-up charts (plots.bars)."""
    rows = batch_rows(summary)
    totals = summary.get("totals", {})
    cls = {"ok": "ok", "failed": "bad", "refused": "bad"}
    body = []
    for r in rows:
        status = r["status"] + (f" ({r['finished']})" if r["status"] == "skipped" else "")
        body.append(
            "<tr>" + _batch_cell(r["name"])
            + f'<td data-v="{html.escape(r["status"])}"><span class="{cls.get(r["finished"], "")}">{html.escape(status)}</span></td>'
            + _batch_cell(r["exit_code"]) + _batch_cell(r["seconds"], _num(r["seconds"], ".2f"))
            + _batch_cell(r["nodes_before"]) + _batch_cell(r["nodes_after"])
            + _batch_cell(r["size_before"], _mb(r["size_before"])) + _batch_cell(r["size_after"], _mb(r["size_after"]))
            + _batch_cell(r["size_ratio"], _num(r["size_ratio"], ".3f"))
            + _batch_cell(r["speedup"], "-" if r["speedup"] is None else f"{r['speedup']:.2f}x {r['speedup_ep']}")
            + _batch_cell(r["validation"]) + _batch_cell(r["max_abs"], _num(r["max_abs"]))
            + _batch_cell(r["reason"]) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "status", "exit", "seconds", "nodes before", "nodes after",
                                             "size before", "size after", "size ratio", "speed-up", "validation",
                                             "max abs", "reason"))
    table = f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    sized = [r for r in rows if r["size_ratio"] is not None]
    fast = [r for r in rows if r["speedup"] is not None]
    parts = [f"<p>command <code>{html.escape(str(summary.get('batch_command')))}</code>, "
             + ", ".join(f"{k} {v}" for k, v in totals.items()) + "</p>", table]
    parts.append(plots.bars("Size after / before (lower is smaller)", [r["name"] for r in sized],
                            {"size ratio": [r["size_ratio"] for r in sized]}))
    parts.append(plots.bars("Speed-up (reference latency / new latency)", [r["name"] for r in fast],
                            {"speed-up": [r["speedup"] for r in fast]}))
    parts.append(f"<script>{_SORT_JS}</script>")
    return _page(f"onnxopt batch: {summary.get('outdir', '')}", "".join(parts))


HTML["batch"] = html_batch


# ---------------------------------------------------------------- convert (fp16)

def _convert_summary(report: dict) -> list[tuple[str, str]]:
    c, inp, out, r = report["conversion"], report["input"], report.get("output") or {}, report["ranges"]
    v = report.get("validation")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(c["kept_fp32_by_kind"].items())) or "-"
    init = ", ".join(f"{k} {n}" for k, n in c["initializers"].items() if n) or "-"
    return [("output", f"{out.get('path', '-')}" + ("" if report.get("written") else " (not written)")),
            ("nodes fp16 / kept fp32", f"{c['fp16_nodes']} / {c['fp32_nodes']} ({kinds})"),
            ("Casts", f"{inp.get('casts', inp['ops'].get('Cast', 0))} -> {out.get('casts', out.get('ops', {}).get('Cast', 0))} "
                      f"({c['casts_inserted']} inserted, {c['casts_folded']} folded, {c['lossy_cast_pairs_kept']} "
                      f"lossy pairs kept)"),
            ("file size", f"{_mb(inp.get('file_bytes'))} -> {_mb(out.get('file_bytes'))} "
                          f"({_num(report.get('size_ratio'), '.3f')}x)"),
            ("keep io types", str(report["keep_io_types"])),
            ("op block list", ", ".join(report["op_block_list"]) or "-"),
            ("node block list", ", ".join(report["node_block_list"]) or "-"),
            ("initializers", init),
            ("ranges", f"{r['tensors']} tensors from {'--data' if r['source'] == 'data' else 'SYNTHESIZED inputs'}, "
                       f"{r['batches']} batch(es); {r['over_limit']} over the limit {r['limit']:g}, "
                       f"{r['over_fp16_max']} over 65504"),
            ("validation", "not run" if not v else
             f"{'pass' if v['ok'] else 'FAIL'} (CPU EP, rtol {v['tolerance']['rtol']:g} atol {v['tolerance']['atol']:g}, "
             f"{v.get('materialized_fp16_tensors', 0)} fp16 tensors checked for inf/NaN, "
             f"{len(v.get('nonfinite_fp16_tensors') or {})} non-finite)")]


def _kept_rows(report: dict) -> list[list[str]]:
    return [[k["node"] or "-", k["op"], k["kind"], k["reason"]] for k in report["conversion"]["kept_fp32"]]


def markdown_convert(report: dict) -> str:
    lines = [f"# onnxopt convert --fp16: {os.path.basename(report['input']['path'])}", "", "| | |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in _convert_summary(report)]
    if report["notes"]:
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    lines += ["", "## Largest observed tensors", ""] + _md_table(
        ["tensor", "max abs"], [[x["tensor"], _num(x["max_abs"], ".4g")] for x in report["ranges"]["largest"]])
    rows = _kept_rows(report)
    if rows:
        lines += ["", "## Nodes kept in float32", ""] + _md_table(["node", "op", "kind", "why"], rows)
    v = report.get("validation")
    if v:
        lines += ["", "## Validation", ""] + _md_outputs(v["outputs"]) + [""] + _md_points(v.get("points", []))
    return "\n".join(lines) + "\n"


def html_convert(report: dict) -> str:
    parts = [_table(["", "value"], [[html.escape(a), html.escape(b)] for a, b in _convert_summary(report)])]
    if report["notes"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    largest = report["ranges"]["largest"]
    if largest:
        parts.append(plots.bars("Largest observed |x| (log scale; fp16 max 65504)", [x["tensor"] for x in largest],
                                {"max |x|": [max(float(x["max_abs"]), 1e-12) for x in largest]}, log=True))
    rows = _kept_rows(report)
    if rows:
        parts.append("<h2>Nodes kept in float32</h2>" + _table(["node", "op", "kind", "why"],
                                                              [[html.escape(c) for c in row] for row in rows]))
    v = report.get("validation")
    parts.append("<h2>Validation</h2>" + (_outputs_table(v["outputs"]) + _points_html(v.get("points", []))
                                          if v else "<p>not run</p>"))
    return _page(f"onnxopt convert --fp16: {os.path.basename(report['input']['path'])}", "".join(parts))


MARKDOWN["convert"] = markdown_convert
HTML["convert"] = html_convert
# ---------------------------------------------------------------- prune / compress

def _lossy_summary(report: dict) -> list[list[str]]:
    acc = report.get("accuracy") or {}
    rows = [["input", report["input"]["path"]], ["output", (report.get("output") or {}).get("path", "-")],
            ["written", "yes" if report.get("written") else "no"]]
    if acc:
        rows += [["metric", acc["metric"]], ["score", f"{_num(acc['float'], '.4f')} -> {_num(acc['pruned'], '.4f')}"],
                 ["drop / budget", f"{_num(acc['drop'], '.4f')} / {acc['max_drop']:g}"]]
    lat = report.get("latency")
    if lat:
        rows.append([f"latency on {report['ep']}", f"{lat['float_ms']:.3f} -> {lat['pruned_ms']:.3f} ms "
                                                   f"({lat['speedup']:.2f}x, {lat['verdict']})"])
    if report.get("seconds") is not None:
        rows.append(["wall time", f"{report['seconds']:.1f} s"])
    return rows


def _prune_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of a prune/compress report, shared by Markdown and HTML."""
    tables = []
    if report.get("deep_compression"):
        tables.append(("Deep Compression (weight storage)", ["stage", "bytes", "ratio vs original", "score"],
                       [[s["stage"], str(s["bytes"]), f"{s['compression_ratio']:.2f}x", _num(s.get("score"), ".4f")]
                        for s in report["deep_compression"]]))
    if report.get("packed_weights"):
        tables.append(("Weights already stored as integers (kept, counted packed)",
                       ["weight", "op", "bits", "params", "fp32 bytes", "packed bytes", "Huffman bytes"],
                       [[p["weight"], p["op"], str(p["bits"]), str(p["params"]), str(p["float_bytes"]), str(p["bytes"]),
                         str(p["huffman_bytes"])] for p in report["packed_weights"]]))
    if report.get("sizes") and report.get("mode") == "magnitude":
        s = report["sizes"]
        tables.append(("Sizes (real files)", ["", "ONNX file", "gzip -9", "weights as CSR (.npz)"],
                       [[k, str(s[k]["file"]), str(s[k]["gzip"]), str(s[k]["weights_csr_npz"])] for k in ("original", "pruned")]))
    if report.get("layers") and report["command"] == "prune":
        tables.append(("Layers", ["layer", "op", "params", "sparsity", "refit / why dense"],
                       [[r["layer"], r["op"], str(r["params"]), f"{r['sparsity']:.1%}", r.get("refit") or r.get("why", "")]
                        for r in report["layers"]]))
    if report.get("layers") and report["command"] == "compress":
        tables.append(("Layers (weight bytes per stage)",
                       ["layer", "params", "sparsity", "clusters", "fp32", "pruned", "clustered", "Huffman",
                        "Huffman bits / weight", "ratio"],
                       [[r["layer"], str(r["params"]), f"{r['sparsity']:.1%}", str(r["clusters"]),
                         *(str(r["bytes"][k]) for k in ("original", "pruned", "clustered", "huffman")),
                         f"{r['huffman_bits_per_weight']:.2f}", f"{r['compression_ratio']:.1f}x"] for r in report["layers"]]))
    if report.get("groups"):
        tables.append(("Channel groups", ["group", "channels", "kept", "drop", "latency ratio", "kept?"],
                       [[g["group"], str(g.get("channels", "-")), str(g.get("kept", "-")), _num(g.get("drop"), ".4f"),
                         _num((g.get("latency") or {}).get("ratio"), ".3f"), "yes" if g.get("accepted") else g.get("why", "")]
                        for g in report["groups"]]))
    if report.get("unresolved"):
        tables.append(("Groups left untouched", ["group", "reason"], [[u["group"], u["reason"]] for u in report["unresolved"]]))
    return tables


def markdown_prune(report: dict) -> str:
    lines = [f"# onnxopt {report['command']}: {os.path.basename(report['input']['path'])}", "", "| | |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in _lossy_summary(report)]
    for title, headers, rows in _prune_tables(report):
        lines += ["", f"## {title}", ""] + _md_table(headers, rows)
    return "\n".join(lines) + "\n"


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the path prefix they all share (chart labels are cut at 18 characters)."""
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind("/") + 1
    return [n[cut:] or n for n in names]


def html_prune(report: dict) -> str:
    parts = [_table(["", "value"], [[html.escape(str(a)), html.escape(str(b))] for a, b in _lossy_summary(report)])]
    layers = [r for r in report.get("layers") or [] if "sparsity" in r]
    if layers:
        parts.append(plots.bars("Sparsity per layer", _short_names([r["layer"] for r in layers])[:40],
                                {"sparsity": [r["sparsity"] for r in layers][:40]}))
    sized = [r for r in layers if "bytes" in r]
    if sized:
        parts.append(plots.bars("Weight bytes per layer and stage", _short_names([r["layer"] for r in sized])[:40],
                                {k: [float(r["bytes"][k]) for r in sized][:40]
                                 for k in ("original", "pruned", "clustered", "huffman")}, log=True))
    groups = [g for g in report.get("groups") or [] if "kept" in g]
    if groups:
        parts.append(plots.bars("Channels per group: before / after", _short_names([g["group"] for g in groups])[:40],
                                {"before": [float(g["channels"]) for g in groups][:40],
                                 "after": [float(g["kept"] if g.get("accepted") else g["channels"]) for g in groups][:40]}))
    stages = report.get("deep_compression")
    if stages:
        parts.append(plots.bars("Weight storage per stage (bytes)", [s["stage"] for s in stages],
                                {"bytes": [float(s["bytes"]) for s in stages]}, log=True))
        points = [{"latency_ms": s["bytes"] / 1e3, "accuracy": s["score"], "label": s["stage"], "stages": True,
                   "chosen": i == len(stages) - 1} for i, s in enumerate(stages) if s.get("score") is not None]
        parts.append(plots.scatter("Accuracy vs size (the stages in order; the written model ringed)", points,
                                   x_label="weight storage (kB)", y_label="score", highlight="stages"))
    for title, headers, rows in _prune_tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2>" + _table(headers, [[html.escape(str(c)) for c in r] for r in rows]))
    return _page(f"onnxopt {report['command']}: {os.path.basename(report['input']['path'])}", "".join(parts))


MARKDOWN.update(prune=markdown_prune, compress=markdown_prune)
HTML.update(prune=html_prune, compress=html_prune)

"""Small self-contained SVG charts for HTML reports (no plotting library, no network).

Each function returns an ``<svg>`` string: grouped bars, a histogram, a line with an optional
marked point.  Labels are cut to length first, then escaped (so the SVG stays well-formed XML);
linear bars grow from zero (negative values downwards), log bars from the axis floor; log scales
clamp at a floor so zeros stay drawable.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from onnxopt import __version__

PALETTE = ("#2f6db5", "#e07b39", "#3a9b5c", "#b8407a", "#7a5cc2", "#8c8c8c")
W, H = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 72


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _frame(title: str, body: str, legend: Sequence[str] = ()) -> str:
    parts, x = [], LEFT
    for i, name in enumerate(legend):
        label = str(name) if len(str(name)) <= 48 else "..." + str(name)[-45:]
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="17" font-size="11">{_esc(label)}</text>')
        x += 28 + int(6.2 * len(label))
    items = "".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
            f'role="img" aria-label="{_esc(title)}" font-family="sans-serif">'
            f'<title>{_esc(title)}</title><rect width="{W}" height="{H}" fill="white"/>'
            f'<text x="{W - RIGHT}" y="17" font-size="12" text-anchor="end" font-weight="bold">{_esc(title)}</text>'
            f'{items}{body}</svg>')


def _scale(lo: float, hi: float, log: bool):
    if log:
        lo, hi = math.log10(max(lo, 1e-12)), math.log10(max(hi, 1e-12))
    if hi <= lo:
        hi = lo + 1
    span_px = H - TOP - BOTTOM

    def y(v: float) -> float:
        v = math.log10(max(v, 1e-12)) if log else v
        return H - BOTTOM - (v - lo) / (hi - lo) * span_px

    ticks = []
    for i in range(5):
        t = lo + (hi - lo) * i / 4
        ticks.append(10 ** t if log else t)
    return y, ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels with the fewest significant digits (3 to 8) that tell every tick apart (0.995 and 1.005
    are not both "1")."""
    for digits in range(3, 9):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _axes(y, ticks) -> str:
    out = [f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>']
    for t, label in zip(ticks, tick_labels(ticks)):
        out.append(f'<line x1="{LEFT - 4}" y1="{y(t):.1f}" x2="{W - RIGHT}" y2="{y(t):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    return "".join(out)


def bars(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float]], log: bool = False) -> str:
    """Grouped bar chart: one group per category, one bar per series."""
    if not categories:
        return _frame(title, '<text x="50%" y="50%" text-anchor="middle">no data</text>')
    values = [v for vs in series.values() for v in vs]
    if log:
        positive = [v for v in values if v > 0]
        lo = min(positive) / 2 if positive else 1e-12
    else:
        lo = min(0.0, min(values))
    y, ticks = _scale(lo, max(values) or 1, log)
    group = (W - LEFT - RIGHT) / len(categories)
    width = max(2.0, group * 0.8 / max(1, len(series)))
    base = H - BOTTOM if log else y(0.0)  # linear bars grow from zero, up or down
    out = [_axes(y, ticks)]
    for ci, cat in enumerate(categories):
        x0 = LEFT + ci * group + group * 0.1
        for si, (name, vs) in enumerate(series.items()):
            v = vs[ci]
            top = y(v) if (v > 0 or not log) else base
            out.append(f'<rect x="{x0 + si * width:.1f}" y="{min(top, base):.1f}" width="{width:.1f}" '
                       f'height="{abs(base - top):.1f}" fill="{PALETTE[si % len(PALETTE)]}">'
                       f'<title>{_esc(cat)} / {_esc(name)}: {v:.4g}</title></rect>')
        cx = LEFT + ci * group + group / 2
        out.append(f'<text x="{cx:.1f}" y="{H - BOTTOM + 12}" font-size="10" text-anchor="end" '
                   f'transform="rotate(-40 {cx:.1f} {H - BOTTOM + 12})">{_esc(str(cat)[:18])}</text>')
    return _frame(title, "".join(out), list(series))


def histogram(title: str, samples: Mapping[str, Sequence[float]], bins: int = 30, log_x: bool = False) -> str:
    """Overlaid histograms (counts) of one or more samples on a shared x range."""
    values = [v for vs in samples.values() for v in vs if math.isfinite(v)]
    if not values:
        return _frame(title, '<text x="50%" y="50%" text-anchor="middle">no data</text>')
    if log_x and not any(values):
        return _frame(title, '<text x="50%" y="50%" text-anchor="middle">all differences are exactly 0</text>')
    tx = (lambda v: math.log10(max(v, 1e-12))) if log_x else (lambda v: v)
    lo, hi = min(map(tx, values)), max(map(tx, values))
    if hi <= lo:
        hi = lo + 1
    counts = {}
    for name, vs in samples.items():
        c = [0] * bins
        for v in vs:
            if math.isfinite(v):
                c[min(bins - 1, int((tx(v) - lo) / (hi - lo) * bins))] += 1
        counts[name] = c
    y, ticks = _scale(0, max(max(c) for c in counts.values()) or 1, False)
    bw = (W - LEFT - RIGHT) / bins
    out = [_axes(y, ticks)]
    for si, (name, c) in enumerate(counts.items()):
        for i, n in enumerate(c):
            if n:
                out.append(f'<rect x="{LEFT + i * bw:.1f}" y="{y(n):.1f}" width="{bw:.1f}" height="{H - BOTTOM - y(n):.1f}" '
                           f'fill="{PALETTE[si % len(PALETTE)]}" fill-opacity="0.55"><title>{_esc(name)}: {n}</title></rect>')
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        label = 10 ** v if log_x else v
        out.append(f'<text x="{LEFT + (W - LEFT - RIGHT) * i / 4:.1f}" y="{H - BOTTOM + 14}" font-size="10" '
                   f'text-anchor="middle">{label:.3g}</text>')
    return _frame(title, "".join(out), list(samples))


def line(title: str, xs: Sequence[str], ys: Sequence[float], log: bool = True, mark: int | None = None) -> str:
    """A line over ordered points (e.g. error along the graph), optional marked point."""
    if not ys:
        return _frame(title, '<text x="50%" y="50%" text-anchor="middle">no data</text>')
    positive = [v for v in ys if v > 0]
    y, ticks = _scale(min(positive) / 2 if (log and positive) else 0, max(ys) or 1, log and bool(positive))
    step = (W - LEFT - RIGHT) / max(1, len(ys) - 1)
    pts = " ".join(f"{LEFT + i * step:.1f},{y(v if v > 0 or not log else min(positive or [1e-12]) / 2):.1f}"
                   for i, v in enumerate(ys))
    out = [_axes(y, ticks), f'<polyline points="{pts}" fill="none" stroke="{PALETTE[0]}" stroke-width="1.5"/>']
    for i, (label, v) in enumerate(zip(xs, ys)):
        out.append(f'<circle cx="{LEFT + i * step:.1f}" cy="{y(v if v > 0 or not log else min(positive or [1e-12]) / 2):.1f}" '
                   f'r="2" fill="{PALETTE[0]}"><title>{_esc(label)}: {v:.4g}</title></circle>')
    if mark is not None and 0 <= mark < len(ys):
        mx = LEFT + mark * step
        out.append(f'<line x1="{mx:.1f}" y1="{TOP}" x2="{mx:.1f}" y2="{H - BOTTOM}" stroke="#c0392b" stroke-dasharray="4 3"/>'
                   f'<text x="{mx + 4:.1f}" y="{TOP + 12}" font-size="11" fill="#c0392b">'
                   f'first divergence: {_esc(str(xs[mark])[:40])}</text>')
    return _frame(title, "".join(out))


def scatter(title: str, points: Sequence[Mapping], x: str = "latency_ms", y: str = "accuracy",
            x_label: str = "latency (ms)", y_label: str = "accuracy", highlight: str = "on_front",
            mark: str = "chosen", label: str = "label") -> str:
    """One circle per point (``points``: mappings with ``x``/``y`` values); points whose
    ``highlight`` is true are drawn larger in the second colour and joined by a line in x order
    (e.g. a Pareto front), the one whose ``mark`` is true gets a ring.  Each circle has a
    ``<title>`` (its ``label`` and values) and ``class="point"`` (plus ``front``/``chosen``)."""
    pts = [p for p in points if math.isfinite(float(p[x])) and math.isfinite(float(p[y]))]
    if not pts:
        return _frame(title, '<text x="50%" y="50%" text-anchor="middle">no data</text>')
    xs, ys = [float(p[x]) for p in pts], [float(p[y]) for p in pts]
    x_lo, x_hi = min(xs), max(xs)
    pad = (x_hi - x_lo) * 0.05 or abs(x_hi) * 0.05 or 1.0
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = min(ys), max(ys)
    ypad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.01 or 1.0
    yf, ticks = _scale(y_lo - ypad, y_hi + ypad, False)

    def xf(v: float) -> float:
        return LEFT + (v - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)

    out = [_axes(yf, ticks)]
    x_ticks = [x_lo + (x_hi - x_lo) * i / 4 for i in range(5)]
    for v, label in zip(x_ticks, tick_labels(x_ticks)):
        out.append(f'<text x="{xf(v):.1f}" y="{H - BOTTOM + 14}" font-size="10" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2:.1f}" y="{H - BOTTOM + 32}" font-size="11" '
               f'text-anchor="middle">{_esc(x_label)}</text>'
               f'<text x="14" y="{(TOP + H - BOTTOM) / 2:.1f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2:.1f})">{_esc(y_label)}</text>')
    front = sorted((p for p in pts if p.get(highlight)), key=lambda p: float(p[x]))
    if len(front) > 1:
        line_pts = " ".join(f"{xf(float(p[x])):.1f},{yf(float(p[y])):.1f}" for p in front)
        out.append(f'<polyline points="{line_pts}" fill="none" stroke="{PALETTE[1]}" stroke-width="1" '
                   f'stroke-dasharray="4 3"/>')
    for p in pts:
        on = bool(p.get(highlight))
        cls = "point" + (" front" if on else "") + (" chosen" if p.get(mark) else "")
        name = str(p.get(label, ""))
        name = name if len(name) <= 80 else name[:77] + "..."
        out.append(f'<circle class="{cls}" cx="{xf(float(p[x])):.1f}" cy="{yf(float(p[y])):.1f}" r="{5 if on else 3.5}" '
                   f'fill="{PALETTE[1] if on else PALETTE[0]}" fill-opacity="{0.9 if on else 0.6}"'
                   + (' stroke="#c0392b" stroke-width="2.5"' if p.get(mark) else "")
                   + f'><title>{_esc(name)}: {_esc(y_label)} {float(p[y]):.5g}, {_esc(x_label)} {float(p[x]):.4g}'
                   f'</title></circle>')
    legend = [f"not on the front ({len(pts) - len(front)})", f"{highlight.replace('_', ' ')} ({len(front)})"]
    return _frame(title, "".join(out), legend)


# ---------------------------------------------------------------- HTML page parts (reports)

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f5f8}td.num{text-align:right}.ok{color:#1e7b34;font-weight:bold}.bad{color:#b3261e;font-weight:bold}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}svg{max-width:100%;height:auto;border:1px solid #eee;margin:6px 0}
code{background:#f3f3f3;padding:1px 4px}"""


def page(title: str, body: str) -> str:
    """A whole HTML report page (the reports' and batch summary's shared frame)."""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            f"<p style=\"color:#888;font-size:12px\">onnxopt {__version__}</p></body></html>\n")


def table(headers: list[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class=\"num\">{html.escape(str(c))}</td>" if isinstance(c, (int, float)) else f"<td>{c}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def status(ok: bool) -> str:
    return '<span class="ok">pass</span>' if ok else '<span class="bad">FAIL</span>'


#: sorts a ``table.sortable`` by the clicked column (cells' ``data-v`` keys)
SORT_JS = """document.querySelectorAll('table.sortable th').forEach(function(th,i){th.style.cursor='pointer';
th.title='sort';th.addEventListener('click',function(){var t=th.closest('table'),b=t.tBodies[0],
rows=Array.from(b.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
function key(r){var c=r.cells[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent.trim(),n=parseFloat(v);
return isNaN(n)?v.toLowerCase():n;}
rows.sort(function(a,b){var x=key(a),y=key(b);if(typeof x!==typeof y){x=String(x);y=String(y);}
return (x<y?-1:x>y?1:0)*(asc?1:-1);});rows.forEach(function(r){b.appendChild(r);});});});"""


def sortable_cell(value, text: str | None = None) -> str:
    """A table cell whose sort key is ``value`` (numbers sort as numbers; missing ones last)."""
    shown = html.escape(text if text is not None else ("-" if value is None else str(value)))
    key = "" if value is None else html.escape(str(value), quote=True)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    css = ' class="num"' if numeric else ""
    return f'<td{css} data-v="{key}">{shown}</td>'

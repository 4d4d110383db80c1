"""onnxopt.plots: every chart is well-formed SVG, and what is drawn scales with the data."""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET

import pytest

from onnxopt import plots

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on malformed XML (an unescaped & or <, a cut entity)
    assert root.tag == NS + "svg"
    assert (root.get("width"), root.get("height")) == (str(plots.W), str(plots.H))
    return root


def marks(root: ET.Element, tag: str) -> list[ET.Element]:
    """The data marks (bars, points): the elements of ``tag`` that carry a <title> tooltip."""
    return [e for e in root.iter(NS + tag) if e.find(NS + "title") is not None]


def geometry(rect: ET.Element) -> tuple[float, float, float, float]:
    return tuple(float(rect.get(k)) for k in ("x", "y", "width", "height"))


def texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(NS + "text")]


AXIS_Y = plots.H - plots.BOTTOM  # pixel row of the x axis
SPAN = plots.H - plots.TOP - plots.BOTTOM  # pixels from the axis to the top of the plot area


# ------------------------------------------------------------------ bars

def test_bar_heights_scale_with_values():
    root = parse(plots.bars("t", ["a", "b", "c"], {"s": [1.0, 2.0, 4.0]}))
    bars = [geometry(r) for r in marks(root, "rect")]
    assert len(bars) == 3
    heights = [b[3] for b in bars]
    assert heights[1] == pytest.approx(2 * heights[0], abs=0.15)
    assert heights[2] == pytest.approx(4 * heights[0], abs=0.15)
    assert heights[2] == pytest.approx(SPAN, abs=0.1)  # the largest value fills the plot
    for _x, y, _w, h in bars:
        assert y + h == pytest.approx(AXIS_Y, abs=0.1)  # every bar stands on the axis
    xs = [b[0] for b in bars]
    assert xs == sorted(xs) and len(set(xs)) == 3  # one group per category, left to right


def test_grouped_bars_side_by_side_and_legend():
    root = parse(plots.bars("t", ["a", "b"], {"before": [3.0, 1.0], "after": [1.5, 1.0]}))
    bars = [geometry(r) for r in marks(root, "rect")]
    # order: category a (before, after), category b (before, after)
    assert [round(b[3] / bars[0][3], 2) for b in bars] == [1.0, 0.5, 0.33, 0.33]
    assert bars[0][0] < bars[1][0] < bars[2][0] < bars[3][0]
    assert bars[1][0] == pytest.approx(bars[0][0] + bars[0][2], abs=0.11)  # adjacent within a group
    titles = [r.find(NS + "title").text for r in marks(root, "rect")]
    assert titles[1] == "a / after: 1.5"
    assert {"before", "after"} <= set(texts(root))  # legend


def test_bars_negative_values_grow_down_from_zero():
    root = parse(plots.bars("t", ["a", "b"], {"s": [-1.0, 2.0]}))
    (_, ya, _, ha), (_, yb, _, hb) = [geometry(r) for r in marks(root, "rect")]
    assert hb == pytest.approx(2 * ha, abs=0.15)
    zero = yb + hb  # the positive bar's foot is the zero line, where the negative bar starts
    assert ya == pytest.approx(zero, abs=0.1)
    assert ha + hb == pytest.approx(SPAN, abs=0.2)


def test_log_bars_heights_follow_decades():
    root = parse(plots.bars("t", ["a", "b", "c"], {"s": [10.0, 100.0, 1000.0]}, log=True))
    h = [geometry(r)[3] for r in marks(root, "rect")]
    assert h[0] < h[1] < h[2]
    assert h[2] - h[1] == pytest.approx(h[1] - h[0], abs=0.15)  # one decade = the same height
    assert h[2] == pytest.approx(SPAN, abs=0.1)


def test_bars_empty_and_single_value():
    empty = parse(plots.bars("nothing", [], {}))
    assert marks(empty, "rect") == [] and "no data" in texts(empty)
    single = parse(plots.bars("one", ["only"], {"s": [5.0]}))
    (bar,) = marks(single, "rect")
    _, y, _, h = geometry(bar)
    assert h == pytest.approx(SPAN, abs=0.1) and y == pytest.approx(plots.TOP, abs=0.1)
    zero = parse(plots.bars("zero", ["only"], {"s": [0.0]}))
    assert geometry(marks(zero, "rect")[0])[3] == 0.0
    all_zero_log = parse(plots.bars("zero", ["a", "b"], {"s": [0.0, 0.0]}, log=True))
    assert [geometry(r)[3] for r in marks(all_zero_log, "rect")] == [0.0, 0.0]


# ------------------------------------------------------------------ histogram

def test_histogram_counts_scale():
    root = parse(plots.histogram("h", {"a": [0.0, 1.0, 1.0, 1.0, 1.0]}, bins=2))
    rects = [geometry(r) for r in marks(root, "rect")]
    assert len(rects) == 2
    (x0, _, w0, h0), (x1, _, _, h1) = rects
    assert h1 == pytest.approx(4 * h0, abs=0.15) and h1 == pytest.approx(SPAN, abs=0.1)
    assert x1 == pytest.approx(x0 + w0, abs=0.11) and w0 == pytest.approx((plots.W - plots.LEFT - plots.RIGHT) / 2, abs=0.1)
    titles = [r.find(NS + "title").text for r in marks(root, "rect")]
    assert titles == ["a: 1", "a: 4"]


def test_histogram_empty_single_and_non_finite():
    assert "no data" in texts(parse(plots.histogram("h", {})))
    assert "no data" in texts(parse(plots.histogram("h", {"a": [math.nan, math.inf]})))
    assert "all differences are exactly 0" in texts(parse(plots.histogram("h", {"a": [0.0, 0.0]}, log_x=True)))
    single = parse(plots.histogram("h", {"a": [3.0, math.nan]}, bins=10))
    (bar,) = marks(single, "rect")
    assert bar.find(NS + "title").text == "a: 1"
    assert geometry(bar)[0] == pytest.approx(plots.LEFT, abs=0.1)  # the one value lands in the first bin


# ------------------------------------------------------------------ line

def test_line_points_follow_values_and_mark():
    root = parse(plots.line("err", ["n0", "n1", "n2", "n3"], [1e-6, 1e-5, 1e-4, 1e-3], mark=2))
    points = marks(root, "circle")
    assert len(points) == 4
    ys = [float(p.get("cy")) for p in points]
    xs = [float(p.get("cx")) for p in points]
    steps = [a - b for a, b in itertools.pairwise(ys)]
    assert all(s == pytest.approx(steps[0], abs=0.15) for s in steps) and steps[0] > 0  # equal decades, going up
    assert xs == sorted(xs)
    assert "first divergence: n2" in texts(root)
    lin = [float(p.get("cy")) for p in marks(parse(plots.line("lin", ["a", "b", "c"], [0.0, 1.0, 2.0], log=False)), "circle")]
    assert lin[0] - lin[1] == pytest.approx(lin[1] - lin[2], abs=0.15)
    assert lin[0] == pytest.approx(AXIS_Y, abs=0.1)


def test_line_empty_and_single_point():
    assert "no data" in texts(parse(plots.line("t", [], [])))
    single = parse(plots.line("t", ["only"], [0.5], mark=0))
    assert len(marks(single, "circle")) == 1 and "first divergence: only" in texts(single)
    parse(plots.line("t", ["a", "b"], [0.0, 0.0]))  # all zeros on a log scale still draws


# ------------------------------------------------------------------ escaping

def test_labels_with_markup_characters_are_escaped():
    nasty = 'x<y>&"z\''
    long_amp = "a" * 15 + "&bc"  # cutting to 18 characters must not cut "&amp;" in half
    charts = [
        plots.bars(nasty, [nasty, long_amp], {nasty: [1.0, 2.0]}),
        plots.histogram(nasty, {nasty: [1.0, 2.0]}),
        plots.line(nasty, [nasty, "a" * 37 + "&<>"], [1.0, 2.0], mark=1),
        plots.bars("t", [long_amp], {"s": [1.0]}, log=True),
    ]
    for svg in charts:
        root = parse(svg)
        assert root.get("aria-label") == root.find(NS + "title").text
        assert "<y>" not in svg
    bars = parse(charts[0])
    assert bars.find(NS + "title").text == nasty
    assert nasty in texts(bars)  # legend
    assert nasty[:18] in texts(bars) and long_amp in texts(bars)  # category labels, unescaped by the parser
    assert marks(bars, "rect")[0].find(NS + "title").text == f"{nasty} / {nasty}: 1"
    line = parse(charts[2])
    assert "first divergence: " + "a" * 37 + "&<>" in texts(line)


def test_tick_labels_tell_close_ticks_apart():
    from onnxopt.plots import tick_labels
    assert tick_labels([0.99, 0.995, 1.0, 1.005, 1.01]) == ["0.99", "0.995", "1", "1.005", "1.01"]
    assert tick_labels([0, 25, 50]) == ["0", "25", "50"]

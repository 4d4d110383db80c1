"""``onnxopt quantize --search`` (onnxopt/search.py): the Pareto front and the choice on hand-made
points, and a search on a small model whose chosen recipe meets the budget, is on the front,
replays to identical bytes and shows in the HTML report's scatter plot."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from models import tasks
from onnxopt import plots
from onnxopt.quantization import search as search_mod
from tests.helpers import ROOT, chromium_screenshot, sha256

SVG = "{http://www.w3.org/2000/svg}"


def _p(acc, ms, size):
    return {"accuracy": acc, "latency_ms": ms, "bytes": size}


def test_pareto_front_excludes_dominated_points_and_keeps_ties():
    points = [_p(0.99, 10.0, 1000),   # 0 float: most accurate
              _p(0.98, 5.0, 300),     # 1 fast, small
              _p(0.98, 6.0, 300),     # 2 dominated by 1 (slower, same otherwise)
              _p(0.97, 5.0, 300),     # 3 dominated by 1 (less accurate)
              _p(0.98, 5.0, 300),     # 4 equal to 1: neither dominates, both stay
              _p(0.95, 4.0, 400),     # 5 fastest but bigger: on the front
              _p(0.95, 4.0, 500),     # 6 dominated by 5 (bigger)
              _p(0.99, 10.0, 999)]    # 7 dominates 0 (one byte smaller)
    assert search_mod.pareto_front(points) == [1, 4, 5, 7]
    assert not search_mod.dominates(points[1], points[4]) and search_mod.dominates(points[7], points[0])
    # the fastest within the budget: 5 misses 0.02 (drop 0.04 from 0.99), so 1 vs its equal 4 -> earlier
    assert search_mod.choose(points, 0.02, 0.99) == 1
    assert search_mod.choose(points, 0.05, 0.99) == 5
    assert search_mod.choose(points, 0.0, 0.99) == 7
    assert search_mod.choose(points, 0.0, 1.5) is None
    # latencies within LATENCY_TIE count as tied: the smaller wins, then the more accurate
    tied = [_p(0.98, 5.00, 400), _p(0.98, 5.05, 300), _p(0.99, 5.05, 300)]
    assert search_mod.pareto_front(tied) == [0, 2]
    assert search_mod.choose(tied, 0.05, 0.99) == 2
    assert search_mod.choose(tied, 0.05, 0.99, tie=0.0) == 0


def test_front_and_choice_with_noisy_latency_samples():
    """With per-round samples, latency differences within noise tie: same-size, same-accuracy
    candidates all stay on the front and the earliest is chosen; a clearly faster one dominates."""
    rng = np.random.default_rng(0)
    base = rng.uniform(9.0, 11.0, 60)  # a machine whose speed drifts: rounds are paired
    samples = [base * 1.00 * rng.uniform(0.97, 1.03, 60),   # 0
               base * 1.01 * rng.uniform(0.97, 1.03, 60),   # 1 same model within noise
               base * 0.80 * rng.uniform(0.97, 1.03, 60),   # 2 clearly faster, less accurate
               base * 1.30 * rng.uniform(0.97, 1.03, 60)]   # 3 clearly slower, same otherwise as 0
    pts = [_p(0.99, float(np.median(t)), 500) for t in samples]
    pts[2]["accuracy"] = 0.90
    faster = search_mod.confidently_faster(samples)
    assert faster(2, 0) and not faster(0, 1) and not faster(1, 0) and faster(0, 3)
    assert search_mod.pareto_front(pts, faster) == [0, 1, 2]
    assert search_mod.choose(pts, 0.02, 0.99, faster=faster) == 0
    assert search_mod.choose(pts, 0.2, 0.99, faster=faster) == 2
    pts[1]["bytes"] = 400  # smaller and tied on latency: it wins, and 0 leaves the front
    assert search_mod.pareto_front(pts, faster) == [1, 2] and search_mod.choose(pts, 0.02, 0.99, faster=faster) == 1


def test_grid_is_deterministic_and_starts_with_the_default():
    g = search_mod.grid()
    assert g == search_mod.grid() and len(set(g)) == len(g) == 16
    assert (g[0].method, g[0].per_channel, g[0].recovery) == ("percentile", True, ("bias-correction", "adaround"))
    assert all(not s.per_channel for s in search_mod.grid(per_channel_ok=False))


def test_scatter_is_well_formed_with_one_mark_per_point():
    pts = [{"label": f"c<{i}>&", "accuracy": 0.9 + i / 100, "latency_ms": 10 - i, "on_front": i % 2 == 0,
            "chosen": i == 2} for i in range(5)]
    root = ET.fromstring(plots.scatter("a & b", pts))
    circles = root.findall(f".//{SVG}circle")
    assert len(circles) == 5
    assert sum("front" in c.get("class") for c in circles) == 3
    assert [c.get("class") for c in circles].count("point front chosen") == 1
    ET.fromstring(plots.scatter("empty", []))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return tasks.write_calibration("digits_cnn", tmp_path_factory.mktemp("calib") / "d", batches=8, batch_size=8)


def test_search_chooses_within_budget_on_the_front_and_replays(cli, tmp_path, calib):
    src = ROOT / "models" / "digits_cnn.onnx"
    out, rep, html_rep = tmp_path / "s.onnx", tmp_path / "s.json", tmp_path / "s.html"
    r = cli("quantize", src, "-o", out, "--data", calib, "--search", "--budget", "4", "--max-drop", "0.02",
            "--no-latency-guard", "--report", rep)
    assert r.exit_code == 0, r.output
    assert "search: 4 candidates + the float model" in r.output
    report = json.loads(rep.read_text())
    found = report["search"]
    cands = found["candidates"]
    assert len(cands) == 5 and cands[0]["float_model"] and found["evaluated"] == 5
    (chosen,) = [c for c in cands if c["chosen"]]
    assert chosen["id"] == found["chosen"] and chosen["on_front"] and chosen["meets_budget"]
    assert chosen["drop"] <= 0.02
    assert found["front"] == [i for i, c in enumerate(cands) if c["on_front"]]
    for c in cands:
        assert c["bytes"] > 0 and c["latency_ms"] > 0 and set(c["recipe"]) >= {"method", "per_channel", "recovery",
                                                                                  "float_layers"}
    # the fastest meeting the budget up to timing noise (ties are judged on per-round ratios, so only loosely here)
    ok = [c for c in cands if c["meets_budget"]]
    assert chosen["latency_ms"] <= min(c["latency_ms"] for c in ok) * 1.5
    assert report["accuracy"]["drop"] <= 0.02 and report["written"]
    # the recipe is saved beside the output and replays to the same bytes
    recipe = tmp_path / "s.onnx.recipe.json"
    saved = json.loads(recipe.read_text())
    assert saved["method"] == chosen["recipe"]["method"] and saved["float_layers"] == chosen["recipe"]["float_layers"]
    r = cli("quantize", src, "-o", tmp_path / "replay.onnx", "--data", calib, "--recipe", recipe)
    assert r.exit_code == 0, r.output
    assert sha256(tmp_path / "replay.onnx") == sha256(out)
    # the reports: MD table and an HTML scatter with one mark per candidate
    from onnxopt import report as report_mod

    md = report_mod.render(report, ".md")
    assert "## Search" in md and md.count("**chosen**") == 1
    html_rep.write_text(report_mod.render(report, ".html"))
    text = html_rep.read_text()
    start = text.index("<svg", text.index("<h2>Search</h2>"))
    svg = ET.fromstring(text[start:text.index("</svg>", start) + len("</svg>")])
    circles = svg.findall(f".//{SVG}circle")
    assert len(circles) == len(cands)
    assert sum("front" in c.get("class") for c in circles) == len(found["front"])
    assert sum("chosen" in c.get("class") for c in circles) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_search_report_renders_in_chromium(cli, tmp_path, calib):
    """The HTML report with its Pareto scatter renders in a real browser (not a blank page)."""
    page = tmp_path / "s.html"
    r = cli("quantize", ROOT / "models" / "digits_cnn.onnx", "-o", tmp_path / "s.onnx", "--data", calib, "--search",
            "--budget", "2", "--no-latency-guard", "--report", page)
    assert r.exit_code == 0, r.output
    assert "<h2>Search</h2>" in page.read_text()
    colors = chromium_screenshot(page, tmp_path, (1200, 2400)).getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50


def test_search_with_the_latency_guard_starts_from_its_placement(cli, tmp_path, calib):
    """With the guard on (the default) its decisions are the starting placement of every
    candidate, recorded in the saved recipe; the result still replays to the same bytes."""
    src = ROOT / "models" / "digits_cnn.onnx"
    out, recipe = tmp_path / "g.onnx", tmp_path / "g.recipe.json"
    r = cli("quantize", src, "-o", out, "--data", calib, "--search", "--budget", "2", "--max-drop", "0.02",
            "--save-recipe", recipe, "--report", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "g.json").read_text())
    cands = report["search"]["candidates"]
    assert len(cands) <= 3 and sum(c["chosen"] for c in cands) == 1
    saved = json.loads(recipe.read_text())
    assert saved["latency_decisions"] and saved["latency_decisions"] == report["recipe"]["latency_decisions"]
    # every candidate with no extra float layer starts from the same (the guard's) placement
    starts = {tuple(c["recipe"]["float_layers"]) for c in cands[1:] if c["label"].endswith("+0 float")}
    assert len(starts) <= 1
    r = cli("quantize", src, "-o", tmp_path / "replay.onnx", "--data", calib, "--recipe", recipe)
    assert r.exit_code == 0, r.output
    assert sha256(tmp_path / "replay.onnx") == sha256(out)


def test_search_keeps_sensitive_layers_float_when_a_setting_misses_the_budget(cli, tmp_path, isa):
    """The 1,000-class close-logits head flips predictions in int8: the default setting misses
    the budget, the ranking is measured once and the next candidate keeps the head float; that
    one is chosen (int8 embed, float head), within the budget, and replays to the same bytes.
    Expects 7-bit weights (the no-VNNI way, exact on every CPU; with 8-bit ones nothing flips)."""
    isa("no-vnni")
    from tests.test_quantize import _close_logits_case

    src, data, _ = _close_logits_case(tmp_path)
    out = tmp_path / "c.onnx"
    # --max-drop 0.1: int8 embed alone flips ~3% of positions, which the 128 witness positions' 95% lower
    # bound (~0.93) shows though the 128 held-out ones happen to flip none
    r = cli("quantize", src, "-o", out, "--data", data, "--no-latency-guard", "--search", "--budget", "3",
            "--max-drop", "0.1", "--report", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "c.json").read_text())
    cands = report["search"]["candidates"]
    assert [c["label"].rsplit(", ", 1)[1] for c in cands[1:3]] == ["+0 float", "+1 float"]
    assert not cands[1]["meets_budget"] and cands[2]["meets_budget"]
    assert cands[2]["recipe"]["float_layers"] == ["head"]
    assert report["search"]["ranking"][0]["layer"] == "head"
    assert report["recipe"]["sensitivity"][0]["layer"] == "head"
    (chosen,) = [c for c in cands if c["chosen"]]
    assert chosen["meets_budget"] and chosen["on_front"] and report["accuracy"]["drop"] <= 0.1
    r = cli("quantize", src, "-o", tmp_path / "replay.onnx", "--data", data, "--recipe", str(out) + ".recipe.json")
    assert r.exit_code == 0, r.output
    assert sha256(tmp_path / "replay.onnx") == sha256(out)


def test_search_usage_errors(cli, tmp_path, calib):
    src = ROOT / "models" / "digits_cnn.onnx"
    r = cli("quantize", src, "-o", tmp_path / "a.onnx", "--data", calib, "--budget", "3")
    assert r.exit_code == 1 and "--search" in r.output
    r = cli("quantize", src, "-o", tmp_path / "a.onnx", "--data", calib, "--search", "--method", "minmax")
    assert r.exit_code == 1 and "--method" in r.output
    r = cli("quantize", src, "-o", tmp_path / "a.onnx", "--data", calib, "--search", "--recipe", tmp_path / "r.json")
    assert r.exit_code == 1 and "--recipe" in r.output
    r = cli("quantize", src, "-o", tmp_path / "a.onnx", "--data", calib, "--search", "--budget", "0")
    assert r.exit_code == 1
    assert not (tmp_path / "a.onnx").exists()


def _search_summary(report: dict) -> list[tuple]:
    return [(c["label"], c["accuracy"], c["bytes"], tuple(c["recipe"]["float_layers"])) for c in report["search"]["candidates"]]


def test_parallel_search_finds_what_the_sequential_search_finds(tmp_path):
    """The close-logits case needs the sensitivity ranking and a second build in its first
    chain: built on 2 local processes (and as Ray tasks on a local cluster when Ray is installed),
    the candidates, their scores and bytes, the ranking and the chosen recipe are those of the
    in-process search, and the result file is byte-identical."""
    from onnxopt import api
    from tests.test_quantize import _close_logits_case

    src, data, _ = _close_logits_case(tmp_path)
    modes = [("inproc", {"workers": 1}), ("pool", {"workers": 2})]
    try:
        import ray  # noqa: F401

        modes.append(("ray", {"workers": 2, "ray_address": "local"}))
    except ImportError:
        pass
    reports = {}
    for name, kw in modes:
        reports[name] = api.quantize(src, tmp_path / f"{name}.onnx", data=data, search=True, budget=4,
                                     latency_guard=False, **kw)
    base = reports["inproc"]
    assert base["search"]["discarded_builds"] == 0 and "in-process" in base["search"]["parallelism"]
    assert [len(c[3]) for c in _search_summary(base)[1:3]] == [0, 1]  # the ranking was needed
    for name, rep in reports.items():
        assert _search_summary(rep) == _search_summary(base), name
        assert rep["search"]["ranking"] == base["search"]["ranking"], name
        assert rep["search"]["chosen"] == base["search"]["chosen"] or (
            # the choice among latency ties may differ between runs; the chosen one is on the front either way
            rep["search"]["candidates"][rep["search"]["chosen"]]["on_front"]), name
    assert "local pool of 2" in reports["pool"]["search"]["parallelism"]
    if "ray" in reports:
        assert "ray" in reports["ray"]["search"]["parallelism"]
    for name, rep in reports.items():  # a candidate built in a worker is written as built in-process
        if rep["search"]["chosen"] == base["search"]["chosen"]:
            assert sha256(tmp_path / f"{name}.onnx") == sha256(tmp_path / "inproc.onnx"), name

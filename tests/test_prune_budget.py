"""prune / compress --sparsity within the budget (issue 21): no global magnitude threshold across
differently scaled layers (relative magnitudes, a per-layer cap), refits with enough rows or a
ridge toward the pruned weights, and the highest sparsity that meets --max-drop written when the
asked one misses it (--strict refuses).  Real ORT on models/heterogeneous.py (layers 100x apart)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from models import heterogeneous as het
from onnxopt.compression import budget, engine, refit
from onnxopt.compression import magnitude as pm
from tests.helpers import ROOT, save


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hetero")
    path = folder / "het.onnx"
    onnx.save(het.build(), str(path))
    return path, het.write_data(folder / "data", batches=16, batch_size=16)


def _weights(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.name: inits[n.input[1]] for n in m.graph.node if n.op_type in ("Conv", "Gemm")}


def _logits(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_the_model_defeats_one_global_threshold(hetero):
    """The reason for all this: one |w| threshold at 50% over the middle layers all but empties the
    two small-scale ones (97-99%, as in the issue's PP-OCR recognizer); relative magnitudes prune
    each about equally."""
    path, _ = hetero
    model, _ = engine.prepare(path)  # BN folded, as prune sees it
    chosen, _ = pm.selected(pm.layers(model)[0])
    ws = [la.weight.const_value.numpy() for la in chosen]
    cut = np.quantile(np.concatenate([np.abs(w).ravel() for w in ws]), 0.5)
    plain = [float(np.mean(np.abs(w) <= cut)) for w in ws]
    assert sorted(plain)[-2] > 0.95 and sorted(plain)[1] < 0.3, plain
    counts = pm.allocate(ws, 0.5)
    assert all(0.35 < c / w.size < 0.65 for c, w in zip(counts, ws))
    assert sum(counts) == round(0.5 * sum(w.size for w in ws))


def test_no_layer_above_the_cap_and_the_total_is_kept():
    """A layer whose RMS is set by a few outliers would be emptied even on relative magnitudes: it
    stops at the cap (min(0.95, (1 + S) / 2)) and the others take the rest, S overall exactly."""
    rng = np.random.default_rng(0)
    spiky = np.r_[rng.standard_normal(990) * 1e-3, rng.standard_normal(10)]
    plain = rng.standard_normal(3000)
    for s in (0.3, 0.5, 0.9):
        counts = pm.allocate([spiky, plain], s)
        assert counts[0] == int(np.floor(pm.layer_cap(s) * 1000 + 1e-9)), (s, counts)
        assert sum(counts) == round(s * 4000)
    assert pm.layer_cap(0.5) == 0.75 and pm.layer_cap(0.9) == 0.95 and pm.layer_cap(0.97) == 0.97


def test_prune_half_writes_within_budget_no_layer_above_cap(cli, tmp_path, hetero):
    """--sparsity 0.5 with a budget it meets (the logits judged by cosine): written as asked (50% of
    the middle layers), every layer at most the cap and none emptied, each record gives its sparsity
    and refit rows, and the outputs stay close to the original's on fresh inputs."""
    path, data = hetero
    out, rep = tmp_path / "p.onnx", tmp_path / "p.json"
    r = cli("prune", path, "-o", out, "--sparsity", "0.5", "--data", data, "--output-kind", "logits=embedding",
            "--report", rep)
    assert r.exit_code == 0, r.output
    assert "reached" not in r.stdout
    report = json.loads(rep.read_text())
    assert report["asked_sparsity"] == report["reached_sparsity"] == 0.5 and report["max_layer_sparsity"] == 0.75
    pruned = [lay for lay in report["layers"] if lay["pruned"]]
    assert len(pruned) == 4
    for lay in pruned:
        assert 0.3 < lay["sparsity"] <= report["max_layer_sparsity"], lay
        assert lay["refit_rows"] >= 3000 and lay["refit"].startswith(f"refit on {lay['refit_rows']} rows")
    w = _weights(out)
    middle = np.concatenate([w[lay["layer"]].ravel() for lay in pruned])
    assert abs(np.mean(middle == 0) - 0.5) < 0.001
    x = het.images(256, seed=12345)
    y0, y1 = _logits(path, x), _logits(out, x)
    assert np.linalg.norm(y1 - y0) / np.linalg.norm(y0 - y0.mean(0)) < 0.15
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads((ROOT / "docs" / "report.schema.json").read_text()))


def test_over_budget_reaches_lower_and_says_so_strict_refuses(cli, tmp_path, hetero):
    """At the default budget 0.5 is too much: the highest sparsity found that meets it is written,
    one stdout line says so, the report lists the trials; --strict refuses (exit 3, nothing written)."""
    path, data = hetero
    out, rep = tmp_path / "p.onnx", tmp_path / "p.json"
    r = cli("prune", path, "-o", out, "--sparsity", "0.5", "--data", data, "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    reached = report["reached_sparsity"]
    assert 0 < reached < 0.5 and report["accuracy"]["drop"] <= 0.01
    assert f"asked 0.50, reached {reached:.2f} within --max-drop 0.01" in r.stdout
    assert report["sparsity_search"]["message"] in r.stdout
    trials = report["sparsity_search"]["trials"]
    assert trials[0] == {"sparsity": 0.5, "drop": pytest.approx(trials[0]["drop"]), "ok": False}
    assert all(t["ok"] == (t["drop"] <= 0.01) for t in trials)
    assert reached == max(t["sparsity"] for t in trials if t["ok"])
    assert not any(t["ok"] for t in trials if t["sparsity"] > reached)
    pruned = [lay for lay in report["layers"] if lay["pruned"]]
    total = sum(lay["sparsity"] * lay["params"] for lay in pruned) / sum(lay["params"] for lay in pruned)
    assert total == pytest.approx(reached, abs=1e-3) and max(lay["sparsity"] for lay in pruned) <= pm.layer_cap(reached)
    strict = tmp_path / "s.onnx"
    r = cli("prune", path, "-o", strict, "--sparsity", "0.5", "--data", data, "--strict")
    assert r.exit_code == 3 and "--max-drop 0.01" in r.output and "reached" not in r.output
    assert not strict.exists()


def test_refused_when_even_the_lowest_sparsity_misses(cli, tmp_path, hetero):
    """A budget nothing meets (cosine judged, no drop allowed, no refit): refused as before, exit 3."""
    path, data = hetero
    out, rep = tmp_path / "p.onnx", tmp_path / "p.json"
    r = cli("prune", path, "-o", out, "--sparsity", "0.5", "--data", data, "--no-refit", "--max-drop", "0",
            "--output-kind", "logits=embedding", "--report", rep)
    assert r.exit_code == 3 and "--max-drop 0" in r.output, r.output
    assert not out.exists()
    report = json.loads(rep.read_text())
    assert report["written"] is False and report["reached_sparsity"] is None
    trials = report["sparsity_search"]["trials"]
    assert len(trials) <= 1 + budget.STEPS and min(t["sparsity"] for t in trials) == budget.RESOLUTION
    assert not any(t["ok"] for t in trials)


def test_compress_reaches_lower_sparsity(cli, tmp_path):
    """compress --cluster 16 --sparsity 0.9 on the trained digits CNN misses a 1-point budget: the
    pruning is searched like prune's (each trial pruned, refit, clustered and scored) and the highest
    sparsity found within it is written; --strict refuses."""
    from models import tasks

    data = tasks.write_calibration("digits_cnn", tmp_path / "d", batches=8, batch_size=8)
    src = ROOT / "models" / "digits_cnn.onnx"
    out, rep = tmp_path / "c.onnx", tmp_path / "c.json"
    args = ("--cluster", "16", "--sparsity", "0.9", "--data", data, "--metric", "models.tasks:digits_accuracy")
    r = cli("compress", src, "-o", out, *args, "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["asked_sparsity"] == 0.9 and 0.3 < report["reached_sparsity"] < 0.9
    assert report["sparsity_search"]["message"] in r.stdout and report["accuracy"]["drop"] <= 0.01
    assert all(p["refit_rows"] > 0 for p in report["pruning"] if p["pruned"])
    r = cli("compress", src, "-o", tmp_path / "s.onnx", *args, "--strict")
    assert r.exit_code == 3 and not (tmp_path / "s.onnx").exists()


def test_search_is_a_binary_search_on_a_grid():
    """Asked 0.5, everything up to 0.37 meets the budget: 0.25, 0.37, 0.43, 0.40, 0.38 are tried
    (six builds with the first) and 0.37 is reached."""
    built: list[float] = []

    def build(s: float) -> tuple[float]:
        built.append(s)
        return (s,)

    found = budget.highest_within(0.5, build, lambda c: 0.0 if c[0] <= 0.37 + 1e-9 else 1.0, 0.01)
    assert found.reached == pytest.approx(0.37) and found.candidate == (pytest.approx(0.37),)
    assert built == pytest.approx([0.5, 0.25, 0.37, 0.43, 0.40, 0.38])
    assert found.message == "asked 0.50, reached 0.37 within --max-drop 0.01"
    nothing = budget.highest_within(0.5, build, lambda c: 1.0, 0.01)
    assert nothing.reached is None and nothing.candidate == (0.5,) and nothing.message is None
    strict = budget.highest_within(0.5, build, lambda c: 1.0, 0.01, search=False)
    assert len(strict.trials) == 1


def _gemm(tmp_path, w: np.ndarray):
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
                              [onnx.numpy_helper.from_array(w, "w")])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "fc.onnx")


def test_few_rows_stay_near_the_pruned_weights(tmp_path):
    """A 256-input layer refit on 40 rows (fewer than its fan-in): the ridge toward the pruned
    weights keeps the refit about as good as the pruned layer on fresh inputs, where a plain
    least-squares fit on those rows (minimum norm) is far worse; with 8 x fan-in rows the refit is
    clearly better than pruning.  The rows used are reported."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    path = _gemm(tmp_path, w)
    mix = rng.standard_normal((256, 256)) * 0.3 + np.eye(256)  # correlated inputs: what refit can use
    feed = lambda n: {"x": (rng.standard_normal((n, 256)) @ mix).astype(np.float32)}  # noqa: E731
    fresh = feed(2000)["x"].astype(np.float64)
    errors = {}
    for label, batches in (("few", [feed(40)]), ("many", [feed(1028) for _ in range(2)])):
        model = ir.load(str(path))
        pm.prune(model, sparsity=0.5, skip_ends=False)
        node = next(iter(model.graph))
        pruned = node.inputs[1].const_value.numpy().astype(np.float64)
        used: dict[str, int] = {}
        notes = refit.refit(model, path.read_bytes(), ["fc"], batches, masks={"fc": pruned != 0}, used=used)
        assert used["fc"] == sum(len(b["x"]) for b in batches) and notes["fc"].startswith(f"refit on {used['fc']} rows")
        new = node.inputs[1].const_value.numpy().astype(np.float64)
        assert np.array_equal(new != 0, pruned != 0)
        bias = node.inputs[2].const_value.numpy() if len(node.inputs) > 2 else 0.0
        err = lambda m, b=0.0: np.linalg.norm(fresh @ m + b - fresh @ w)  # noqa: E731
        errors[label] = (err(new, bias), err(pruned))
        if label == "few":
            x = batches[0]["x"].astype(np.float64)
            plain = np.zeros_like(pruned)
            for o in range(w.shape[1]):
                keep = pruned[:, o] != 0
                plain[keep, o] = np.linalg.lstsq(x[:, keep], x @ w[:, o], rcond=None)[0]
            assert err(plain) > 1.2 * errors["few"][1], (err(plain), errors)
    assert errors["few"][0] <= 1.02 * errors["few"][1], errors
    assert errors["many"][0] < 0.8 * errors["many"][1], errors


def test_compress_doubles_the_clusters_until_the_budget_is_met(cli, tmp_path):
    """16 shared values per layer miss the budget on this model; the cluster count doubles until a
    build meets it (said in one line, cluster_search in the report); --strict refuses instead."""
    src, rep = ROOT / "models" / "exporter_opset11.onnx", tmp_path / "r.json"
    r = cli("compress", src, "-o", tmp_path / "c.onnx", "--cluster", "16", "--report", rep)
    assert r.exit_code == 0, r.output
    search = json.loads(rep.read_text())["cluster_search"]
    assert search["asked"] == 16 and search["reached"] in (32, 64, 128, 256) and search["trials"][0]["drop"] > 0.01
    assert f"asked --cluster 16, reached {search['reached']} within --max-drop 0.01" in r.output
    assert json.loads(rep.read_text())["accuracy"]["drop"] <= 0.01
    r = cli("compress", src, "-o", tmp_path / "s.onnx", "--cluster", "16", "--strict")
    assert r.exit_code == 3 and not (tmp_path / "s.onnx").exists()


def test_compress_leaves_the_most_moved_layers_unclustered_when_256_values_miss(cli, tmp_path, hetero):
    """The heterogeneous CNN (layers 100x apart): even 256 shared values per layer miss --max-drop 0.01
    (the corpus measured 0.17 on fresh images); the layers clustering moves most are left unclustered,
    the fewest that meet the budget (binary search), said in one warning and in cluster_search; the
    written model keeps its predictions on images it never saw."""
    src, data = hetero
    out, rep = tmp_path / "c.onnx", tmp_path / "r.json"
    r = cli("compress", src, "-o", out, "--cluster", "16", "--data", data, "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    search = report["cluster_search"]
    assert [t["clusters"] for t in search["trials"][:5]] == [16, 32, 64, 128, 256] and search["trials"][4]["drop"] > 0.01
    n = len(search["unclustered"])
    assert 1 <= n < len(_weights(src)) and search["reached"] == 256
    assert f"reached 256 with {n} of" in r.output and "left unclustered" in r.output
    assert report["accuracy"]["drop"] <= 0.01
    clustered = {la["layer"] for la in report["layers"]}
    assert not clustered & set(search["unclustered"])
    x = het.images(64, 4242)
    assert np.mean(_logits(out, x).argmax(1) == _logits(src, x).argmax(1)) >= 0.97
    r = cli("compress", src, "-o", tmp_path / "s.onnx", "--cluster", "16", "--data", data, "--strict")
    assert r.exit_code == 3 and not (tmp_path / "s.onnx").exists()

"""quantize: calibration statistics, QDQ placement, the CLI on trained models, bad input."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import tasks
from onnxopt import calibrate
from onnxopt.errors import BadInputError
from tests.helpers import ROOT, op_types, sha256


def _session(path, optimized: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- calibration statistics

def test_histogram_rebinning_is_exact():
    """Batches with growing ranges: the running histogram equals one histogram of all the data on
    the final grid (old bins merge whole into new ones), and min/max/count are exact."""
    rng = np.random.default_rng(0)
    t = calibrate.TensorStats()
    batches = [rng.standard_normal(5000) * (1 + i) + i for i in range(12)]
    for b in batches:
        t.update(b)
    data = np.concatenate(batches)
    assert t.min == pytest.approx(data.min(), rel=1e-6) and t.max == pytest.approx(data.max(), rel=1e-6)
    assert t.hist.sum() == t.count == data.size and len(t.hist) == 2048
    ref, _ = np.histogram(data, bins=2048, range=(t.lo, t.lo + 2048 * t.width))
    assert np.abs(ref - t.hist).sum() <= data.size * 1e-3  # only float ties at bin edges may move


def test_range_methods_on_known_distributions():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(400_000)
    t = calibrate.TensorStats()
    for chunk in np.split(x, 8):
        t.update(chunk)
    lo, hi = t.range("minmax")
    assert (lo, hi) == pytest.approx((x.min(), x.max()), rel=1e-6)
    lo, hi = t.range("percentile", p=99.9)
    assert hi == pytest.approx(np.percentile(x, 99.9), rel=0.02)
    assert lo == pytest.approx(np.percentile(x, 0.1), rel=0.02)
    lo, hi = t.range("entropy")
    assert 2.5 < hi < 5.0 and lo == -hi  # TensorRT's KL threshold for N(0,1) with 128 levels
    lo, hi = t.range("mse")
    assert 2.5 < hi <= x.max() + 1e-6
    relu = calibrate.TensorStats()
    relu.update(np.maximum(x, 0))
    for method in calibrate.METHODS:
        lo, hi = relu.range(method)
        assert lo == 0.0 and 1.5 < hi <= x.max() + 1e-6, method
    with pytest.raises(Exception, match="unknown calibration method"):
        t.range("median")


def test_stats_save_load_round_trip(tmp_path):
    t = calibrate.TensorStats()
    t.update(np.random.default_rng(2).standard_normal((4, 3, 5, 5)).astype(np.float32))
    stats = calibrate.Stats({"a": t}, batches=1, source="x")
    stats.save(tmp_path / "s.npz")
    back = calibrate.Stats.load(tmp_path / "s.npz")
    for method in calibrate.METHODS:
        assert back.ranges(method) == stats.ranges(method)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="cannot read calibration statistics"):
        calibrate.Stats.load(tmp_path / "bad.npz")


def _batches(n: int, size=(8, 1, 32, 32)):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield {"image": rng.random(size, dtype=np.float32)}


def test_calibration_memory_is_flat_in_batches():
    """Peak traced memory while collecting 64 batches is within 10% of 16 batches (statistics
    are folded per batch; activations are never kept)."""
    from onnxopt import runtime

    model = ROOT / "models" / "digits_resnet.onnx"
    proto = onnx.load(str(model))
    names = [n.output[0] for n in proto.graph.node if n.op_type in ("Relu", "Conv")]
    sess = runtime.session(runtime.with_outputs(proto, names), "cpu", 1, optimize=False)
    peaks = {}
    for n in (16, 64):
        tracemalloc.start()
        stats = calibrate.collect(sess, names, _batches(n))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.batches == n
    assert peaks[64] <= peaks[16] * 1.10, peaks


# ---------------------------------------------------------------- the command on trained models

@pytest.fixture(scope="module")
def digits_calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    return {name: tasks.write_calibration(name, folder / name, batches=16, batch_size=8)
            for name in ("digits_cnn", "digits_mobilenet")}


def test_quantize_digits_cnn_keeps_task_accuracy(cli, tmp_path, digits_calib):
    """One command with a task metric: int8 weights in the file, QLinearConv after ORT's fusion,
    accuracy within the 0.5-point budget, report written."""
    src = ROOT / "models" / "digits_cnn.onnx"
    before = sha256(src)
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = cli("quantize", src, "-o", out, "--data", digits_calib["digits_cnn"], "--metric", "models.tasks:digits_accuracy",
            "--max-drop", "0.005", "--report", rep)
    assert r.exit_code == 0, r.output
    assert sha256(src) == before
    report = json.loads(rep.read_text())
    acc_float = tasks.digits_accuracy(_session(src))
    acc_q = tasks.digits_accuracy(_session(out))
    assert acc_float - acc_q <= 0.005, (acc_float, acc_q)
    assert report["accuracy"]["quantized"] == pytest.approx(acc_q, abs=1e-9)
    assert report["latency"]["quantized_ms"] <= report["latency"]["float_ms"]  # never slower (same measurement)
    if not report["wrote_float_model"]:
        ops = op_types(out)
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        int8 = [i for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
        assert int8, "conv weights stored as int8"
        _session(out, optimized=str(tmp_path / "fused.onnx"))
        assert "QLinearConv" in op_types(tmp_path / "fused.onnx")
        assert "ConvInteger" not in op_types(tmp_path / "fused.onnx")


def test_quantize_default_metric_and_stats_reuse(cli, tmp_path, digits_calib):
    """Default metric (cosine vs fp32), statistics saved then reused with another method."""
    src = ROOT / "models" / "digits_mobilenet.onnx"
    stats = tmp_path / "stats.npz"
    r = cli("quantize", src, "-o", tmp_path / "a.onnx", "--data", digits_calib["digits_mobilenet"], "--save-stats", stats,
            "--report", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    assert "accuracy (cosine)" in r.output and stats.exists()
    r = cli("quantize", src, "-o", tmp_path / "b.onnx", "--data", digits_calib["digits_mobilenet"], "--load-stats", stats,
            "--method", "entropy", "--recover", "bias-correction,cle,adaround", "--report", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    for name in ("a", "b"):
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert rep["accuracy"]["drop"] <= 0.01
        acc = tasks.digits_accuracy(_session(tmp_path / f"{name}.onnx"))
        assert acc >= tasks.digits_accuracy(_session(src)) - 0.01
    # statistics of another model are refused
    r = cli("quantize", ROOT / "models" / "digits_cnn.onnx", "-o", tmp_path / "c.onnx", "--data",
            tasks.write_calibration("digits_cnn", tmp_path / "cnn", 4, 4), "--load-stats", stats)
    assert r.exit_code == 2 and "calibration statistics lack" in r.output
    assert not (tmp_path / "c.onnx").exists()


def test_quantize_dynamic_dims_and_old_opset(cli, tmp_path):
    """An opset-11 export (upgraded for per-channel) and a dynamic-shape CNN both quantize with
    only --data; the dynamic one still runs at another size."""
    for name, shape in (("exporter_opset11", None), ("cnn_dynamic", {"image": (2, 3, 32, 32)})):
        src = ROOT / "models" / f"{name}.onnx"
        data = tasks.write_random_calibration(src, tmp_path / name, 8, shape)
        out = tmp_path / f"{name}.q.onnx"
        r = cli("quantize", src, "-o", out, "--data", data, "--no-latency-guard", "--report", tmp_path / f"{name}.json")
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert rep["recipe"]["quantized_layers"] >= 1
        if name == "exporter_opset11":
            assert any("opset upgraded 11 -> 13" in n for n in rep["notes"])
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 40)).astype(np.float32)
    ref = _session(ROOT / "models" / "cnn_dynamic.onnx").run(None, {"image": x})[0]
    got = _session(tmp_path / "cnn_dynamic.q.onnx").run(None, {"image": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


# ---------------------------------------------------------------- refusals and bad input

def test_already_quantized_models_are_left_alone(cli, tmp_path):
    for name in ("qdq_conv", "integer_ops"):
        src = ROOT / "models" / f"{name}.onnx"
        data = tasks.write_random_calibration(src, tmp_path / name, 2)
        r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", data)
        assert r.exit_code == 2 and "already quantized" in r.output
        assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("case", ["empty", "wrong-name", "wrong-shape", "wrong-dtype", "nan", "missing"])
def test_bad_calibration_data(cli, tmp_path, case):
    src = ROOT / "models" / "digits_cnn.onnx"
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    if case == "wrong-name":
        np.savez(data / "b.npz", pixels=x)
    elif case == "wrong-shape":
        np.savez(data / "b.npz", image=x[:, :, :4])
    elif case == "wrong-dtype":
        np.savez(data / "b.npz", image=x.astype(np.int64))
    elif case == "nan":
        x[0, 0, 0, 0] = np.nan
        for i in range(3):
            np.savez(data / f"b{i}.npz", image=x)
    elif case == "missing":
        data = tmp_path / "nope"
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", data)
    assert r.exit_code == 2, r.output
    expected = {"empty": "no data found", "wrong-name": "image", "wrong-shape": "shape", "wrong-dtype": "float",
                "nan": "NaN", "missing": "no such data"}[case]
    assert expected.lower() in r.output.lower()
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_constant_calibration_batch_warns(cli, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "b.npz", image=np.full((4, 1, 8, 8), 0.5, np.float32))
    r = cli("quantize", ROOT / "models" / "digits_cnn.onnx", "-o", tmp_path / "q.onnx", "--data", data, "--force")
    assert "calibration data is constant" in r.output + caplog.text


def test_usage_errors(cli, tmp_path):
    src = ROOT / "models" / "digits_cnn.onnx"
    data = tasks.write_calibration("digits_cnn", tmp_path / "d", 2, 2)
    for args, msg in ((["--method", "median"], "--method"), (["--recover", "magic"], "--recover"),
                      (["--metric", "nomodule"], "module:function"), (["--ep", "dml"], "quantize targets")):
        r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", data, *args)
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
    r = cli("quantize", src, "-o", tmp_path / "q.onnx")
    assert r.exit_code == 1 and "--data" in r.output


def test_quantize_reports_follow_schema(cli, tmp_path, digits_calib):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    src = ROOT / "models" / "digits_cnn.onnx"
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", digits_calib["digits_cnn"], "--report", tmp_path / "q.json",
            "--max-drop", "0", "--force")  # a zero budget forces the sensitivity ranking into the report
    assert r.exit_code in (0, 3), r.output
    report = json.loads((tmp_path / "q.json").read_text())
    jsonschema.validate(report, schema)
    from onnxopt import report as report_mod

    md = report_mod.render(report, ".md")
    html = report_mod.render(report, ".html")
    assert "| drop (budget) |" in md and "<svg" in html and "Latency" in html
    if report["accuracy"]["drop"] > 0:
        assert report["recipe"]["sensitivity"], "a missed budget ranks layers by sensitivity"
        assert "Sensitivity" in md


# ---------------------------------------------------------------- property: random conv/gemm chains

def _random_chain(draw_layers, rng):
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes, inits, cur, c = [], [], "x", 3
    for i, (kind, width, act) in enumerate(draw_layers):
        if kind == "conv":
            inits += [nh.from_array((rng.standard_normal((width, c, 3, 3)) * 0.3).astype(np.float32), f"w{i}"),
                      nh.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), f"b{i}")]
            nodes.append(h.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"y{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        else:  # pointwise conv written as a 1x1 Conv keeps the 4-D layout
            inits.append(nh.from_array((rng.standard_normal((width, c, 1, 1)) * 0.3).astype(np.float32), f"w{i}"))
            nodes.append(h.make_node("Conv", [cur, f"w{i}"], [f"y{i}"], name=f"pw{i}"))
        cur, c = f"y{i}", width
        if act:
            nodes.append(h.make_node(act, [cur], [f"a{i}"], name=f"act{i}"))
            cur = f"a{i}"
    nodes.append(h.make_node("GlobalAveragePool", [cur], ["g"], name="gap"))
    nodes.append(h.make_node("Flatten", ["g"], ["f"], name="flat"))
    inits.append(nh.from_array((rng.standard_normal((c, 5)) * 0.3).astype(np.float32), "fc"))
    nodes.append(h.make_node("MatMul", ["f", "fc"], ["out"], name="fc"))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 8, 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, ["n", 5])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def test_qdq_insertion_on_random_chains_stays_close():
    """Hypothesis: any Conv/1x1/ReLU/Sigmoid chain quantizes into a valid model; ORT's fused int8
    kernels agree with the QDQ graph run unfused (cosine > 0.999: catches saturating 8-bit weights
    on non-VNNI CPUs), outputs stay within cosine 0.95 of fp32, and planning is deterministic."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    import onnx_ir as ir
    from onnxopt.passes import quantize_qdq as qq

    from onnxopt import runtime

    layer = st.tuples(st.sampled_from(["conv", "pw"]), st.integers(2, 12), st.sampled_from([None, "Relu", "Sigmoid"]))

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(st.lists(layer, min_size=1, max_size=4), st.integers(0, 1000))
    def check(layers, seed):
        rng = np.random.default_rng(seed)
        proto = _random_chain(layers, rng)
        model = ir.from_proto(proto)
        plan = qq.plan(model, qq.PROFILES["cpu"])
        assert plan == qq.plan(model, qq.PROFILES["cpu"])
        names = plan.stats_names()
        sess = runtime.session(runtime.with_outputs(proto, names), "cpu", 1, optimize=False)
        feeds = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
        ranges = calibrate.collect(sess, names, iter(feeds)).ranges("minmax")
        qq.QuantizeQDQ(plan, ranges, qq.PROFILES["cpu"])(model)
        qproto = ir.to_proto(model)
        onnx.checker.check_model(qproto)
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qproto.graph.node}
        ref = runtime.session(proto.SerializeToString(), "cpu", 1)
        got = runtime.session(qproto.SerializeToString(), "cpu", 1)  # ORT fuses to QLinearConv etc.
        sim = runtime.session(qproto.SerializeToString(), "cpu", 1, optimize=False)  # the QDQ reference

        def cos(a, b):
            return a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)

        for f in feeds:
            a, b, c = (s.run(None, f)[0].ravel() for s in (ref, got, sim))
            assert cos(a, b) > 0.95 or np.linalg.norm(a - b) < 1e-3  # quantization error of random tiny layers
            # the fused kernels compute what the QDQ graph says (no saturation); both all-zero is equal too
            assert cos(b, c) > 0.999 or np.array_equal(b, c)

    check()

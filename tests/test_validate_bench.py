"""validate / bench / inspect --cost / reports: real ORT runs, numbers checked."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models.build import deep_mlp
from onnxopt import benchmark as bench
from onnxopt import flops as cost
from onnxopt import validation as validate
from tests.helpers import ROOT, chromium_screenshot

MODELS = ROOT / "models"


def save(model, path):
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------ metrics

def test_metrics_on_arrays():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    noisy = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-3
    c = validate.compare_arrays("y", ref, noisy, validate.Tolerance(metric="cosine"))
    assert c.ok and c.cosine > 0.9999 and 50 < c.snr_db < 70 and c.top1 == 1.0
    assert not validate.compare_arrays("y", ref, noisy, validate.Tolerance(metric="snr", threshold=80)).ok
    assert validate.compare_arrays("y", ref, noisy, validate.Tolerance(metric="max-abs", threshold=1e-2)).ok
    assert not validate.compare_arrays("y", ref, noisy, validate.Tolerance()).ok  # allclose 1e-4/1e-5
    swapped = ref.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    agreement = validate.compare_arrays("y", ref, swapped, validate.Tolerance(metric="topk")).top1
    assert agreement == np.mean(np.isin(np.argmax(ref, -1), [0, 1]) == 0)
    ints = np.arange(6, dtype=np.int64)
    assert not validate.compare_arrays("i", ints, ints + (ints == 3), validate.Tolerance(metric="cosine")).ok
    nan_ref = np.array([1.0, np.nan, 3.0], np.float32)
    assert validate.compare_arrays("n", nan_ref, nan_ref.copy(), validate.Tolerance()).ok
    bad = validate.compare_arrays("n", nan_ref, np.array([1.0, 2.0, 3.0], np.float32), validate.Tolerance(metric="max-abs"))
    assert not bad.ok and "NaN/Inf positions differ" in bad.reason


# ------------------------------------------------------------------ validate command

def test_validate_optimized_model_passes(cli, tmp_path):
    out = tmp_path / "o.onnx"
    assert cli("optimize", MODELS / "yolo_head.onnx", "-o", out, "--no-validate").exit_code == 0
    rep = tmp_path / "v.json"
    result = cli("validate", MODELS / "yolo_head.onnx", out, "--shape", "images:2x3x64x64", "--metric", "snr",
                 "--tol", "60", "--report", rep)
    assert result.exit_code == 0, result.output
    assert "[cpu] ok" in result.output and "detections" in result.output
    report = json.loads(rep.read_text())
    assert report["comparison"]["per_ep"]["cpu"]["outputs"][0]["shape_ref"] == [2, 768, 9]


def test_validate_per_output_tolerance_and_refusal(cli, tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4)).astype(np.float32)

    def two_outputs(scale):
        nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Mul", ["a", "s"], ["b"])]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, 4])],
                         [h.make_tensor_value_info("a", T.FLOAT, [3, 4]), h.make_tensor_value_info("b", T.FLOAT, [3, 4])],
                         [nh.from_array(w, "w"), nh.from_array(np.array(scale, np.float32), "s")])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

    a, b = save(two_outputs(1.0), tmp_path / "a.onnx"), save(two_outputs(1.001), tmp_path / "b.onnx")
    result = cli("validate", a, b)
    assert result.exit_code == 3
    assert "b " in result.output and "FAIL" in result.output
    assert cli("validate", a, b, "--metric", "rel", "--tol", "b=2e-3").exit_code == 0
    assert cli("validate", a, b, "--metric", "rel", "--tol", "b=1e-4").exit_code == 3
    assert cli("validate", a, b, "--ep", "tensorrt").exit_code == 1


def test_validate_rtol_decides(cli, tmp_path):
    """B = A * 1.001: every output differs by 1e-3 relative (float32 rounding: 1e-7), so with
    atol 0 the allclose check passes at --rtol 1.2e-3 and fails at --rtol 0.8e-3."""
    def scaled(scale):
        g = h.make_graph([h.make_node("Mul", ["x", "s"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [8, 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, [8, 16])], [nh.from_array(np.array(scale, np.float32), "s")])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

    a, b = save(scaled(1.0), tmp_path / "a.onnx"), save(scaled(1.001), tmp_path / "b.onnx")
    passed = cli("validate", a, b, "--tol", "0", "--rtol", "1.2e-3")
    assert passed.exit_code == 0, passed.output
    assert "[cpu] ok" in passed.output
    failed = cli("validate", a, b, "--tol", "0", "--rtol", "0.8e-3")
    assert failed.exit_code == 3, failed.output
    assert "rtol=0.0008" in failed.output and "[cpu] DIVERGED" in failed.output


def test_layerwise_finds_corrupted_node_in_500_node_model(cli, tmp_path):
    a = save(deep_mlp(), tmp_path / "a.onnx")
    b = save(deep_mlp(corrupt=90), tmp_path / "b.onnx")
    assert len(onnx.load(str(a)).graph.node) == 500
    rep = tmp_path / "v.json"
    t0 = time.perf_counter()
    result = cli("validate", a, b, "--layerwise", "--report", rep)
    seconds = time.perf_counter() - t0
    assert result.exit_code == 3
    assert "first divergence at node 'block90/matmul' (MatMul)" in result.output
    assert seconds < 30, seconds
    lw = json.loads(rep.read_text())["layerwise"]
    assert lw["pairs"] == 500
    assert all(layer["ok"] for layer in lw["layers"] if layer["index"] < 90 * 4)


def test_layerwise_pairs_renamed_values_by_structure(tmp_path):
    from onnxopt import layerwise
    a = deep_mlp(blocks=3)
    b = deep_mlp(blocks=3)
    for n in b.graph.node:  # rename every intermediate value of B
        n.output[:] = [o + "_renamed" if o != b.graph.output[0].name else o for o in n.output]
        n.input[:] = [i + "_renamed" if i.startswith(("mm", "lin", "act", "res")) and i != b.graph.output[0].name else i
                      for i in n.input]
    pairs = layerwise.match_values(a, b)
    assert sum(1 for p in pairs if p[5] == "structure") == 11 and len(pairs) == 12


# ------------------------------------------------------------------ data sources

def test_data_sources_npz_dir_and_images(cli, tmp_path):
    from PIL import Image
    model = MODELS / "cnn_bn_depthwise.onnx"
    rng = np.random.default_rng(2)
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    for i in range(3):
        np.save(npy_dir / f"{i}.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert cli("optimize", model, "-o", out, "--no-validate").exit_code == 0
    rep = tmp_path / "r.json"
    assert cli("validate", model, out, "--data", npy_dir, "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["comparison"]["batches"] == 3
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    spec = "resize=32x32,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw"
    assert cli("validate", model, out, "--data", images, "--preprocess", spec, "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["comparison"]["batches"] == 4
    assert cli("validate", model, out, "--data", images, "--preprocess", "resize=3").exit_code == 1
    # optimize shares the data options (validation on the first image) and the --ep check
    rep2 = tmp_path / "o.json"
    assert cli("optimize", model, "-o", tmp_path / "o2.onnx", "--data", images, "--preprocess", spec,
               "--report", rep2).exit_code == 0
    assert json.loads(rep2.read_text())["validation"]["ok"]
    assert cli("optimize", model, "-o", tmp_path / "o3.onnx", "--ep", "tensorrt").exit_code == 1
    assert cli("optimize", model, "-o", tmp_path / "o3.onnx", "--ep", "cpu,cpu").exit_code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("validate", model, out, "--data", empty)
    assert result.exit_code == 2 and "no data found" in result.stderr


# ------------------------------------------------------------------ bench

def test_bench_two_models_side_by_side(cli, tmp_path):
    out = tmp_path / "o.onnx"
    assert cli("optimize", MODELS / "transformer_encoder.onnx", "-o", out, "--no-validate").exit_code == 0
    rep = tmp_path / "b.json"
    result = cli("bench", MODELS / "transformer_encoder.onnx", out, "--runs", "20", "--warmup", "3",
                 "--batch", "1,2", "--shape", "tokens:1x8x64", "--report", rep)
    assert result.exit_code == 0, result.output
    results = json.loads(rep.read_text())["results"]
    assert [(r["batch"]) for r in results] == [1, 1, 2, 2]
    for r in results:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and len(r["times_ms"]) == 20
        assert r["throughput"] > 0 and r["load_ms"] > 0
    assert results[0]["speedup_vs_first"] == 1.0


def test_bench_overhead_against_bare_loop(tmp_path, monkeypatch):
    """bench.bench()'s own timed loop adds (almost) nothing over a bare ``sess.run`` loop.

    Both loops drive the *same* session with the same inputs (runtime.session is replaced by one
    returning it; separate sessions differ by up to 11% from session-to-session luck alone), in
    interleaved repeats whose order alternates, on a ~0.1 ms model so that a microsecond of
    overhead is not lost in the model's own noise.  Two things are compared per repeat, as
    microseconds per run: bench's reported p50 against the bare loop's p50, and the wall time of
    one iteration of bench's loop (between consecutive ``progress`` calls) against one iteration
    of the bare loop.  The medians over repeats must stay within 40 us (measured here: 0-10 us
    on a loaded 2-core machine); a loop that synthesized inputs, read RSS or collected garbage per
    run would add 50 us to milliseconds."""
    from onnxopt import runtime

    model = str(save(deep_mlp(blocks=20, width=128), tmp_path / "mlp.onnx"))
    sess = runtime.session(model, threads=1)
    feeds = runtime.synthesize(sess)  # what bench synthesizes too (seed 0)
    real = runtime.session
    monkeypatch.setattr(runtime, "session", lambda m, *a, **k: sess if str(m) == model else real(m, *a, **k))
    n = 40

    def bench_loop():
        ticks = []
        result = bench.bench([model], runs=n, warmup=10, progress=lambda _: ticks.append(time.perf_counter()))
        assert len(result) == 1 and len(result[0].times_ms) == n
        return result[0].p50_ms * 1e3, float(np.median(np.diff(ticks))) * 1e6

    def bare_loop():
        times, ticks = [], []
        for _ in range(10):
            sess.run(None, feeds)
        for _ in range(n):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e6)
            ticks.append(t1)
        return float(np.median(times)), float(np.median(np.diff(ticks))) * 1e6

    p50_extra, loop_extra, bare_p50 = [], [], []
    for repeat in range(21):
        if repeat % 2:
            (ours, ours_loop), (bare, bare_iter) = bench_loop(), bare_loop()
        else:
            (bare, bare_iter), (ours, ours_loop) = bare_loop(), bench_loop()
        p50_extra.append(ours - bare)
        loop_extra.append(ours_loop - bare_iter)
        bare_p50.append(bare)
    p50_us, loop_us = float(np.median(p50_extra)), float(np.median(loop_extra))
    print(f"bench - bare per run: p50 {p50_us:+.1f} us, loop iteration {loop_us:+.1f} us at {np.median(bare_p50):.0f} us")
    assert abs(p50_us) < 40, p50_extra
    assert abs(loop_us) < 40, loop_extra


def test_bench_refuses_symbolic_dims_other_than_batch(cli, tmp_path):
    model = MODELS / "cnn_dynamic.onnx"  # image: [batch, 3, height, width]
    fast = ["--runs", "2", "--warmup", "1"]
    result = cli("bench", model, *fast)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "input 'image'" in lines[0] and "height, width" in lines[0] and "--shape image:1x3x" in lines[0]
    assert "batch" not in lines[0].split("symbolic dim(s)")[1].split("would")[0]  # batch is not blamed
    assert cli("bench", model, *fast, "--batch", "2").exit_code == 1  # --batch sets only the first dim
    rep = tmp_path / "b.json"
    assert cli("bench", model, *fast, "--shape", "image:1x3x16x24", "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["results"][0]["batch"] == 1
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 3, 16, 24), np.float32))
    assert cli("bench", model, *fast, "--data", tmp_path / "d.npz", "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["results"][0]["batch"] == 2
    # a symbolic batch dim alone still runs at 1 (with runtime's warning)
    assert cli("bench", MODELS / "yolo_head.onnx", *fast, "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["results"][0]["batch"] == 1


def test_bench_threads_bind_openvino_through_provider_options(monkeypatch, tmp_path):
    """OpenVINO is not installed here: check what bench hands ONNX Runtime for it."""
    from onnxopt import runtime

    assert runtime.providers("openvino", 1) == [
        ("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": "1"}), ("CPUExecutionProvider", {})]
    assert runtime.providers("openvino", None) == [
        ("OpenVINOExecutionProvider", {"device_type": "CPU"}), ("CPUExecutionProvider", {})]
    assert runtime.providers("cpu", 4) == [("CPUExecutionProvider", {})]  # intra_op_num_threads does it
    assert runtime.providers("cuda", 2) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), ("CPUExecutionProvider", {})]
    assert "OpenVINOExecutionProvider" not in runtime.EP_OPTIONS or \
        "num_of_threads" not in runtime.EP_OPTIONS["OpenVINOExecutionProvider"]  # runtime's own stay untouched

    created = []

    def fake_session(source, opts, providers):
        created.append((opts.intra_op_num_threads, opts.inter_op_num_threads, providers))
        return object()

    monkeypatch.setattr(runtime, "provider", lambda ep: runtime.EP_NAMES[ep])
    monkeypatch.setattr(bench.ort, "InferenceSession", fake_session)
    model = str(save(deep_mlp(blocks=1), tmp_path / "m.onnx"))
    runtime.session(model, "openvino", 3)
    assert created[-1] == (3, 1, [("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": "3"}),
                                  ("CPUExecutionProvider", {})])
    runtime.session(model, "cpu", 2)  # the one session factory
    assert created[-1] == (2, 1, [("CPUExecutionProvider", {})])


def test_bench_cross_ep_ratio_against_first_model_on_cpu(tmp_path, monkeypatch):
    """Two "EPs" that are both ORT's CPU EP underneath (only one EP is installed here): the
    cross-EP column and summary lines are computed off the first model on cpu."""
    from onnxopt import runtime

    heavy = str(save(deep_mlp(blocks=60, width=128), tmp_path / "heavy.onnx"))
    light = str(save(deep_mlp(blocks=3, width=128), tmp_path / "light.onnx"))
    real = runtime.session
    monkeypatch.setattr(runtime, "session", lambda m, ep="cpu", threads=1, **k: real(m, "cpu", threads, **k))
    results = bench.bench([heavy, light], eps=("openvino", "cpu"), runs=15, warmup=2)
    assert [(r.ep, r.model) for r in results] == [("openvino", heavy), ("openvino", light), ("cpu", heavy), ("cpu", light)]
    base = results[2]
    assert base.speedup_vs_cpu_first == 1.0 and base.speedup_vs_first == 1.0
    for r in results:
        assert r.speedup_vs_cpu_first == pytest.approx(base.p50_ms / r.p50_ms)
        assert r.to_dict()["speedup_vs_cpu_first"] == r.speedup_vs_cpu_first
    assert results[1].speedup_vs_cpu_first > 3 and results[3].speedup_vs_cpu_first > 3  # 20x fewer blocks
    text = bench.summary(results)
    assert f"light.onnx on openvino vs heavy.onnx on cpu: {results[1].speedup_vs_cpu_first:.2f}x" in text
    assert f"heavy.onnx on openvino vs heavy.onnx on cpu: {results[0].speedup_vs_cpu_first:.2f}x" in text
    assert f"light.onnx on cpu vs heavy.onnx on cpu: {results[3].speedup_vs_cpu_first:.2f}x" in text
    assert "heavy.onnx on cpu vs" not in text
    # one EP: the table only, one row per result
    assert len(bench.summary(results[2:]).splitlines()) == 3
    # no cpu EP benchmarked: no baseline, no cross-EP lines
    only_ov = bench.bench([light], eps=("openvino", "dml"), runs=3, warmup=1)
    assert [r.speedup_vs_cpu_first for r in only_ov] == [None, None]
    assert len(bench.summary(only_ov).splitlines()) == 3


def test_machine_reads_cpu_model_and_simd_flags():
    x86 = ("processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n\n"
           "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    info = bench.machine(x86)
    assert info["cpu"] == "Test CPU @ 2GHz"  # the first processor's entry
    assert info["simd"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert "fpu" in info["flags"] and "fpu" not in info["simd"]
    arm = bench.machine("processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm\n")
    assert arm["simd"] == ["asimd", "asimddp", "sve", "i8mm"]
    line = bench.machine_line(info)
    assert line.startswith("CPU: Test CPU @ 2GHz,") and "SIMD: sse4_2 avx avx2 fma avx512f avx512_vnni;" in line


# ------------------------------------------------------------------ cost

def test_cost_resnet_block_hand_counted():
    c, hw = 16, 16
    rng = np.random.default_rng(4)
    inits = [nh.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w2"),
             nh.from_array(np.zeros(c, np.float32), "b1")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), h.make_node("Add", ["c2", "x"], ["s"]),
             h.make_node("Relu", ["s"], ["y"]), h.make_node("MaxPool", ["y"], ["p"], kernel_shape=[2, 2], strides=[2, 2])]
    g = h.make_graph(nodes, "res", [h.make_tensor_value_info("x", T.FLOAT, ["n", c, hw, hw])],
                     [h.make_tensor_value_info("p", T.FLOAT, None)], inits)
    model = ir.serde.deserialize_model(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    result = cost.estimate(model, {"x": (2, c, hw, hw)})
    conv_macs = 2 * c * hw * hw * c * 9  # N x C_out x H x W x C_in x 3 x 3
    assert result.by_op()["Conv"] == {"count": 2, "macs": 2 * conv_macs, "flops": 4 * conv_macs + 2 * c * hw * hw}
    elems = 2 * c * hw * hw
    assert result.by_op()["Relu"]["flops"] == 2 * elems and result.by_op()["Add"]["flops"] == elems
    assert result.by_op()["MaxPool"]["flops"] == (elems // 4) * 4
    assert result.parameters == 2 * c * c * 9 + c
    # live at once at most: x (kept for the residual), c1/r1 pair or c2, plus one more
    assert result.peak_activation_bytes == 3 * elems * 4


def test_cost_transformer_block_hand_counted(cli):
    result = cli("inspect", "--cost", "--json", "--shape", "tokens:1x16x64", MODELS / "transformer_encoder.onnx")
    info = json.loads(result.output)["cost"]
    s, d, ff, heads = 16, 64, 128, 4
    expected = s * d * 3 * d + 2 * heads * s * s * (d // heads) + s * d * d + 2 * s * d * ff
    assert info["macs"] == expected == 557_056
    assert info["unknown_nodes"] == []


# ------------------------------------------------------------------ reports

def _schema_validate(report: dict):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)


def test_reports_validate_against_schema_and_render(cli, tmp_path):
    out = tmp_path / "o.onnx"
    paths = {}
    for kind, args in {
        "optimize": ["optimize", MODELS / "yolo_head.onnx", "-o", out],
        "validate": ["validate", MODELS / "yolo_head.onnx", out, "--layerwise"],
        "bench": ["bench", MODELS / "yolo_head.onnx", out, "--runs", "10"],
    }.items():
        for suffix in (".json", ".html", ".md"):
            paths[kind + suffix] = tmp_path / f"{kind}{suffix}"
            result = cli(*args, "--report", paths[kind + suffix])
            assert result.exit_code == 0, (kind, result.output)
        report = json.loads(paths[kind + ".json"].read_text())
        assert report["command"] == kind
        _schema_validate(report)
        page = paths[kind + ".html"].read_text()
        assert page.startswith("<!DOCTYPE html>") and "<svg" in page
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
        assert "https://" not in page
    assert "Cost" in paths["optimize.html"].read_text() and "FLOPs by op type" in paths["optimize.html"].read_text()
    assert "along the graph" in paths["validate.html"].read_text()
    assert "Latency distribution" in paths["bench.html"].read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_html_report_renders_in_chromium(cli, tmp_path):
    out, page = tmp_path / "o.onnx", tmp_path / "report.html"
    assert cli("optimize", MODELS / "cnn_bn_depthwise.onnx", "-o", out, "--report", page).exit_code == 0
    img = chromium_screenshot(page, tmp_path)
    assert img.size == (1200, 1600)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and charts, not a blank page


def test_light_sessions_match_whole_model_sessions(monkeypatch):
    """A model handed to ORT without its large weights in the proto (``runtime.Light``: they go in
    as in-memory external initializers) gives the same outputs as the whole model; small constants
    (a Reshape's shape), a large int64 table that feeds a shape computation (onnx inference reads
    it only inline: the output keeps its static dim) and a large unused weight (ORT drops it and
    would refuse it as external) stay in the proto; the model is left as it was, also when
    serialization fails."""
    from onnxopt import base, runtime, shapes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w16 = rng.standard_normal((32, 32)).astype(np.float16)
    table = np.arange(200, dtype=np.int64)
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Cast", ["y"], ["y16"], to=T.FLOAT16),
         h.make_node("MatMul", ["y16", "w16"], ["z"]), h.make_node("Gather", ["table", "eight"], ["n"]),
         h.make_node("Concat", ["minus1", "four", "n"], ["shape"], axis=0),
         h.make_node("Reshape", ["z", "shape"], ["out"])],
        "light", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 64])],
        [h.make_tensor_value_info("out", T.FLOAT16, None)],
        [nh.from_array(w, "w"), nh.from_array(w16, "w16"), nh.from_array(table, "table"),
         nh.from_array(np.array([8], np.int64), "eight"), nh.from_array(np.array([-1], np.int64), "minus1"),
         nh.from_array(np.array([4], np.int64), "four"), nh.from_array(w.copy(), "unused")])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    tensors = {n: v.const_value for n, v in model.graph.initializers.items()}
    light = runtime.light(model)
    proto = onnx.load_from_string(light.data)
    stored = {t.name: t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer}
    assert {n for n, external in stored.items() if external} == {"w", "w16"} == set(light.initializers)
    assert len(stored) == 7 and len(light.data) < table.nbytes + w.nbytes + 1024  # + the inline unused copy of w
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == tensors
    x = rng.standard_normal((3, 64)).astype(np.float32)
    whole = runtime.session(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    assert whole.shape == (3, 4, 8) and np.array_equal(runtime.session(light).run(None, {"x": x})[0], whole)
    out = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert shapes.infer(model, ort_fallback=False).get(out)[1:] == (4, 8)

    def fail(_model):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(base.ir, "to_proto", fail)
    with pytest.raises(RuntimeError):
        base.light_proto(model)
    assert all(model.graph.initializers[n].const_value is t for n, t in tensors.items())


def test_validate_one_model_needs_two_eps_and_compares_them(cli, tmp_path):
    """validate A alone: one EP is a usage error (exit 1, one line naming the two ways); two EPs run A on
    each against the first (here the CPU EP twice: identical, exit 0, keyed 'cpu vs cpu', no B).  The
    OpenVINO pair, and naming the first diverging node, run for real in tests/test_openvino.py."""
    src = ROOT / "models" / "digits_cnn.onnx"
    r = cli("validate", src)
    assert r.exit_code == 1 and "two or more (--ep cpu,openvino)" in r.output and "give B" in r.output
    rep = tmp_path / "v.json"
    r = cli("validate", src, "--ep", "cpu,cpu", "--tol", "0", "--rtol", "0", "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["b"] is None and list(report["comparison"]["per_ep"]) == ["cpu vs cpu"]
    assert report["comparison"]["per_ep"]["cpu vs cpu"]["outputs"][0]["max_abs"] == 0

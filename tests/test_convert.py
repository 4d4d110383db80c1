"""onnxopt convert --fp16: real ORT sessions, numbers checked against the fp32 original.

Tolerances: the project's fp16 ones, rtol 1e-2 / atol 1e-3 per output (docs/DESIGN.md "Tolerances").
fp16 models are run through ``convert.faithful_session`` (every fp16 tensor rounded), because
the CPU EP otherwise computes chains of fp16 ops in float32 and hides overflow.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import runtime
from onnxopt.precision import convert
from onnxopt.precision import fp16 as cf
from tests.helpers import ROOT, save, sha256

RTOL, ATOL = 1e-2, 1e-3
OVERFLOW = ROOT / "models" / "fp16_overflow.onnx"


def fp32_outputs(path, feeds: dict) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(str(path), "cpu"), feeds)


def fp16_outputs(path, feeds: dict) -> dict[str, np.ndarray]:
    """Outputs of a converted model with every fp16 tensor rounded (float16 inputs fed as float16)."""
    sess, _ = convert.faithful_session(path)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
    return runtime.run(sess, {k: v.astype(np.float16) if k in half else v for k, v in feeds.items()}, names)


def assert_close(ref: dict, got: dict) -> None:
    for name, r in ref.items():
        g = got[name].astype(np.float32)
        assert np.isfinite(g).all(), f"{name}: {np.count_nonzero(~np.isfinite(g))} inf/NaN"
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL, err_msg=name)


def points(batch: int = 4, seq: int = 8) -> list[dict[str, np.ndarray]]:
    """Two input points of the overflow model: different batch sizes and values."""
    return [{"x": np.random.default_rng(s).standard_normal((b, seq, 32)).astype(np.float32)}
            for s, b in ((11, batch), (12, batch - 1))]


def node_dtypes(path) -> dict[str, int]:
    """Node name -> element type of its first output (from shape inference)."""
    model = ir.load(str(path))
    return {n.name: n.outputs[0].dtype for n in model.graph if n.name}


@pytest.fixture
def overflow_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, feeds in enumerate(points(6)):
        np.savez(folder / f"b{i}.npz", **feeds)
    return folder


def test_overflow_model_converts_with_no_inf_or_nan(cli, tmp_path, overflow_data):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", OVERFLOW, "-o", out, "--fp16", "--data", overflow_data, "--report", rep)
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["ranges"]["source"] == "data" and report["ranges"]["batches"] == 2
    kept = {k["node"]: k for k in report["conversion"]["kept_fp32"]}
    # the tensors above 65504 and their producers/consumers stay fp32, with the reason
    assert {"big_matmul", "ln", "scores", "softmax", "square", "mean_square"} <= set(kept)
    assert all(kept[n]["kind"] == "overflow range" for n in ("big_matmul", "scores", "square"))
    assert "reaches |x|" in kept["scores"]["reason"]
    dtypes = node_dtypes(out)
    assert dtypes["scores"] == ir.DataType.FLOAT and dtypes["big_matmul"] == ir.DataType.FLOAT
    assert dtypes["q_proj"] == ir.DataType.FLOAT16 and dtypes["attn"] == ir.DataType.FLOAT16
    m = onnx.load(str(out))
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [T.FLOAT, T.FLOAT]
    assert [o.name for o in m.graph.output] == ["attn", "rms_out"]
    original = onnx.load(str(OVERFLOW))
    assert m.opset_import == original.opset_import and m.producer_name == original.producer_name
    assert [(p.key, p.value) for p in m.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert sum(n.op_type == "Cast" for n in m.graph.node) == report["output"]["casts"] == \
        report["conversion"]["casts_inserted"] > 0
    assert report["validation"]["ok"] and report["validation"]["nonfinite_fp16_tensors"] == {}
    for feeds in points(5):  # two points the ranges were not computed on
        assert_close(fp32_outputs(OVERFLOW, feeds), fp16_outputs(out, feeds))
    assert report["size_ratio"] < 0.8


def test_onnxconverter_common_overflows_on_the_same_model(tmp_path):
    """The property above can fail: the usual converter yields NaN/inf on this model."""
    float16 = pytest.importorskip("onnxconverter_common.float16")
    naive = float16.convert_float_to_float16(onnx.load(str(OVERFLOW)), keep_io_types=True)
    path = save(naive, tmp_path / "naive.onnx")
    got = fp16_outputs(path, points()[0])
    assert sum(np.count_nonzero(~np.isfinite(v)) for v in got.values()) > 0


def test_overflow_model_without_ranges_overflows(tmp_path):
    """convert_model with no observed ranges keeps nothing in fp32 for range reasons -> inf/NaN."""
    model = ir.load(str(OVERFLOW))
    done = cf.convert_model(model)
    assert not any(k.kind == "overflow range" and k.node == "scores" for k in done.kept)
    path = tmp_path / "blind.onnx"
    ir.save(model, str(path))
    got = fp16_outputs(path, points()[0])
    assert np.count_nonzero(~np.isfinite(got["attn"])) > 0


def test_tiny_data_ranges_are_judged_by_the_budget(cli, tmp_path):
    """--data of tiny inputs: the prediction-level budget decides (written, exit 0) and the
    elementwise check is reported beside it (issue 21; this was a refusal, exit 3, when the
    elementwise tolerance decided: one 'attn' value beyond rtol 1e-2 / atol 1e-3).  The elementwise
    misses that no longer refuse: tests/test_convert_budget.py."""
    data = tmp_path / "small.npz"
    np.savez(data, x=(np.random.default_rng(0).standard_normal((2, 8, 32)) * 1e-2).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", OVERFLOW, "-o", out, "--fp16", "--data", data, "--report", rep)
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["written"] and report["validation"]["outputs"] and report["validation"]["points"]
    assert report["accuracy"]["drop"] <= report["accuracy"]["max_drop"] == 0.01
    assert "budget_search" not in report and "elementwise" in res.output and "information" in res.output


_SPOILER = """CALLS = []


def first_only(sess):
    CALLS.append(1)
    return 1.0 if len(CALLS) == 1 else 0.0
"""


def test_a_result_over_budget_is_refused_and_force_writes_it(cli, tmp_path):
    """A --metric that no fp16 candidate meets (1.0 for the fp32 model, 0.0 after): the search
    keeps every node float32 and still misses -> exit 3, nothing written, input unchanged;
    --force writes it."""
    metric = tmp_path / "spoiler.py"
    metric.write_text(_SPOILER)
    before = sha256(OVERFLOW)
    out, rep = tmp_path / "o.onnx", tmp_path / "refused.json"
    res = cli("convert", OVERFLOW, "-o", out, "--fp16", "--metric", f"{metric}:first_only", "--report", rep)
    assert res.exit_code == 3, res.output
    refused = json.loads(rep.read_text())
    assert refused["written"] is False and refused["accuracy"]["drop"] == 1.0
    assert refused["budget_search"]["ranked_nodes"] > 0
    assert "converted model not written" in res.stderr and "--max-drop" in res.stderr
    assert not out.exists() and sha256(OVERFLOW) == before
    res = cli("convert", OVERFLOW, "-o", out, "--fp16", "--metric", f"{metric}:first_only", "--force")
    assert res.exit_code == 0 and out.exists()


def test_no_keep_io_types_makes_the_edges_float16(cli, tmp_path):
    out = tmp_path / "o.onnx"
    res = cli("convert", OVERFLOW, "-o", out, "--fp16", "--no-keep-io-types")
    assert res.exit_code == 0, res.output
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    assert {o.type.tensor_type.elem_type for o in m.graph.output} == {T.FLOAT16}
    for feeds in points(3):
        assert_close(fp32_outputs(OVERFLOW, feeds), fp16_outputs(out, feeds))


def test_block_lists_keep_named_ops_and_nodes_in_float32(cli, tmp_path):
    src = ROOT / "models" / "transformer_encoder.onnx"
    names = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "MatMul"]
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", src, "-o", out, "--fp16", "--op-block-list", "default,Softmax", "--node-block-list", names[0],
              "--report", rep)
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    kinds = {k["node"]: k["kind"] for k in report["conversion"]["kept_fp32"]}
    softmax = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Softmax"]
    assert softmax and all(kinds[s] == "op block list" for s in softmax)
    assert kinds[names[0]] == "node block list"
    dtypes = node_dtypes(out)
    assert dtypes[names[0]] == ir.DataType.FLOAT and dtypes[names[1]] == ir.DataType.FLOAT16
    assert "Softmax" in report["op_block_list"] and "Resize" in report["op_block_list"]


#: crnn: ORT 1.32's CPU EP segfaults on the fp16 Transpose feeding the classifier MatMul at its default
#: optimization level (see test_a_model_that_crashes_ort_is_refused); that node stays float32
WORKAROUNDS = {"crnn": ["--node-block-list", "/rnn/Transpose_2"]}


@pytest.mark.parametrize("name", ["cnn_dynamic", "crnn", "control_flow", "transformer_encoder", "bert_encoder"])
def test_existing_models_convert_and_validate(cli, tmp_path, name):
    src = ROOT / "models" / f"{name}.onnx"
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", src, "-o", out, "--fp16", "--report", rep, *WORKAROUNDS.get(name, []))
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["validation"]["ok"] and report["ranges"]["source"] == "synthesized"
    assert "synthesized" in " ".join(report["notes"])
    m = onnx.load(str(out))
    halves = [i for g in [m.graph] for i in g.initializer if i.data_type == T.FLOAT16]
    assert halves and report["conversion"]["initializers"]["converted"] >= len(halves)
    assert report["size_ratio"] < 1.0 or name == "control_flow"
    original = onnx.load(str(src))
    assert [(o.name, o.type.tensor_type.elem_type) for o in m.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in original.graph.output]
    assert [(i.name, i.type.tensor_type.elem_type) for i in m.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in original.graph.input]
    sess = runtime.session(str(src), "cpu")
    for seed in (3, 4):  # two input points of our own
        feeds = runtime.synthesize(sess, None, seed=seed, quiet=True)
        assert_close(runtime.run(sess, feeds), fp16_outputs(out, feeds))


@pytest.mark.parametrize("name", ["crnn", "rnn_ts", "rnn_dynamo"])
def test_the_nodes_that_crash_ort_are_kept_float32(cli, tmp_path, name):
    """The plainly converted model crashes ORT's CPU EP at its default optimization level (an ORT bug
    with fp16 graphs: crnn's Transpose before an fp16 MatMul, the RNN exports' GRU and its Transposes):
    the check loads candidates in a child process, keeps the fewest nodes float32 that stop the crash
    (one here), says so in one warning, and the written model loads with ORT's defaults and matches."""
    src = ROOT / "models" / f"{name}.onnx"
    probe = tmp_path / "probe.onnx"
    assert cli("convert", src, "-o", probe, "--fp16", "--no-validate").exit_code == 0
    if not convert.crashes_default_session(probe):
        pytest.skip("this ONNX Runtime no longer crashes on the plainly converted model")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", src, "-o", out, "--fp16", "--report", rep)
    assert res.exit_code == 0, res.output
    assert "kept float32 so that ONNX Runtime's CPU EP does not crash" in res.stderr
    assert not convert.crashes_default_session(out)
    notes = json.loads(rep.read_text())["notes"]
    assert any(n.startswith("1 node(s) kept float32") for n in notes), notes


def test_control_flow_bodies_are_converted_inside(tmp_path):
    model = ir.load(str(ROOT / "models" / "control_flow.onnx"))
    done = cf.convert_model(model)
    kept = {k.op: k.kind for k in done.kept}
    assert kept["If"] == "control flow" and kept["Loop"] == "control flow"
    bodies = [g for g in model.graphs() if g is not model.graph]
    assert len(bodies) == 3
    for body in bodies:
        assert all(v.dtype in (ir.DataType.FLOAT, ir.DataType.BOOL) for v in body.outputs)  # body I/O keep their types
        assert any(n.op_type == "Cast" for n in body)
        assert any(o.dtype == ir.DataType.FLOAT16 for n in body for o in n.outputs)
    assert model.graph.initializers["loop_scale"].dtype == ir.DataType.FLOAT16  # read inside the Loop body only


def test_custom_domain_and_integer_tensors_are_untouched(cli, tmp_path):
    src = ROOT / "models" / "custom_domain.onnx"
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert cli("convert", src, "-o", out, "--fp16", "--report", rep).exit_code == 0
    report = json.loads(rep.read_text())
    kinds = {k["op"]: k["kind"] for k in report["conversion"]["kept_fp32"]}
    assert kinds["FusedMatMul"] == "custom domain" and kinds["Gelu"] == "custom domain"
    m = onnx.load(str(out))
    assert all(n.op_type != "Cast" for n in m.graph.node)  # nothing is fp16 next to them: no Casts for nothing
    bert = ROOT / "models" / "bert_encoder.onnx"
    model = ir.load(str(bert))
    int_before = {v.name: v.dtype for n in model.graph for v in n.outputs if v.dtype == ir.DataType.INT64}
    cf.convert_model(model)
    assert {v.name: v.dtype for n in model.graph for v in n.outputs if v.name in int_before} == int_before


@pytest.mark.parametrize("name, message", [("fp16_mlp", "already float16"), ("qdq_conv", "is quantized"),
                                           ("integer_ops", "is quantized")])
def test_fp16_and_quantized_models_are_declined(cli, tmp_path, name, message):
    out = tmp_path / "o.onnx"
    res = cli("convert", ROOT / "models" / f"{name}.onnx", "-o", out, "--fp16")
    assert res.exit_code == 2 and message in res.stderr and "nothing written" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_pass_in_a_pipeline_is_idempotent_and_data_free(cli, tmp_path):
    src = ROOT / "models" / "transformer_encoder.onnx"
    out = tmp_path / "o.onnx"
    res = cli("optimize", src, "-o", out, "-p", "cleanup,convert-fp16{op-block-list=default|Softmax}")
    assert res.exit_code == 0, res.output
    assert "convert-fp16" in res.output and "nodes to fp16" in res.output
    model = ir.load(str(out))
    again = cf.ConvertFloat16()(model)
    assert not again.modified and any("already float16" in r for r in again.skipped)


def _cast_chain_model() -> onnx.ModelProto:
    """MatMul -> Cast(to=FLOAT) -> MatMul, the Cast named in the node block list."""
    rng = np.random.default_rng(0)
    w1, w2 = (nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("w1", "w2"))
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             h.make_node("Cast", ["a"], ["a32"], to=T.FLOAT, name="upcast"),
             h.make_node("MatMul", ["a32", "w2"], ["y"], name="mm2")]
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], [w1, w2])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_lossless_cast_pairs_are_folded(tmp_path):
    """The Cast(fp16->fp32) kept by the op block list followed by the Cast(fp32->fp16) mm2 needs is
    lossless: both go, mm2 reads mm1's fp16 output; the outputs still match."""
    src = save(_cast_chain_model(), tmp_path / "chain.onnx")
    model = ir.load(str(src))
    done = cf.convert_model(model, op_block_list=cf.parse_list("default,Cast", cf.DEFAULT_OP_BLOCK_LIST))
    assert done.casts_folded == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("Cast") == 2  # x to fp16, y back to fp32
    mm2 = next(n for n in model.graph if n.name == "mm2")
    assert mm2.inputs[0].producer().name == "mm1"
    out = tmp_path / "o.onnx"
    ir.save(model, str(out))
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    assert_close(fp32_outputs(src, feeds), fp16_outputs(out, feeds))


def test_a_cast_named_in_the_node_block_list_is_kept():
    """The same pair, but the user named the Cast: it stays (float32), nothing is folded."""
    model = ir.from_proto(_cast_chain_model())
    done = cf.convert_model(model, node_block_list=["upcast"])
    assert done.casts_folded == 0
    upcast = next(n for n in model.graph if n.name == "upcast")
    assert upcast.outputs[0].dtype == ir.DataType.FLOAT and upcast.inputs[0].dtype == ir.DataType.FLOAT16
    assert {"upcast": "node block list"}.items() <= {k.node: k.kind for k in done.kept}.items()


def test_initializers_out_of_range_stay_float32_and_tiny_values_are_counted(tmp_path):
    w = np.full((4, 4), 0.5, np.float32)
    w[0, 0] = 1e-9  # rounds to 0 in fp16
    big = np.full((4,), 1e5, np.float32)  # not representable in fp16
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="mm"), h.make_node("Add", ["a", "big"], ["b"], name="add"),
             h.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = h.make_graph(nodes, "inits", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 4])], [nh.from_array(w, "w"), nh.from_array(big, "big")])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    done = cf.convert_model(model)
    kept = {k.node: k for k in done.kept}
    assert kept["add"].kind == "overflow range" and "constant 'big'" in kept["add"].reason
    assert model.graph.initializers["big"].dtype == ir.DataType.FLOAT
    assert model.graph.initializers["w"].dtype == ir.DataType.FLOAT16
    assert done.initializers["flushed to zero (|x| < 2^-24)"] == 1 and done.initializers["converted"] == 1


def _resize_model() -> onnx.ModelProto:
    """Conv -> Resize (scales input) -> Conv: a shape-typed float input in the middle."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.1, "w1"),
             nh.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.1, "w2"),
             nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Resize", ["c1", "", "scales"], ["up"], mode="nearest", name="resize"),
             h.make_node("Conv", ["up", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = h.make_graph(nodes, "resize", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 16, 16])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("block, resize_dtype", [("default", ir.DataType.FLOAT), ("Range", ir.DataType.FLOAT16)])
def test_resize_is_untouched_by_default_and_keeps_float32_scales(cli, tmp_path, block, resize_dtype):
    src = save(_resize_model(), tmp_path / "resize.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", src, "-o", out, "--fp16", "--op-block-list", block, "--report", rep)
    assert res.exit_code == 0, res.output
    model = ir.load(str(out))
    resize = next(n for n in model.graph if n.op_type == "Resize")
    assert resize.outputs[0].dtype == resize_dtype
    assert resize.inputs[2].dtype == ir.DataType.FLOAT and resize.inputs[2].name == "scales"  # never cast
    kinds = {k["node"]: k["kind"] for k in json.loads(rep.read_text())["conversion"]["kept_fp32"]}
    assert (kinds.get("resize") == "op block list") == (block == "default")
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert_close(fp32_outputs(src, feeds), fp16_outputs(out, feeds))


@pytest.mark.parametrize("args, code, message", [
    (["--data", "MISSING.npz"], 2, "no such data file"),
    (["--limit", "1e6"], 1, "--limit"),
    (["--ep", "openvino"], 1, "convert validates on the CPU EP (--ep cpu)"),
    ([], 1, "--fp16"),
])
def test_bad_input_one_line(cli, tmp_path, args, code, message):
    out = tmp_path / "o.onnx"
    full = ["convert", OVERFLOW, "-o", out] + (["--fp16"] if args != [] else []) + args
    res = cli(*full)
    assert res.exit_code == code, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("batches", ["0", "-2"])
def test_calib_batches_must_be_positive(cli, tmp_path, command, batches):
    data = tmp_path / "d.npz"
    np.savez(data, x=points()[0]["x"])
    out = tmp_path / "o.onnx"
    extra = ["--fp16"] if command == "convert" else []
    res = cli(command, OVERFLOW, "-o", out, *extra, "--data", data, "--calib-batches", batches)
    assert res.exit_code == 1 and "--calib-batches" in res.stderr and "x>=1" in res.stderr, res.stderr
    assert not out.exists()


def test_bad_data_and_same_file(cli, tmp_path):
    data = tmp_path / "wrong.npz"
    np.savez(data, tokens=np.zeros((1, 8, 32), np.float32))
    res = cli("convert", OVERFLOW, "-o", tmp_path / "o.onnx", "--fp16", "--data", data)
    assert res.exit_code == 2 and "do not match model inputs" in res.stderr
    res = cli("convert", OVERFLOW, "-o", OVERFLOW, "--fp16")
    assert res.exit_code == 1 and "is the input file" in res.stderr


def test_reports_render_and_follow_the_schema(cli, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "o.onnx"
    for suffix in ("json", "md", "html"):
        assert cli("convert", OVERFLOW, "-o", out, "--fp16", "--report", tmp_path / f"r.{suffix}").exit_code == 0
    jsonschema.validate(json.loads((tmp_path / "r.json").read_text()),
                        json.loads((ROOT / "docs" / "report.schema.json").read_text()))
    md = (tmp_path / "r.md").read_text()
    assert "Nodes kept in float32" in md and "overflow range" in md and "SYNTHESIZED" in md
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_ops_that_square_internally_use_the_square_of_the_range():
    """LayerNormalization's input reaches 300 (< the limit, fp16-representable) but its variance
    needs 300^2 = 9e4: kept float32 with that reason; at 100 (1e4 < limit) it is converted."""
    def model():
        nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"),
                 h.make_node("LayerNormalization", ["r", "s", "b"], ["y"], axis=-1, name="ln")]
        graph = h.make_graph(nodes, "ln", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                             [h.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                             [nh.from_array(np.ones(8, np.float32), "s"), nh.from_array(np.zeros(8, np.float32), "b")])
        return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8))

    m = model()
    done = cf.convert_model(m, ranges={"x": 300.0, "r": 300.0, "y": 2.0})
    kept = {k.node: k for k in done.kept}
    assert "ln" in kept and "squares its input internally" in kept["ln"].reason
    m = model()
    done = cf.convert_model(m, ranges={"x": 100.0, "r": 100.0, "y": 2.0})
    assert "ln" not in {k.node for k in done.kept}
    assert next(n for n in m.graph if n.name == "ln").outputs[0].dtype == ir.DataType.FLOAT16


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=ir_version)


def _vec(name: str, elem=T.FLOAT, shape=(4,)):
    return h.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def _converted(proto: onnx.ModelProto, tmp_path, **kw) -> tuple:
    """convert_model on ``proto``; the result is checked by onnx (full check) and saved."""
    model = ir.from_proto(proto)
    done = cf.convert_model(model, **kw)
    out = tmp_path / "converted.onnx"
    ir.save(model, str(out))
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return model, done, out


def test_optimize_with_convert_fp16_uses_the_fp16_faithful_check(cli, tmp_path):
    """The plain CPU session computes the fp16 chain in float32 and sees no overflow; optimize now
    checks like convert (every fp16 tensor rounded): refused (exit 3), nothing written, the
    overflowing output named; --verify-each names the pass."""
    out = tmp_path / "o.onnx"
    res = cli("optimize", OVERFLOW, "-o", out, "-p", "convert-fp16", "--strict")
    assert res.exit_code == 3, res.output
    assert "optimized model not written" in res.stderr and "attn" in res.stderr and "NaN/Inf" in res.stderr
    assert not out.exists()
    res = cli("optimize", OVERFLOW, "-o", out, "-p", "cleanup,convert-fp16", "--verify-each")
    assert res.exit_code == 3 and "pass 'convert-fp16' changed the outputs" in res.stderr, res.output
    assert not out.exists()
    # without --strict the overflowing conversion is rolled back: the float result is written
    res = cli("optimize", OVERFLOW, "-o", out, "-p", "cleanup,convert-fp16")
    assert res.exit_code == 0 and "pass 'convert-fp16' changed the outputs" in res.stderr, res.output
    assert out.exists() and all(t.data_type != onnx.TensorProto.FLOAT16 for t in onnx.load(str(out)).graph.initializer)


def _shared_constant_model(kind: str) -> onnx.ModelProto:
    """eps = 1e-8 (0 in fp16) read by an fp16 Add and by Div/Mul named in the node block list:
    z = (x / eps) * eps is NaN if the fp32 readers get the fp16 eps."""
    inits = []
    if kind == "Constant":
        const = h.make_node("Constant", [], ["eps"], value=h.make_tensor("v", T.FLOAT, [], [1e-8]), name="const")
    elif kind == "value_float":
        const = h.make_node("Constant", [], ["eps"], value_float=1e-8, name="const")
    elif kind == "ConstantOfShape":
        inits = [nh.from_array(np.array([4], np.int64), "shape")]
        const = h.make_node("ConstantOfShape", ["shape"], ["eps"], value=h.make_tensor("v", T.FLOAT, [1], [1e-8]),
                            name="const")
    else:  # an initializer
        inits, const = [nh.from_array(np.array(1e-8, np.float32), "eps")], None
    nodes = [h.make_node("Add", ["x", "eps"], ["a"], name="add16"), h.make_node("Mul", ["a", "x"], ["y"], name="mul16"),
             h.make_node("Div", ["x", "eps"], ["d"], name="div32"), h.make_node("Mul", ["d", "eps"], ["z"], name="mul32")]
    return _model(([const] if const is not None else []) + nodes, [_vec("x")], [_vec("y"), _vec("z")], inits)


@pytest.mark.parametrize("kind", ["Constant", "value_float", "ConstantOfShape", "initializer"])
def test_a_constant_read_by_fp16_and_fp32_nodes_stays_float32(tmp_path, kind):
    proto = _shared_constant_model(kind)
    model, done, out = _converted(proto, tmp_path, node_block_list=["div32", "mul32"])
    src = save(proto, tmp_path / "src.onnx")
    feeds = {"x": np.array([1, 0.5, 2, 3], np.float32)}
    assert_close(fp32_outputs(src, feeds), fp16_outputs(out, feeds))  # z is NaN with eps rounded to 0
    eps = next(v for n in model.graph for v in n.inputs if v is not None and v.name == "eps")
    assert eps.dtype == ir.DataType.FLOAT
    add16 = next(n for n in model.graph if n.name == "add16")
    assert add16.outputs[0].dtype == ir.DataType.FLOAT16 and add16.inputs[1].producer().op_type == "Cast"
    if kind == "initializer":
        assert done.initializers["kept float32"] == 1 and done.initializers["converted"] == 0
    else:
        assert {k.node: k.kind for k in done.kept}["const"] == "shared constant"


def test_constants_read_only_by_fp16_nodes_are_converted_and_counted(tmp_path):
    """1e-8 flushes to 0 in fp16, 1e-5 is subnormal: counted like initializers' values."""
    consts = [h.make_node("Constant", [], ["c"], value=nh.from_array(np.array([1e-8, 1e-5, 0.5, 2], np.float32)), name="c"),
              h.make_node("Constant", [], ["k"], value_float=3.0, name="k")]
    nodes = consts + [h.make_node("Mul", ["x", "c"], ["a"], name="mul"), h.make_node("Add", ["a", "k"], ["y"], name="add")]
    model, done, _ = _converted(_model(nodes, [_vec("x")], [_vec("y")]), tmp_path)
    counts = done.initializers
    assert counts["flushed to zero (|x| < 2^-24)"] == 1 and counts["subnormal in fp16 (|x| < 2^-14)"] == 1
    assert counts["converted (Constant nodes)"] == 2
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in model.graph if n.op_type == "Constant")


def _type_constraint_models() -> dict[str, tuple[onnx.ModelProto, dict]]:
    x, feeds = _vec("x"), {"x": np.array([-1, 0.5, 2, -3], np.float32)}
    sq = h.make_node("Mul", ["x", "x"], ["a"], name="m")
    tokens = nh.from_array(np.array([[2, 3, 3, 5]], np.int64), "tokens")
    tfidf = h.make_node("TfIdfVectorizer", ["tokens"], ["tf"], mode="TF", min_gram_length=1, max_gram_length=1,
                        max_skip_count=0, ngram_counts=[0], ngram_indexes=[0, 1], pool_int64s=[2, 3], name="tfidf")
    return {
        "Celu": (_model([sq, h.make_node("Celu", ["a"], ["y"], name="op")], [x], [_vec("y")]), feeds),
        "IsInf": (_model([sq, h.make_node("IsInf", ["a"], ["y"], name="op")], [x], [_vec("y", T.BOOL)], opset=13), feeds),
        "TfIdfVectorizer": (_model([tfidf, h.make_node("Mul", ["tf", "x2"], ["y"], name="op")],
                                   [_vec("x2", shape=(1, 2))], [_vec("y", shape=(1, 2))], [tokens]),
                            {"x2": np.array([[0.5, 3]], np.float32)}),
    }


@pytest.mark.parametrize("name", ["Celu", "IsInf", "TfIdfVectorizer"])
def test_ops_whose_schema_forbids_float16_stay_float32(tmp_path, name):
    """Celu (float only), IsInf before opset 20, TfIdfVectorizer's float output: the model written
    is valid (onnx full check) and runs; the node is kept with the reason."""
    proto, feeds = _type_constraint_models()[name]
    model, done, out = _converted(proto, tmp_path)
    kept = {k.node: k for k in done.kept}
    target = "tfidf" if name == "TfIdfVectorizer" else "op"
    assert kept[target].kind == "type constraint" and "does not allow float16" in kept[target].reason
    src = save(proto, tmp_path / "src.onnx")
    ref, got = fp32_outputs(src, feeds), fp16_outputs(out, feeds)
    for k, r in ref.items():
        np.testing.assert_allclose(got[k].astype(r.dtype), r, rtol=RTOL, atol=ATOL)


def test_isinf_from_opset_20_is_converted(tmp_path):
    proto = _model([h.make_node("Mul", ["x", "x"], ["a"], name="m"), h.make_node("IsInf", ["a"], ["y"], name="op")],
                   [_vec("x")], [_vec("y", T.BOOL)], opset=20)
    model, done, _ = _converted(proto, tmp_path)
    assert "op" not in {k.node for k in done.kept}
    assert next(n for n in model.graph if n.name == "op").inputs[0].dtype == ir.DataType.FLOAT16


def test_mel_weight_matrix_is_blocked_by_default_and_the_model_runs(cli, tmp_path):
    """MelWeightMatrix (fp16 allowed by its schema, no fp16 kernel in ORT) stays float32 by default:
    the conversion validates; HammingWindow next to it runs in fp16."""
    inits = [nh.from_array(np.array(v, np.int64), n) for n, v in (("bins", 4), ("dft", 8), ("sr", 16000), ("n", 4))] + \
        [nh.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 8000.0))]
    nodes = [h.make_node("MelWeightMatrix", ["bins", "dft", "sr", "lo", "hi"], ["mel"], name="mel"),
             h.make_node("HammingWindow", ["n"], ["w"], name="ham"),
             h.make_node("MatMul", ["x", "mel"], ["a"], name="mm"), h.make_node("Mul", ["a", "w"], ["y"], name="mul")]
    src = save(_model(nodes, [_vec("x", shape=(1, 5))], [_vec("y", shape=(1, 4))], inits), tmp_path / "mel.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("convert", src, "-o", out, "--fp16", "--report", rep)
    assert res.exit_code == 0, res.output
    kinds = {k["node"]: k["kind"] for k in json.loads(rep.read_text())["conversion"]["kept_fp32"]}
    assert kinds["mel"] == "op block list" and "ham" not in kinds
    assert node_dtypes(out)["ham"] == ir.DataType.FLOAT16
    res = cli("convert", src, "-o", tmp_path / "o2.onnx", "--fp16", "--op-block-list", "Range")
    assert res.exit_code == 3 and "fails on ONNX Runtime" in res.stderr  # unblocked: refused, not written
    assert not (tmp_path / "o2.onnx").exists()


def test_output_datatype_attributes_follow_the_output(cli, tmp_path):
    """HannWindow's float32 default and BlackmanWindow's explicit output_datatype=1 become 10
    (float16) with the output; --no-validate writes a valid model."""
    size = nh.from_array(np.array(4, np.int64), "n")
    nodes = [h.make_node("HannWindow", ["n"], ["w1"], name="hann"),
             h.make_node("BlackmanWindow", ["n"], ["w2"], output_datatype=T.FLOAT, name="blackman"),
             h.make_node("Mul", ["x", "w1"], ["a"], name="m1"), h.make_node("Mul", ["a", "w2"], ["y"], name="m2")]
    src = save(_model(nodes, [_vec("x")], [_vec("y")], [size]), tmp_path / "win.onnx")
    out = tmp_path / "o.onnx"
    assert cli("convert", src, "-o", out, "--fp16", "--no-validate").exit_code == 0
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in m.graph.node}
    assert attrs["hann"]["output_datatype"] == T.FLOAT16 and attrs["blackman"]["output_datatype"] == T.FLOAT16
    feeds = {"x": np.array([-1, 0.5, 2, -3], np.float32)}
    assert_close(fp32_outputs(src, feeds), fp16_outputs(out, feeds))


def test_a_graph_output_listed_twice_keeps_its_names(tmp_path):
    w = nh.from_array(np.eye(4, dtype=np.float32) * 1.5, "w")
    proto = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vec("x", shape=(1, 4))],
                   [_vec("y", shape=(1, 4)), _vec("y", shape=(1, 4))], [w])
    model, done, out = _converted(proto, tmp_path)
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["y", "y"]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [T.FLOAT, T.FLOAT]
    assert done.casts_inserted == 2  # x to fp16, y back once
    feeds = {"x": np.array([[1, 0.5, 2, 3]], np.float32)}
    assert_close(fp32_outputs(save(proto, tmp_path / "src.onnx"), feeds), fp16_outputs(out, feeds))


def _old_opset_model(opset: int) -> onnx.ModelProto:
    """Mul/Add/Max -> Resize (opset 10/11) or Upsample (9) -> Clip (inputs at 11, attributes before) -> Mul."""
    inits = [nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    if opset == 11:
        inits += [nh.from_array(np.array([], np.float32), "roi"), nh.from_array(np.array(0.5, np.float32), "lo"),
                  nh.from_array(np.array(2.5, np.float32), "hi")]
        resize = h.make_node("Resize", ["mx", "roi", "scales"], ["r"], name="rs")
        clip = h.make_node("Clip", ["r", "lo", "hi"], ["c"], name="clip")
    else:
        resize = h.make_node("Resize" if opset == 10 else "Upsample", ["mx", "scales"], ["r"], name="rs")
        clip = h.make_node("Clip", ["r"], ["c"], min=0.5, max=2.5, name="clip")
    nodes = [h.make_node("Mul", ["x", "x"], ["xx"], name="m0"), h.make_node("Add", ["xx", "x"], ["x2"], name="a0"),
             h.make_node("Max", ["x2", "x"], ["mx"], name="mx"), resize, clip, h.make_node("Mul", ["c", "c"], ["y"], name="m1")]
    return _model(nodes, [_vec("x", shape=(1, 1, 2, 2))], [_vec("y", shape=(1, 1, 4, 4))], inits, opset=opset,
                  ir_version=6 if opset < 11 else 7)


@pytest.mark.parametrize("opset", [9, 10, 11])
@pytest.mark.parametrize("block", [(), cf.DEFAULT_OP_BLOCK_LIST])
def test_models_below_opset_13(tmp_path, opset, block):
    """Opset 9-11 schemas (Upsample, Resize without roi, Clip with attributes): valid and close,
    opset kept; with an empty block list Resize/Upsample run fp16 with float32 scales."""
    proto = _old_opset_model(opset)
    model, done, out = _converted(proto, tmp_path, op_block_list=block)
    assert model.opset_imports[""] == opset and not done.declined
    rs = next(n for n in model.graph if n.name == "rs")
    assert rs.outputs[0].dtype == (ir.DataType.FLOAT16 if not block else ir.DataType.FLOAT)
    assert next(v for v in rs.inputs if v is not None and v.name == "scales").dtype == ir.DataType.FLOAT
    assert next(n for n in model.graph if n.name == "clip").outputs[0].dtype == ir.DataType.FLOAT16
    feeds = {"x": np.array([[[[0.25, 0.5], [1.0, 1.5]]]], np.float32)}
    assert_close(fp32_outputs(save(proto, tmp_path / "src.onnx"), feeds), fp16_outputs(out, feeds))


def test_no_keep_io_types_with_control_flow(cli, tmp_path):
    """If/Loop bodies: main-graph edges become float16, body inputs/outputs keep their types."""
    src = ROOT / "models" / "control_flow.onnx"
    out = tmp_path / "o.onnx"
    res = cli("convert", src, "-o", out, "--fp16", "--no-keep-io-types")
    assert res.exit_code == 0, res.output
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == T.FLOAT16
    model = ir.load(str(out))
    bodies = [g for g in model.graphs() if g is not model.graph]
    assert bodies and all(v.dtype in (ir.DataType.FLOAT, ir.DataType.BOOL, ir.DataType.INT64)
                          for g in bodies for v in (*g.inputs, *g.outputs))
    sess = runtime.session(str(src), "cpu")
    for seed in (3, 4):
        feeds = runtime.synthesize(sess, None, seed=seed, quiet=True)
        assert_close(runtime.run(sess, feeds), fp16_outputs(out, feeds))


def test_faithful_session_ignores_stale_value_info(tmp_path):
    """value_info declaring an fp16 tensor float32 (as other converters leave it): the tensor is
    still found (types from inference) and rounded, so 300^2 overflows to inf as on a GPU."""
    nodes = [h.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16, name="c1"), h.make_node("Mul", ["xh", "xh"], ["sq"], name="mul"),
             h.make_node("Cast", ["sq"], ["y"], to=T.FLOAT, name="c2")]
    proto = _model(nodes, [_vec("x", shape=(2,))], [_vec("y", shape=(2,))])
    proto.graph.value_info.append(_vec("sq", shape=(2,)))
    sess, fp16 = convert.faithful_session(save(proto, tmp_path / "stale.onnx"))
    assert fp16 == ["xh", "sq"]
    got = runtime.run(sess, {"x": np.array([300, 1], np.float32)})
    assert np.isinf(got["sq"][0]) and got["y"][1] == 1.0


def test_sequence_values_are_never_typed_as_tensors(tmp_path):
    """SplitToSequence -> SequenceAt: the sequence has no tensor type; its nodes stay float32
    ("unknown type") and the model written stays valid (a sequence retyped as a float16 tensor
    would not load)."""
    nodes = [h.make_node("Mul", ["x", "x"], ["a"], name="m0"), h.make_node("SplitToSequence", ["a"], ["s"], axis=0, name="split"),
             h.make_node("SequenceAt", ["s", "i"], ["e"], name="at"), h.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    inits = [nh.from_array(np.array(1, np.int64), "i"), nh.from_array(np.eye(2, dtype=np.float32) * 2, "w")]
    proto = _model(nodes, [_vec("x", shape=(4, 2))], [_vec("y", shape=(1, 2))], inits)
    model, done, out = _converted(proto, tmp_path)
    kinds = {k.node: k.kind for k in done.kept}
    assert kinds["split"] == "unknown type" and kinds["at"] == "unknown type"
    assert next(n for n in model.graph if n.name == "mm").outputs[0].dtype == ir.DataType.FLOAT16
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(4, 2) / 8}
    assert_close(fp32_outputs(save(proto, tmp_path / "src.onnx"), feeds), fp16_outputs(out, feeds))

"""fold-shapes, cse and simplify: op types after the pass, outputs on ORT for several input sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import pipeline
from tests.helpers import ort_run


def i64(name, values):
    return nh.from_array(np.array(values, np.int64), name)


def run_pipeline(proto, text):
    model = ir.serde.deserialize_model(proto)
    result = pipeline.run(model, pipeline.parse(text))
    return result, ir.to_proto(model)


def assert_same(a, b, feeds_list, rtol=0.0, atol=0.0):
    for feeds in feeds_list:
        for x, y in zip(ort_run(a, feeds), ort_run(b, feeds)):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def ops(proto):
    return [n.op_type for n in proto.graph.node]


def _flatten_by_batch(batch_dim="batch"):
    """y = Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])): the classic export of flatten."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             h.make_node("Unsqueeze", ["b", "axes0"], ["b1"]), h.make_node("Concat", ["b1", "minus1"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [batch_dim, 3, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [batch_dim, 12])],
                     [i64("zero", 0), i64("axes0", [0]), i64("minus1", [-1])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 14)])


def test_fold_shapes_symbolic_batch_becomes_copy_dim():
    proto = _flatten_by_batch()
    result, new = run_pipeline(proto, "fold-shapes,cleanup")
    assert ops(new) == ["Reshape"]
    shape = [nh.to_array(t) for t in new.graph.initializer if t.name == new.graph.node[0].input[1]][0]
    assert shape.tolist() == [0, -1]
    rng = np.random.default_rng(0)
    assert_same(proto, new, [{"x": rng.standard_normal((n, 3, 4)).astype(np.float32)} for n in (1, 5)])


def test_fold_shapes_static_folds_to_constant():
    proto = _flatten_by_batch(batch_dim=2)
    result, new = run_pipeline(proto, "fold-shapes,fold-constants,cleanup")
    assert ops(new) == ["Reshape"]
    assert any("folded to a constant" in k for r in result.records for k in r.changed)


def test_fold_shapes_declines_two_unknown_dims():
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "idx"], ["hw"], axis=0),
             h.make_node("Concat", ["hw", "minus1"], ["shape"], axis=0),  # [W, H, -1]: two not copyable
             h.make_node("Reshape", ["x", "shape"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", "h", "w"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [i64("idx", [2, 1]), i64("minus1", [-1])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 14)])
    model = ir.serde.deserialize_model(proto)
    from onnxopt.passes.fold_shapes import FoldShapes
    result = FoldShapes()(model)
    assert result.skipped == {"Reshape kept: more than one dim unknown": 1} and not result.modified


def test_fold_shapes_ignores_wrong_declared_output_shape():
    """The onnxslim bug: a declared output shape that is wrong must not be believed."""
    nodes = [h.make_node("Relu", ["x"], ["y"]), h.make_node("Shape", ["y"], ["s"]),
             h.make_node("Reshape", ["x", "s"], ["z"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 99]),  # wrong declaration
                      h.make_tensor_value_info("z", T.FLOAT, [1, 99])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 14)])
    result, new = run_pipeline(proto, pipeline.DEFAULT_PIPELINE)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    outs = ort_run(new, {"x": x})
    assert [o.shape for o in outs] == [(3, 6), (3, 6)]
    # declared (wrong) output metadata is the user's and is preserved untouched
    assert [d.dim_value for d in new.graph.output[0].type.tensor_type.shape.dim] == [1, 99]


def test_wrong_declared_output_shape_is_reported(cli, tmp_path):
    nodes = [h.make_node("Relu", ["x"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 99])])
    path = tmp_path / "m.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 14)]), str(path))
    rep = tmp_path / "r.json"
    result = cli("optimize", path, "-o", tmp_path / "o.onnx", "--report", rep)
    assert result.exit_code == 0
    assert "output 'y' is declared [1, 99] but the model produces [3, 6]" in result.stderr
    import json
    assert json.loads(rep.read_text())["declared_output_shape_mismatches"] == [
        {"output": "y", "declared": [1, 99], "actual": [3, 6]}]


def test_cse_merges_duplicates_in_graph_and_branches():
    then_g = h.make_graph([h.make_node("Neg", ["x"], ["a"]), h.make_node("Neg", ["x"], ["b"]),
                           h.make_node("Add", ["a", "b"], ["t_out"])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Abs", ["x"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    nodes = [h.make_node("Relu", ["x"], ["r1"]), h.make_node("Relu", ["x"], ["r2"]),
             h.make_node("Add", ["r1", "r2"], ["s"]), h.make_node("ReduceSum", ["s"], ["c0"], keepdims=0),
             h.make_node("Cast", ["c0"], ["c"], to=T.BOOL),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             h.make_node("Sigmoid", ["x"], ["o1"]), h.make_node("Sigmoid", ["x"], ["o2"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                     [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("y", "o1", "o2")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    result, new = run_pipeline(proto, "cse")
    assert ops(new).count("Relu") == 1
    assert ops(new).count("Sigmoid") == 2  # both are graph outputs: kept
    then_after = [a.g for a in new.graph.node[ops(new).index("If")].attribute if a.name == "then_branch"][0]
    assert [n.op_type for n in then_after.node] == ["Neg", "Add"]
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    assert_same(proto, new, [{"x": x}, {"x": -np.abs(x)}])


# ------------------------------------------------------------------ simplify

def _model(nodes, inits=(), x_shape=(2, 3, 4), opset=17, x_type=T.FLOAT, outputs=("y",)):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", x_type, list(x_shape))],
                     [h.make_tensor_value_info(o, x_type, None) for o in outputs], list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def f32(name, values):
    return nh.from_array(np.asarray(values, np.float32), name)


def _simplified(proto, x_shape=(2, 3, 4), x_dtype=np.float32, rtol=1e-6, atol=1e-6):
    result, new = run_pipeline(proto, "simplify,cleanup")
    rng = np.random.default_rng(5)
    assert_same(proto, new, [{"x": rng.standard_normal(x_shape).astype(x_dtype)}], rtol=rtol, atol=atol)
    return result, new


@pytest.mark.parametrize("op, const, swap", [("Add", 0.0, False), ("Add", 0.0, True), ("Sub", 0.0, False),
                                             ("Mul", 1.0, False), ("Mul", 1.0, True), ("Div", 1.0, False)])
def test_simplify_neutral_elements(op, const, swap):
    ins = ["c", "x"] if swap else ["x", "c"]
    nodes = [h.make_node(op, ins, ["a"]), h.make_node("Relu", ["a"], ["y"])]
    _, new = _simplified(_model(nodes, [f32("c", [const] * 4)]))
    assert ops(new) == ["Relu"]


def test_simplify_neutral_element_that_broadcasts_is_kept():
    nodes = [h.make_node("Add", ["x", "c"], ["a"]), h.make_node("Relu", ["a"], ["y"])]
    _, new = _simplified(_model(nodes, [f32("c", np.zeros((5, 2, 3, 4)))]))
    assert ops(new) == ["Add", "Relu"]


def test_simplify_never_reassociates_constant_chains():
    """(x*4)*0.5 is not x*2 at x = 1e38 (x*4 overflows), and (x*3)*0.1 rounds differently than
    x*0.3 (a Cast to fp16 after it shows it): constant chains stay as they are."""
    nodes = [h.make_node("Add", ["x", "c1"], ["a"]), h.make_node("Sub", ["a", "c2"], ["b"]),
             h.make_node("Mul", ["b", "k1"], ["n"]), h.make_node("Mul", ["k2", "n"], ["m"]),
             h.make_node("Mul", ["m", "k3"], ["p"]), h.make_node("Mul", ["p", "k4"], ["q"]),
             h.make_node("Cast", ["q"], ["h"], to=T.FLOAT16), h.make_node("Cast", ["h"], ["y"], to=T.FLOAT)]
    inits = [f32("c1", [1, 2, 3, 4]), f32("c2", [0.5]), f32("k1", 4.0), f32("k2", [0.5, 0.5, 2, 2]), f32("k3", 0.1),
             f32("k4", 0.7)]
    _, new = run_pipeline(_model(nodes, inits), "simplify,cleanup")
    assert ops(new) == ["Add", "Sub", "Mul", "Mul", "Mul", "Mul", "Cast", "Cast"]
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32)} for _ in range(2)]
    feeds.append({"x": np.full((2, 3, 4), 1e38, np.float32)})
    assert_same(_model(nodes, inits), new, feeds)


def test_simplify_transposes_reshapes_squeezes():
    nodes = [h.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]), h.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0, 2]),
             h.make_node("Reshape", ["t2", "s1"], ["r1"]), h.make_node("Reshape", ["r1", "s2"], ["r2"]),
             h.make_node("Unsqueeze", ["r2", "ax"], ["u"]), h.make_node("Squeeze", ["u", "ax"], ["q"]),
             h.make_node("Transpose", ["q"], ["y"], perm=[1, 0])]
    inits = [i64("s1", [6, 4]), i64("s2", [4, 6]), i64("ax", [0])]
    _, new = _simplified(_model(nodes, inits))
    assert ops(new) == ["Reshape", "Transpose"]


def test_simplify_casts():
    nodes = [h.make_node("Cast", ["x"], ["a"], to=T.FLOAT), h.make_node("Cast", ["a"], ["b"], to=T.DOUBLE),
             h.make_node("Cast", ["b"], ["c"], to=T.FLOAT), h.make_node("Cast", ["c"], ["d"], to=T.FLOAT16),
             h.make_node("Cast", ["d"], ["y"], to=T.FLOAT)]
    result, new = _simplified(_model(nodes), rtol=0, atol=0)
    assert ops(new) == ["Cast", "Cast"]  # f32 -> f16 -> f32 loses precision: kept
    assert any("loses information" in k for r in result.records for k in r.skipped)


def test_simplify_noop_ops():
    nodes = [h.make_node("Concat", ["x"], ["a"], axis=0), h.make_node("Expand", ["a", "e"], ["b"]),
             h.make_node("Tile", ["b", "reps"], ["c"]), h.make_node("Slice", ["c", "st", "en"], ["d"]),
             h.make_node("Pad", ["d", "pads"], ["p"]), h.make_node("Resize", ["p", "", "sc"], ["rs"], mode="linear"),
             h.make_node("Relu", ["rs"], ["y"])]
    inits = [i64("e", [3, 1]), i64("reps", [1, 1, 1]), i64("st", [0, 0]), i64("en", [2**63 - 1, 3]),
             i64("pads", [0] * 6), f32("sc", [1.0, 1.0, 1.0])]
    _, new = _simplified(_model(nodes, inits))
    assert ops(new) == ["Relu"]


def test_simplify_pad_into_conv_and_matmul_add_gemm():
    rng = np.random.default_rng(6)
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"]), h.make_node("Conv", ["p", "w"], ["c"], pads=[0, 1, 0, 1]),
             h.make_node("Flatten", ["c"], ["f"]), h.make_node("MatMul", ["f", "fw"], ["m"]),
             h.make_node("Add", ["m", "fb"], ["y"])]
    inits = [i64("pads", [0, 0, 1, 0, 0, 0, 1, 0]), f32("w", rng.standard_normal((2, 3, 3, 3))),
             f32("fw", rng.standard_normal((2 * 6 * 4, 5))), f32("fb", rng.standard_normal(5))]
    proto = _model(nodes, inits, x_shape=(1, 3, 6, 4))
    _, new = _simplified(proto, x_shape=(1, 3, 6, 4), rtol=1e-5, atol=1e-5)
    assert ops(new) == ["Conv", "Flatten", "Gemm"]
    conv = new.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "pads"][0] == [1, 1, 1, 1]
    assert new.graph.output[0].name == "y"


def test_simplify_is_idempotent_on_reference_models():
    from tests.helpers import MODELS
    for path in MODELS:
        model = ir.serde.deserialize_model(onnx.load(str(path)))
        pipeline.run(model, pipeline.parse(pipeline.DEFAULT_PIPELINE))
        second = pipeline.run(model, pipeline.parse(pipeline.DEFAULT_PIPELINE))
        assert not any(r.modified for r in second.records), path.name


# ------------------------------------------------------------------ fuse-transformer

BERT_PIPELINE = "cleanup,fold-constants,fold-shapes,simplify,dedup,cse,fuse-transformer{model-type=bert}"


def test_fuse_transformer_on_bert(cli, tmp_path):
    from tests.helpers import ROOT
    out, rep = tmp_path / "b.onnx", tmp_path / "r.json"
    result = cli("optimize", ROOT / "models" / "bert_encoder.onnx", "-o", out, "-p", BERT_PIPELINE,
                 "--shape", "input_ids:2x12", "--shape", "attention_mask:2x12", "--report", rep)
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(rep.read_text())
    assert report["validation"]["ok"] and report["validation"]["max_abs"] < 1e-5
    ops_after = report["output"]["ops"]
    assert ops_after["com.microsoft::Attention"] == 2 and ops_after["com.microsoft::SkipLayerNormalization"] == 4
    assert report["output"]["nodes"] <= 30


def test_fuse_transformer_skips_a_fusion_that_changes_outputs(cli, tmp_path):
    """ORT's fused Attention reads the mask as 0/1; on data with other mask values that fusion
    diverges: the pass checks its candidates on the validation's inputs and keeps none that differ."""
    from tests.helpers import ROOT
    data = tmp_path / "d.npz"
    np.savez(data, input_ids=np.arange(24, dtype=np.int64).reshape(2, 12) % 100,
             attention_mask=np.full((2, 12), 3, np.int64))
    out, rep = tmp_path / "b.onnx", tmp_path / "r.json"
    result = cli("optimize", ROOT / "models" / "bert_encoder.onnx", "-o", out, "-p", BERT_PIPELINE, "--data", data,
                 "--report", rep)
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(rep.read_text())
    assert report["validation"]["ok"] and report["validation"]["max_abs"] < 1e-4
    skipped = report["passes"]["fuse-transformer{model-type=bert}"]["skipped"]
    assert any("outputs diverge (hidden" in k for k in skipped), skipped
    assert report["output"]["ops"].get("com.microsoft::Attention", 0) == 0


def test_fuse_transformer_unknown_model_type_is_a_usage_error(cli, tmp_path):
    from tests.helpers import ROOT
    out = tmp_path / "o.onnx"
    result = cli("optimize", ROOT / "models" / "bert_encoder.onnx", "-o", out, "-p", "fuse-transformer{model-type=nope}")
    assert result.exit_code == 1 and not out.exists()
    assert "unknown model-type 'nope' (known: " in result.stderr and "bert" in result.stderr


def test_fuse_transformer_is_functional_and_leaves_the_input_alone():
    from onnxopt.passes.fuse_transformer import FuseTransformer
    from tests.helpers import ROOT
    model = ir.serde.deserialize_model(onnx.load(str(ROOT / "models" / "bert_encoder.onnx")))
    before = ir.to_proto(model).SerializeToString()
    result = FuseTransformer(model_type="bert")(model)
    assert result.modified and result.model is not model
    assert ir.to_proto(model).SerializeToString() == before


def test_cse_reuses_outer_scope_values_in_branches():
    then_g = h.make_graph([h.make_node("Relu", ["x"], ["r_in"]), h.make_node("Neg", ["r_in"], ["t_out"])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Relu", ["x"], ["r_in2"]), h.make_node("Abs", ["r_in2"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
             h.make_node("Cast", ["s"], ["c"], to=T.BOOL),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    result, new = run_pipeline(proto, "cse")
    branches = {a.name: a.g for a in new.graph.node[-1].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Neg"]
    assert branches["then_branch"].node[0].input[0] == "r"
    assert [n.op_type for n in branches["else_branch"].node] == ["Abs"]
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    assert_same(proto, new, [{"x": x}, {"x": -np.abs(x)}])


# ------------------------------------------------------------------ fuse-activations

def _fuse(proto, x_shape=(2, 3, 4)):
    result, new = run_pipeline(proto, "fuse-activations,cleanup")
    x = np.random.default_rng(7).standard_normal(x_shape).astype(np.float32) * 3
    assert_same(proto, new, [{"x": x}], rtol=1e-5, atol=1e-5)
    return result, new


@pytest.mark.parametrize("half_first", [False, True])
def test_fuse_gelu(half_first):
    if half_first:
        nodes = [h.make_node("Mul", ["x", "r2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                 h.make_node("Add", ["e", "one"], ["a"]), h.make_node("Mul", ["x", "half"], ["xh"]),
                 h.make_node("Mul", ["xh", "a"], ["y"])]
    else:
        nodes = [h.make_node("Div", ["x", "s2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                 h.make_node("Add", ["e", "one"], ["a"]), h.make_node("Mul", ["x", "a"], ["m"]),
                 h.make_node("Mul", ["m", "half"], ["y"])]
    inits = [f32("s2", np.sqrt(2.0)), f32("r2", 1 / np.sqrt(2.0)), f32("one", 1.0), f32("half", 0.5)]
    result, new = _fuse(_model(nodes, inits, opset=20))
    assert ops(new) == ["Gelu"] and new.graph.output[0].name == "y"
    result, new = run_pipeline(_model(nodes, inits, opset=18), "fuse-activations")
    assert any("opset 18 < 20" in k for r in result.records for k in r.skipped)


def test_fuse_hardswish_both_forms():
    a = [h.make_node("HardSigmoid", ["x"], ["hs"], alpha=1 / 6, beta=0.5), h.make_node("Mul", ["x", "hs"], ["y"])]
    _, new = _fuse(_model(a, opset=14))
    assert ops(new) == ["HardSwish"]
    b = [h.make_node("Add", ["x", "three"], ["a"]), h.make_node("Clip", ["a", "zero", "six"], ["c"]),
         h.make_node("Mul", ["x", "c"], ["m"]), h.make_node("Div", ["m", "six"], ["y"])]
    _, new = _fuse(_model(b, [f32("three", 3.0), f32("zero", 0.0), f32("six", 6.0)], opset=14))
    assert ops(new) == ["HardSwish"]


def test_fuse_layernorm():
    nodes = [h.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), h.make_node("Sub", ["x", "mu"], ["d"]),
             h.make_node("Pow", ["d", "two"], ["p"]), h.make_node("ReduceMean", ["p"], ["var"], axes=[-1]),
             h.make_node("Add", ["var", "eps"], ["ve"]), h.make_node("Sqrt", ["ve"], ["sd"]),
             h.make_node("Div", ["d", "sd"], ["n"]), h.make_node("Mul", ["n", "gamma"], ["ng"]),
             h.make_node("Add", ["ng", "beta"], ["y"])]
    rng = np.random.default_rng(8)
    inits = [f32("two", 2.0), f32("eps", 1e-5), f32("gamma", rng.uniform(0.5, 1.5, 4)), f32("beta", rng.standard_normal(4))]
    _, new = _fuse(_model(nodes, inits, opset=17))
    assert ops(new) == ["LayerNormalization"]


def test_ort_shapes_fill_what_onnx_inference_cannot_see():
    """onnx has no schema for com.microsoft::FusedMatMul, so its output shape is unknown to onnx
    inference; the ORT fallback measures it and fold-shapes can still fix the Reshape target."""
    from onnxopt import shapes
    w = f32("w", np.random.default_rng(9).standard_normal((4, 6)))
    nodes = [h.make_node("FusedMatMul", ["x", "w"], ["m"], domain="com.microsoft", alpha=1.0),
             h.make_node("Shape", ["m"], ["s"]), h.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             h.make_node("Unsqueeze", ["b", "axes0"], ["b1"]), h.make_node("Concat", ["b1", "minus1"], ["shape"], axis=0),
             h.make_node("Reshape", ["m", "shape"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [w, i64("zero", 0), i64("axes0", [0]), i64("minus1", [-1])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 14), h.make_opsetid("com.microsoft", 1)])
    model = ir.serde.deserialize_model(proto)
    assert shapes.infer(model, ort_fallback=False).get(model.graph.node(0).outputs[0]) is None
    assert shapes.infer(model).get(model.graph.node(0).outputs[0]) == (None, None)  # symbolic input: rank only
    result, new = run_pipeline(proto, "fold-shapes,cleanup")
    assert ops(new) == ["FusedMatMul", "Reshape"]
    rng = np.random.default_rng(10)
    assert_same(proto, new, [{"x": rng.standard_normal((k, 4)).astype(np.float32)} for k in (1, 4)])


def test_ort_shapes_never_trust_data_dependent_dims():
    from onnxopt import shapes
    nodes = [h.make_node("NonZero", ["x"], ["nz"]), h.make_node("Shape", ["nz"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                     [h.make_tensor_value_info("y", T.INT64, None)])
    model = ir.serde.deserialize_model(h.make_model(g, opset_imports=[h.make_opsetid("", 14)]))
    measured = shapes.ort_shapes(model, ["nz", "y"])
    assert "nz" not in measured and "y" not in measured  # not even a rank: a probe proves nothing here


# ------------------------------------------------------------------ fuse-affine

def _affine_model(producer, consumers, opset=17):
    rng = np.random.default_rng(11)
    inits, nodes = [], []
    if producer == "Conv":
        x_shape = (2, 3, 5, 5)
        inits += [f32("w", rng.standard_normal((4, 3, 3, 3))), f32("b", rng.standard_normal(4))]
        nodes.append(h.make_node("Conv", ["x", "w", "b"], ["p"], pads=[1, 1, 1, 1]))
    elif producer == "Gemm":
        x_shape = (2, 6)
        inits += [f32("w", rng.standard_normal((4, 6))), f32("b", rng.standard_normal(4))]
        nodes.append(h.make_node("Gemm", ["x", "w", "b"], ["p"], transB=1, beta=0.5))
    else:  # MatMul on a 3-D input
        x_shape = (2, 3, 6)
        inits.append(f32("w", rng.standard_normal((6, 4))))
        nodes.append(h.make_node("MatMul", ["x", "w"], ["p"]))
    prev = "p"
    for i, (op, const, swap) in enumerate(consumers):
        out = "y" if i == len(consumers) - 1 else f"c{i}"
        if op == "BatchNormalization":
            inits += [f32(f"bn{i}_{k}", v) for k, v in (("s", rng.uniform(0.5, 1.5, 4)), ("b", rng.standard_normal(4)),
                                                           ("m", rng.standard_normal(4)), ("v", rng.uniform(0.5, 1.5, 4)))]
            nodes.append(h.make_node(op, [prev] + [f"bn{i}_{k}" for k in "sbmv"], [out]))
        else:
            inits.append(f32(f"k{i}", const))
            nodes.append(h.make_node(op, [f"k{i}", prev] if swap else [prev, f"k{i}"], [out]))
        prev = out
    return _model(nodes, inits, x_shape=x_shape, opset=opset), x_shape


@pytest.mark.parametrize("producer, consumers, left", [
    ("Conv", [("Mul", np.full((1, 4, 1, 1), 2.0), False), ("Add", np.arange(4.0).reshape(4, 1, 1), False),
              ("Sub", 0.5, False), ("Sub", 1.0, True), ("Div", 4.0, False)], ["Conv"]),
    ("Gemm", [("Mul", np.arange(1.0, 5.0), True), ("Add", np.ones((1, 4)), False), ("BatchNormalization", None, False)],
     ["Gemm"]),
    ("MatMul", [("Mul", np.arange(1.0, 5.0), False), ("Div", 2.0, False), ("Add", np.ones(4), False)],
     ["MatMul", "Add"]),
])
def test_fuse_affine(producer, consumers, left):
    proto, x_shape = _affine_model(producer, consumers)
    result, new = run_pipeline(proto, "fuse-affine,cleanup")
    assert ops(new) == left
    x = np.random.default_rng(12).standard_normal(x_shape).astype(np.float32)
    assert_same(proto, new, [{"x": x}], rtol=1e-5, atol=1e-5)


def test_fuse_affine_declines_broadcasting_constant():
    proto, _ = _affine_model("Conv", [("Mul", np.ones((4, 5, 5)), False)])
    from onnxopt.passes.fuse_affine import FuseAffine
    result = FuseAffine()(ir.serde.deserialize_model(proto))
    assert result.skipped == {"constant is not a scalar or per-channel vector": 1} and not result.modified


# producer, input shape (dim 0 dynamic "N"), output rank
_AFFINE_PRODUCERS = {"Conv": ((3, 5, 5), 4), "Gemm": ((6,), 2), "MatMul2d": ((6,), 2), "MatMul3d": ((3, 6), 3)}


@pytest.mark.parametrize("producer", sorted(_AFFINE_PRODUCERS))
@pytest.mark.parametrize("k_shape", [(), (1,), (1, 1), (1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1, 1), (4,), (1, 4), (1, 1, 4),
                                     (1, 4, 1, 1), (4, 1, 1), (1, 1, 4, 1, 1)])
@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_fuse_affine_never_drops_a_broadcast_that_adds_rank(producer, k_shape, op):
    """Size-1 and per-channel constants of every rank after every producer, with a dynamic batch
    dim checked at N=1 and N=3: fused only when the constant's rank does not exceed the output's."""
    rng = np.random.default_rng(21)
    rest, out_rank = _AFFINE_PRODUCERS[producer]
    inits = [f32("k", rng.uniform(0.5, 2.0, k_shape))]
    if producer == "Conv":
        inits += [f32("w", rng.standard_normal((4, 3, 3, 3))), f32("b", rng.standard_normal(4))]
        nodes = [h.make_node("Conv", ["x", "w", "b"], ["p"], pads=[1, 1, 1, 1])]
    elif producer == "Gemm":
        inits += [f32("w", rng.standard_normal((6, 4))), f32("b", rng.standard_normal(4))]
        nodes = [h.make_node("Gemm", ["x", "w", "b"], ["p"])]
    else:
        inits.append(f32("w", rng.standard_normal((6, 4))))
        nodes = [h.make_node("MatMul", ["x", "w"], ["p"])]
    nodes.append(h.make_node(op, ["p", "k"], ["y"]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", *rest])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    try:
        feeds = [{"x": rng.standard_normal((n, *rest)).astype(np.float32)} for n in (1, 3)]
        [ort_run(proto, f) for f in feeds]
    except Exception:
        pytest.skip("the constant does not broadcast with this output (invalid model)")
    _, new = run_pipeline(proto, "fuse-affine,cleanup")
    fused = op not in ops(new)
    per_channel = int(np.prod(k_shape)) == 1 or (k_shape[-1] == 4 if producer != "Conv" else
                                                 list(k_shape) in ([4, 1, 1], [1, 4, 1, 1]))
    if op == "Add" and producer.startswith("MatMul"):
        per_channel = False  # no bias slot: simplify's MatMul+Add -> Gemm
    assert fused == (per_channel and len(k_shape) <= out_rank), ops(new)
    assert_same(proto, new, feeds, rtol=1e-5, atol=1e-5)


def test_fold_shapes_never_trusts_overridable_initializers():
    """An initializer that is also a graph input is a default a user may replace at run time."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "idx"], ["d"], axis=0),
             h.make_node("Concat", ["d", "minus1"], ["shape"], axis=0), h.make_node("Reshape", ["x", "shape"], ["y"])]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4]), h.make_tensor_value_info("idx", T.INT64, [1])]
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [i64("idx", [0]), i64("minus1", [-1])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 14)], ir_version=8)
    result, new = run_pipeline(proto, "fold-shapes")  # (cleanup would drop the input: its contract)
    x = np.random.default_rng(13).standard_normal((2, 3, 4)).astype(np.float32)
    for idx in ([0], [1], [2]):  # the user overrides the default
        feeds = {"x": x, "idx": np.array(idx, np.int64)}
        assert ort_run(new, feeds)[0].shape == ort_run(proto, feeds)[0].shape


# [0, -1], [0, 0], [-1, 0] keep the intermediate's shape [N, 12]: the outer Reshape is a provable no-op;
# [0, 2, -1] and [0, -1, 2] copy one dim and infer another: the chain is kept.
@pytest.mark.parametrize("target, collapses", [([0, 12], True), ([0, 3, 4], True), ([0, -1], True), ([0, 0], True),
                                               ([-1, 0], True), ([0, 2, -1], False), ([0, -1, 2], False)])
def test_simplify_reshape_chain_with_one_copy_zero(target, collapses):
    """Reshape(Reshape(x)) whose outer target copies one dim: the 0 becomes -1 (the only dim -1
    can infer) when every other entry is a positive literal; checked at batch 0, 1 and 3."""
    nodes = [h.make_node("Reshape", ["x", "s1"], ["r"]), h.make_node("Reshape", ["r", "s2"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [i64("s1", [0, 12]), i64("s2", target)])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 12)], ir_version=7)
    _, new = run_pipeline(proto, "simplify,cleanup")
    assert ops(new) == (["Reshape"] if collapses else ["Reshape", "Reshape"])
    rng = np.random.default_rng(3)
    sizes = (0, 1, 3) if -1 not in target else (1, 3)  # ORT cannot infer -1 from an empty tensor
    assert_same(proto, new, [{"x": rng.standard_normal((n, 3, 4)).astype(np.float32)} for n in sizes])


@pytest.mark.parametrize("numerator_rank,x_dims", [(3, None), (5, [1, 1, 2, 2]), (2, [2, 3])])
def test_unit_division_is_safe_from_ort_div_mul_fusion(numerator_rank, x_dims):
    """``Mul(Div(ones, x), y)`` with a folded one-element ``ones`` of rank r: ORT's DivMulFusion turns
    it into ``Div(y, x)`` and loses r (an ORT bug).  After fold-constants ORT, optimizer on, must give
    the spec's shape and values (the original under ORT with its optimizer off); where x's rank is at
    least r nothing needs to change and the Div stays."""
    from onnxruntime import GraphOptimizationLevel, InferenceSession, SessionOptions

    shape = nh.from_array(np.ones(numerator_rank, np.int64), "shape")
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["ones"], value=nh.from_array(np.ones(1, np.float32))),
             h.make_node("Div", ["ones", "x"], ["d"]), h.make_node("Mul", ["d", "y"], ["z"])]
    if x_dims is None:  # x of unknown rank: a Reshape by a graph input
        nodes.insert(0, h.make_node("Reshape", ["a", "s"], ["x"]))
        inputs = [h.make_tensor_value_info("a", T.FLOAT, [6]), h.make_tensor_value_info("s", T.INT64, ["K"])]
        feeds = {"a": np.arange(1, 7, dtype=np.float32), "s": np.array([2, 3]), "y": np.full([3], 2.0, np.float32)}
    else:
        inputs = [h.make_tensor_value_info("x", T.FLOAT, x_dims)]
        feeds = {"x": np.arange(1, 1 + np.prod(x_dims), dtype=np.float32).reshape(x_dims),
                 "y": np.full(x_dims[-1:], 2.0, np.float32)}
    inputs.append(h.make_tensor_value_info("y", T.FLOAT, [None]))
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("z", T.FLOAT, None)], [shape])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    plain = SessionOptions()
    plain.graph_optimization_level = GraphOptimizationLevel.ORT_DISABLE_ALL
    spec = InferenceSession(model.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    folded = ir.to_proto(pipeline.run(ir.from_proto(model), pipeline.parse("fold-constants")).model)
    got = InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == spec.shape and np.allclose(got, spec, rtol=1e-6), (got.shape, spec.shape)
    ops = [n.op_type for n in folded.graph.node]
    if x_dims is not None and len(x_dims) >= numerator_rank:
        assert "Div" in ops and "Reciprocal" not in ops, ops
    else:
        assert "Div" not in ops and "Reciprocal" in ops, ops

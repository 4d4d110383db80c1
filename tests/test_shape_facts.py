"""Ops whose output dims depend on input *values*: no shape fact may be taken from a probe run.

Each case is a static-shaped model whose output ``y`` changes dims with the values of an integer
(or bool) input, and ``Shape(y)`` is read by the rest of the graph, so a pass that trusted one
measurement would fold it to a constant.  Two feed sets give two different shapes of ``y``; the
default pipeline must keep both right, and the shape table may not claim a dim either run
contradicts.  The table in onnxopt.shapes (SHAPE_FROM_DIMS / SHAPE_INPUTS) is what is tested.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import pipeline, shapes
from onnxopt import validation as validate
from onnxopt.errors import BadInputError


def ort_run(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

X = np.random.default_rng(0).uniform(0.5, 1.5, (2, 3, 4)).astype(np.float32)


def _i64(name, arr):
    return nh.from_array(np.asarray(arr, np.int64), name)


def _case(op_nodes, inputs, feeds_a, feeds_b, opset=18, inits=(), y="y"):
    """A model computing ``y`` by ``op_nodes`` and reading its shape: s = Cast(Shape(y)) * 1."""
    nodes = list(op_nodes) + [h.make_node("Shape", [y], ["s"]), h.make_node("Cast", ["s"], ["sf"], to=T.FLOAT),
                              h.make_node("Mul", ["sf", "one"], ["shape_out"])]
    graph = h.make_graph(nodes, "facts", inputs, [h.make_tensor_value_info("shape_out", T.FLOAT, None),
                                                  h.make_value_info(y, onnx.TypeProto())],
                         [nh.from_array(np.array(1.0, np.float32), "one"), *inits])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
    return model, feeds_a, feeds_b


def _x(shape=(2, 3, 4)):
    return h.make_tensor_value_info("x", T.FLOAT, list(shape))


def _x1(shape):
    return h.make_tensor_value_info("x1", T.FLOAT, list(shape))


def _p(shape, dtype=T.INT64, name="p"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def _reduce(op):
    return _case([h.make_node(op, ["x", "p"], ["y"], keepdims=0)], [_x(), _p([1])],
                 {"x": X, "p": np.array([0])}, {"x": X, "p": np.array([2])})


def _window(op):
    return _case([h.make_node(op, ["p"], ["y"])], [_p([])], {"p": np.array(4)}, {"p": np.array(7)}, opset=17)


def _loop():
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                         h.make_node("Cast", ["i"], ["i_f"], to=T.FLOAT)], "body",
                        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, [])],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("i_f", T.FLOAT, [])])
    return _case([h.make_node("Loop", ["p", "cond"], ["y"], body=body)], [_p([])],
                 {"p": np.array(2)}, {"p": np.array(5)}, opset=17, inits=[nh.from_array(np.array(True), "cond")])


def _if_capture():
    """An If on a constant condition whose branches read the outer input x (no explicit input)."""
    def branch(name, op):
        return h.make_graph([h.make_node(op, ["x1", "zero_f"], [f"{name}_m"]), h.make_node("NonZero", [f"{name}_m"], [f"{name}_o"])],
                            name, [], [h.make_tensor_value_info(f"{name}_o", T.INT64, None)])
    return _case([h.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Greater"), else_branch=branch("else", "Less"))],
                 [_x1((8,))], {"x1": np.array([1, -1] * 4, np.float32)}, {"x1": np.ones(8, np.float32)}, opset=17,
                 inits=[nh.from_array(np.array(True), "cond"), nh.from_array(np.array(0.0, np.float32), "zero_f")])


CASES = {
    "If (outer-scope read)": _if_capture,
    **{op: (lambda op=op: _reduce(op)) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ReduceSum",
        "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")},
    **{op: (lambda op=op: _window(op)) for op in ("HannWindow", "HammingWindow", "BlackmanWindow")},
    "DFT": lambda: _case([h.make_node("DFT", ["x1", "p"], ["y"], axis=1)], [_x1((1, 5, 1)), _p([])],
                         {"x1": X[:1, :, :1].repeat(2, 1)[:, :5], "p": np.array(5)},
                         {"x1": X[:1, :, :1].repeat(2, 1)[:, :5], "p": np.array(8)}, opset=17),
    "NonZero": lambda: _case([h.make_node("NonZero", ["p"], ["y"])], [_p([4])],
                             {"p": np.array([1, 0, 2, 0])}, {"p": np.array([1, 1, 1, 1])}),
    "Unique": lambda: _case([h.make_node("Unique", ["p"], ["y"])], [_p([4])],
                            {"p": np.array([1, 1, 2, 2])}, {"p": np.array([1, 2, 3, 0])}),
    "Compress": lambda: _case([h.make_node("Compress", ["x", "p"], ["y"], axis=0)], [_x(), _p([2], T.BOOL)],
                              {"x": X, "p": np.array([True, False])}, {"x": X, "p": np.array([True, True])}),
    "TopK": lambda: _case([h.make_node("TopK", ["x", "p"], ["y", "idx"], axis=-1)], [_x(), _p([1])],
                          {"x": X, "p": np.array([1])}, {"x": X, "p": np.array([3])}),
    "Range": lambda: _case([h.make_node("Range", ["zero", "p", "step"], ["y"])], [_p([])],
                           {"p": np.array(3)}, {"p": np.array(5)}, inits=[_i64("zero", 0), _i64("step", 1)]),
    "Tile": lambda: _case([h.make_node("Tile", ["x", "p"], ["y"])], [_x(), _p([3])],
                          {"x": X, "p": np.array([1, 1, 1])}, {"x": X, "p": np.array([2, 1, 3])}),
    "Expand": lambda: _case([h.make_node("Expand", ["x", "p"], ["y"])], [_x(), _p([4])],
                            {"x": X, "p": np.array([1, 2, 3, 4])}, {"x": X, "p": np.array([3, 1, 1, 1])}),
    "Reshape": lambda: _case([h.make_node("Reshape", ["x", "p"], ["y"])], [_x(), _p([2])],
                             {"x": X, "p": np.array([6, 4])}, {"x": X, "p": np.array([4, 6])}),
    "Slice": lambda: _case([h.make_node("Slice", ["x", "zero1", "p", "axis2"], ["y"])], [_x(), _p([1])],
                           {"x": X, "p": np.array([2])}, {"x": X, "p": np.array([4])},
                           inits=[_i64("zero1", [0]), _i64("axis2", [2])]),
    "Pad": lambda: _case([h.make_node("Pad", ["x", "p"], ["y"])], [_x(), _p([6])],
                         {"x": X, "p": np.zeros(6, np.int64)}, {"x": X, "p": np.array([0, 1, 0, 0, 2, 1])}),
    "Resize": lambda: _case([h.make_node("Resize", ["x", "", "", "p"], ["y"])], [_x(), _p([3])],
                            {"x": X, "p": np.array([2, 3, 4])}, {"x": X, "p": np.array([2, 6, 8])}),
    "ConstantOfShape": lambda: _case([h.make_node("ConstantOfShape", ["p"], ["y"])], [_p([2])],
                                     {"p": np.array([2, 3])}, {"p": np.array([3, 1])}),
    "OneHot": lambda: _case([h.make_node("OneHot", ["idx", "p", "vals"], ["y"])], [_p([])],
                            {"p": np.array(3)}, {"p": np.array(5)},
                            inits=[_i64("idx", [0, 1]), nh.from_array(np.array([0.0, 1.0], np.float32), "vals")]),
    "Split": lambda: _case([h.make_node("Split", ["x", "p"], ["y", "y2"], axis=2)], [_x(), _p([2])],
                           {"x": X, "p": np.array([1, 3])}, {"x": X, "p": np.array([2, 2])}),
    "Unsqueeze": lambda: _case([h.make_node("Unsqueeze", ["x", "p"], ["y"])], [_x(), _p([1])],
                               {"x": X, "p": np.array([0])}, {"x": X, "p": np.array([3])}),
    "Squeeze": lambda: _case([h.make_node("Squeeze", ["x1", "p"], ["y"])], [_x1((1, 3, 1)), _p([1])],
                             {"x1": X[:1, :, :1], "p": np.array([0])}, {"x1": X[:1, :, :1], "p": np.array([2])}),
    "Loop": _loop,
}


def _shape_of(outputs):
    return tuple(int(d) for d in outputs["shape_out"])


@pytest.mark.parametrize("op", sorted(CASES))
def test_value_dependent_dims_are_never_folded(op):
    proto, feeds_a, feeds_b = CASES[op]()
    ref_a, ref_b = ort_run(proto, feeds_a), ort_run(proto, feeds_b)
    assert _shape_of(ref_a) != _shape_of(ref_b), "the case must make the dims differ"

    model = ir.serde.deserialize_model(proto)
    y = next(v for n in model.graph for v in n.outputs if v.name == "y")
    claimed = shapes.infer(model).get(y)
    if claimed is not None:
        for run in (_shape_of(ref_a), _shape_of(ref_b)):
            assert len(claimed) == len(run) and all(not isinstance(c, int) or c == r for c, r in zip(claimed, run)), \
                f"{op}: shape table claims {claimed}, a run gives {run}"

    optimized = ir.to_proto(pipeline.run(model, pipeline.parse(pipeline.DEFAULT_PIPELINE)).model)
    for feeds, ref in ((feeds_a, ref_a), (feeds_b, ref_b)):
        got = ort_run(optimized, feeds)
        np.testing.assert_array_equal(got["shape_out"], ref["shape_out"])
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-6)


def test_static_dims_are_still_proven_through_value_independent_ops():
    """The fallback keeps its use: a custom op that onnx inference cannot see through but whose
    dims follow from its input dims (com.microsoft FusedMatMul) on a static model gets exact dims,
    and Shape of its output is folded."""
    w = nh.from_array(np.ones((4, 6), np.float32), "w")
    nodes = [h.make_node("FusedMatMul", ["x", "w"], ["m"], domain="com.microsoft"), h.make_node("Shape", ["m"], ["s"]),
             h.make_node("Cast", ["s"], ["sf"], to=T.FLOAT), h.make_node("Mul", ["sf", "one"], ["out"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, 4])],
                     [h.make_tensor_value_info("out", T.FLOAT, None), h.make_tensor_value_info("m", T.FLOAT, None)],
                     [w, nh.from_array(np.array(1.0, np.float32), "one")])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    assert shapes.infer(model).get(model.graph.node(0).outputs[0]) == (3, 6)
    new = pipeline.run(model, pipeline.parse(pipeline.DEFAULT_PIPELINE)).model
    assert "Shape" not in [n.op_type for n in new.graph]


def _write(tmp_path, proto, name):
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def test_validator_catches_a_fact_that_holds_only_at_the_primary_point(tmp_path):
    """The candidate has Shape(y) replaced by the constant measured at the primary point (the old
    bug, by hand): identical there, wrong at the variation, which validation must exercise."""
    proto, _, _ = CASES["ReduceL2"]()
    original = _write(tmp_path, proto, "orig.onnx")
    validator = validate.Validator(original)
    primary_shape = validator.reference["shape_out"]
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    keep = [n for n in broken.graph.node if n.op_type not in ("Shape", "Cast")]
    del broken.graph.node[:]
    broken.graph.node.extend(keep)
    broken.graph.initializer.append(nh.from_array(primary_shape.astype(np.float32), "sf"))
    assert validator.check(broken.SerializeToString(), all_points=False).ok  # the primary point alone is blind
    result = validator.check(broken.SerializeToString())
    assert not result.ok and "seed" in result.summary(), result.summary()
    labels = [p["label"] for p in validator.exercised()]
    assert len(labels) >= 2 and labels[0] != labels[1]


def test_validator_varies_every_symbolic_dim_and_reports_it(tmp_path):
    nodes = [h.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=1)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", "L", 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [_i64("ax", [2])])
    path = _write(tmp_path, h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=8), "sym.onnx")
    points = validate.Validator(path, shapes={"x": (1, 5, 4)}).exercised()
    assert points[0]["shapes"]["x"] == [1, 5, 4]
    assert points[1]["status"] == "compared"
    n, length, _ = points[1]["shapes"]["x"]
    assert n != 1 and length != 5, points[1]
    assert "N=" in points[1]["label"] and "L=" in points[1]["label"]


def test_a_variation_the_original_cannot_run_is_skipped_and_reported(tmp_path):
    """A 3-row table indexed by idx + 1: synthesized integers lie in [0, 4) (the + 1 hides the
    table's bound from the synthesis), so 64 of them surely reach 4 and the original fails at
    the primary point and at every variation; with data of zeros it runs, and the second point comes
    from the data too (never synthesized values the original cannot run): with one batch and no
    symbolic batch dim, the batch's own ids permuted."""
    nodes = [h.make_node("Add", ["idx", "one"], ["i1"]), h.make_node("Gather", ["table", "i1"], ["y"], axis=0)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("idx", T.INT64, [64])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(np.arange(3, dtype=np.float32), "table"), nh.from_array(np.int64(1), "one")])
    path = _write(tmp_path, h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), "g.onnx")
    # the primary point itself fails: that is the user's problem, said once
    with pytest.raises(BadInputError, match="failed to run the model"):
        validate.Validator(path)
    np.savez(tmp_path / "d.npz", idx=np.zeros(64, np.int64))
    validator = validate.Validator(path, data=tmp_path / "d.npz")
    points = validator.exercised()
    assert points[0]["status"] == "compared"
    assert points[1]["status"] == "compared" and points[1]["label"] == "new values in data batch 1's ranges"
    assert validator.check(path).ok


def test_variation_changes_every_integer_and_bool_element(tmp_path):
    """A new seed alone repeats some integers; the variation point must differ everywhere."""
    nodes = [h.make_node("Cast", ["i"], ["y"], to=T.FLOAT), h.make_node("Cast", ["b"], ["z"], to=T.FLOAT)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("i", T.INT64, [256]), h.make_tensor_value_info("b", T.BOOL, [256])],
                     [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("z", T.FLOAT, None)])
    path = _write(tmp_path, h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), "ints.onnx")
    first, second = validate.Validator(path).points
    assert np.all(first.feeds["i"] != second.feeds["i"]) and np.all(first.feeds["b"] != second.feeds["b"])
    assert second.feeds["i"].min() >= 0 and second.feeds["i"].max() < 4

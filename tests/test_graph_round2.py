"""Issue 22 ("Graph round 2"): the simplify rules for nested Concats, consecutive Slices, a Pad before a
pool, run-time zero RNN states, neutral mask fills, Shape slices and Squeeze round trips, and the
transpose-push pass; op counts after the pass, outputs on ORT at several input sizes, the declines.
The round-2 exports (models/round2.py) must end at or below every peer's node count."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import pipeline
from tests.helpers import ROOT, ort_run


def i64(name, values):
    return nh.from_array(np.array(values, np.int64), name)


def f32(name, values):
    return nh.from_array(np.asarray(values, np.float32), name)


def model(nodes, inits=(), x_dims=("n", 3, 4, 5), opset=17, outputs=("y",), x_type=T.FLOAT):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", x_type, list(x_dims))],
                     [h.make_tensor_value_info(o, T.FLOAT if x_type == T.FLOAT else x_type, None) for o in outputs],
                     list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def run(proto, text="simplify,cleanup"):
    m = ir.serde.deserialize_model(proto)
    result = pipeline.run(m, pipeline.parse(text))
    return result, ir.to_proto(result.model)


def ops(proto):
    return collections.Counter(n.op_type for n in proto.graph.node)


def same_outputs(a, b, shapes, seed=0, atol=1e-5):
    rng = np.random.default_rng(seed)
    for shape in shapes:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        for x, y in zip(ort_run(a, feeds), ort_run(b, feeds)):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=atol)


def skipped(result):
    return {k: v for r in result.records for k, v in r.skipped.items()}


SHAPES = [(1, 3, 4, 5), (2, 3, 4, 5)]


# ------------------------------------------------------------------ nested Concat

@pytest.mark.parametrize("inner_axis, outer_axis, flattens", [(1, 1, True), (-3, 1, True), (1, -3, True), (2, 1, False)])
def test_nested_concat_flattens_on_the_same_axis(inner_axis, outer_axis, flattens):
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Neg", ["x"], ["m"]),
             h.make_node("Concat", ["r", "m"], ["c1"], axis=inner_axis),
             h.make_node("Concat", ["x", "c1"] if flattens else ["c1", "c1"], ["y"], axis=outer_axis)]
    if not flattens:  # axis 2 inner, axis 1 outer: must stay nested
        nodes[3] = h.make_node("Concat", ["c1", "c1"], ["y"], axis=outer_axis)
    proto = model(nodes)
    _, new = run(proto)
    assert ops(new)["Concat"] == (1 if flattens else 2)
    same_outputs(proto, new, SHAPES)


def test_nested_concat_with_other_users_is_kept():
    nodes = [h.make_node("Concat", ["x", "x"], ["c1"], axis=1), h.make_node("Concat", ["c1", "x"], ["y"], axis=1),
             h.make_node("Relu", ["c1"], ["z"])]
    result, new = run(model(nodes, outputs=("y", "z")))
    assert ops(new)["Concat"] == 2
    assert "concat_flatten: the inner Concat has other users" in skipped(result)


# ------------------------------------------------------------------ consecutive Slices

@pytest.mark.parametrize("first, second, merged", [
    (([1], [3], [1]), ([0], [2], [2]), True),             # disjoint axes
    (([1], [4], [3]), ([1], [9], [3]), True),             # one axis, composable (x[1:4][1:9] = x[2:4])
    (([0], [2**63 - 1], [-1]), ([1], [3], [-1]), True),   # one axis (negative axis, rank known)
    (([-3], [5], [3]), ([1], [2], [3]), False),            # one axis with a negative start: declined
    (([0, 1], [2, 3], [1, 2]), ([0], [1], [3]), True),    # two axes then a third
])
def test_consecutive_slices_merge(first, second, merged):
    (s1, e1, a1), (s2, e2, a2) = first, second
    nodes = [h.make_node("Slice", ["x", "s1", "e1", "a1"], ["t"]), h.make_node("Slice", ["t", "s2", "e2", "a2"], ["y"])]
    inits = [i64("s1", s1), i64("e1", e1), i64("a1", a1), i64("s2", s2), i64("e2", e2), i64("a2", a2)]
    proto = model(nodes, inits, x_dims=("n", "c", "h", "w"))
    result, new = run(proto)
    assert ops(new)["Slice"] == (1 if merged else 2), skipped(result)
    same_outputs(proto, new, SHAPES + [(2, 3, 1, 5), (1, 1, 2, 2)])
    _, again = run(new)
    assert ops(again) == ops(new)


@pytest.mark.parametrize("start, end, axis, squeeze, gathers", [
    (-1, 2**63 - 1, 1, 1, True), (2, 3, -1, 3, True), (-2, -1, 2, -2, True), (0, 2, 1, 1, False), (-1, 0, 1, 1, False),
])
def test_one_element_slice_and_squeeze_become_a_gather(start, end, axis, squeeze, gathers):
    nodes = [h.make_node("Slice", ["x", "s", "e", "a"], ["t"]), h.make_node("Squeeze", ["t", "q"], ["y"])]
    proto = model(nodes, [i64("s", [start]), i64("e", [end]), i64("a", [axis]), i64("q", [squeeze])], x_dims=("n", 1, 4, 5))
    _, new = run(proto)
    assert ("Gather" in ops(new)) == gathers
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 4, 5), (3, 1, 4, 5)]:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        try:
            ref = ort_run(proto, feeds)
        except Exception:  # noqa: BLE001 - e.g. squeezing a dim of 2: the original fails too
            with pytest.raises(Exception):  # noqa: B017
                ort_run(new, feeds)
            continue
        np.testing.assert_array_equal(ort_run(new, feeds)[0], ref[0])


# ------------------------------------------------------------------ Pad before a pool

def _pad_pool(pool, pad_value=None, pads=(0, 0, 1, 1, 0, 0, 1, 1), source="Relu", pool_pads=None, **attrs):
    inits = [i64("pads", list(pads))]
    pad_in = ["r", "pads"]
    if pad_value is not None:
        inits.append(f32("v", pad_value))
        pad_in.append("v")
    nodes = [h.make_node(source, ["x"], ["r"]), h.make_node("Pad", pad_in, ["p"]),
             h.make_node(pool, ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], **attrs)]
    if pool_pads is not None:
        nodes[2].attribute.append(h.make_attribute("pads", pool_pads))
    return model(nodes, inits, x_dims=("n", 3, "h", "w"))


POOL_SHAPES = [(1, 3, 4, 5), (2, 3, 7, 6), (1, 3, 1, 1), (3, 3, 3, 2)]


@pytest.mark.parametrize("proto, folds, reason", [
    (_pad_pool("MaxPool"), True, None),                                   # zeros before a Relu output: never the max
    (_pad_pool("MaxPool", source="Tanh"), False, "Pad value is not -inf, nor 0 before an input provably >= 0"),
    (_pad_pool("MaxPool", pad_value=-np.inf, source="Tanh"), True, None),
    (_pad_pool("MaxPool", ceil_mode=1), False, "ceil_mode: windows past the padding would differ"),
    (_pad_pool("MaxPool", pads=(0, 0, 3, 3, 0, 0, 3, 3)), False, "the merged pads would not be smaller than the kernel"),
    (_pad_pool("AveragePool", source="Tanh", count_include_pad=1), True, None),
    (_pad_pool("AveragePool", source="Tanh"), False, "AveragePool excludes padding from the mean (count_include_pad=0)"),
    (_pad_pool("AveragePool", source="Tanh", pool_pads=[1, 1, 1, 1]), False,
     "AveragePool excludes padding from the mean (count_include_pad=0)"),
    (_pad_pool("AveragePool", source="Tanh", pad_value=0.5, count_include_pad=1), False, "Pad value is not zero"),
    # found by the round-2 soak (seed 22040002217): count_include_pad=0 set to 1 differs on a window past a
    # 2-wide input (POOL_SHAPES' last) even without pads; it is declined now
    (_pad_pool("AveragePool", source="Relu", pads=[0, 0, 0, 1, 0, 0, 0, 0]), False,
     "AveragePool excludes padding from the mean (count_include_pad=0)"),
])
def test_pad_folds_into_pool_only_where_the_pad_value_is_the_ops(proto, folds, reason):
    result, new = run(proto)
    assert ("Pad" not in ops(new)) == folds
    if reason:
        assert any(k.endswith(reason) for k in skipped(result)), skipped(result)
    same_outputs(proto, new, POOL_SHAPES)


def test_pad_into_averagepool_with_count_include_pad():
    proto = _pad_pool("AveragePool", source="Tanh", count_include_pad=1, pads=[0, 0, 1, 0, 0, 0, 0, 1], pool_pads=[1, 1, 1, 1])
    _, new = run(proto)
    assert "Pad" not in ops(new)
    assert [a.ints for a in new.graph.node[1].attribute if a.name == "pads"][0] == [2, 1, 1, 2]
    same_outputs(proto, new, POOL_SHAPES)


# ------------------------------------------------------------------ zero RNN states built at run time

def _rnn_with_expand_zeros(fill=0.0, op="LSTM"):
    """tf2onnx/dynamo style: Expand(0, Concat([1], Shape(x)[1:2], [hidden])) -> Unsqueeze -> initial state."""
    rng = np.random.default_rng(1)
    hidden, gates = 3, {"LSTM": 4, "GRU": 3}[op]
    inits = [f32("W", rng.standard_normal((1, gates * hidden, 5)) * 0.5), f32("R", rng.standard_normal((1, gates * hidden, hidden)) * 0.5),
             f32("zero", [fill]), i64("one", [1]), i64("hd", [hidden]), i64("s", [1]), i64("e", [2]), i64("ax", [0])]
    nodes = [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Slice", ["sh", "s", "e"], ["b"]),
             h.make_node("Concat", ["b", "hd"], ["st"], axis=0), h.make_node("Expand", ["zero", "st"], ["z2"]),
             h.make_node("Unsqueeze", ["z2", "ax"], ["z"])]
    states = ["z", "z"] if op == "LSTM" else ["z"]
    nodes.append(h.make_node(op, ["x", "W", "R", "", "", *states], ["ys", "y"], hidden_size=hidden))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["t", "n", 5])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("fill, removed", [(0.0, True), (0.5, False)])
def test_run_time_zero_rnn_state_is_left_out(op, fill, removed):
    proto = _rnn_with_expand_zeros(fill, op)
    _, new = run(proto)
    rnn = [n for n in new.graph.node if n.op_type == op][0]
    assert (len(rnn.input) <= 5) == removed
    assert (sum(ops(new).values()) == 1) == removed  # the Shape/Slice/Concat/Expand chain dies with it
    same_outputs(proto, new, [(4, 2, 5), (1, 3, 5)])


# ------------------------------------------------------------------ neutral mask fills

@pytest.mark.parametrize("op, fill, shape_of, removed", [
    ("And", True, "x", True), ("Or", False, "x", True), ("And", False, "x", False),
    ("And", True, "wide", False),   # the fill's shape broadcasts x to [2, ...]: kept
])
def test_neutral_mask_fill_is_removed(op, fill, shape_of, removed):
    nodes = [h.make_node("Greater", ["x", "zero"], ["m"]), h.make_node("Shape", [shape_of], ["s"]),
             h.make_node("Expand", ["fill", "s"], ["f"]), h.make_node(op, ["f", "m"], ["a"]),
             h.make_node("Where", ["a", "x", "zero"], ["y"])]
    inits = [f32("zero", 0.0), nh.from_array(np.array(fill), "fill")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    if shape_of == "wide":
        g.node.insert(0, h.make_node("Concat", ["two", "three"], ["wide_s"], axis=0))
        g.node.insert(1, h.make_node("ConstantOfShape", ["wide_s"], ["wide"]))
        g.initializer.extend([i64("two", [2]), i64("three", [1, 3])])
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    _, new = run(proto)
    assert (op not in ops(new)) == removed
    same_outputs(proto, new, [(2, 3), (1, 3)])


@pytest.mark.parametrize("op, fill, x_dims, folds", [("And", False, (2, 3), True), ("Or", True, (2, 3), True),
                                                     ("And", True, (2, 3), False), ("And", False, ("n", 3), False)])
def test_absorbing_mask_constant_becomes_a_constant(op, fill, x_dims, folds):
    nodes = [h.make_node("Greater", ["x", "zero"], ["m"]), h.make_node(op, ["m", "c"], ["a"]),
             h.make_node("Where", ["a", "x", "zero"], ["y"])]
    inits = [f32("zero", 0.0), nh.from_array(np.full((1, 3), fill), "c")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(x_dims))],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    _, new = run(proto)
    assert ("Greater" not in ops(new)) == folds, ops(new)
    same_outputs(proto, new, [(2, 3)])


# ------------------------------------------------------------------ Shape slices in a Concat

def test_adjacent_shape_dims_become_one_shape_slice():
    """The TorchScript U-Net's Resize sizes: Concat(Shape(b)[0:2], Concat([H(s)], [W(s)])) -> Concat(Shape(b, 0, 2), Shape(s, 2, 4))."""
    nodes = [h.make_node("Relu", ["x"], ["s"]), h.make_node("MaxPool", ["x"], ["b"], kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("Shape", ["s"], ["ss"]), h.make_node("Gather", ["ss", "i2"], ["g2"], axis=0),
             h.make_node("Gather", ["ss", "i3"], ["g3"], axis=0), h.make_node("Unsqueeze", ["g2", "ax"], ["u2"]),
             h.make_node("Unsqueeze", ["g3", "ax"], ["u3"]), h.make_node("Concat", ["u2", "u3"], ["hw"], axis=0),
             h.make_node("Shape", ["b"], ["sb"]), h.make_node("Slice", ["sb", "z", "two"], ["nc"]),
             h.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             h.make_node("Resize", ["b", "", "", "sizes"], ["y"], mode="nearest")]
    inits = [i64("i2", 2), i64("i3", 3), i64("ax", [0]), i64("z", [0]), i64("two", [2])]
    proto = model(nodes, inits, x_dims=("n", 3, "h", "w"))
    result, new = run(proto)
    assert ops(new) == {"Relu": 1, "MaxPool": 1, "Shape": 2, "Concat": 1, "Resize": 1}, ops(new)
    same_outputs(proto, new, [(1, 3, 4, 6), (2, 3, 7, 5)])
    _, again = run(new)
    assert ops(again) == ops(new)


def test_shape_dims_out_of_order_stay():
    nodes = [h.make_node("Shape", ["x"], ["ss"]), h.make_node("Gather", ["ss", "i3"], ["g3"], axis=0),
             h.make_node("Gather", ["ss", "i2"], ["g2"], axis=0), h.make_node("Unsqueeze", ["g3", "ax"], ["u3"]),
             h.make_node("Unsqueeze", ["g2", "ax"], ["u2"]), h.make_node("Concat", ["u3", "u2"], ["wh"], axis=0),
             h.make_node("Cast", ["wh"], ["y"], to=T.FLOAT)]
    proto = model(nodes, [i64("i2", 2), i64("i3", 3), i64("ax", [0])], x_dims=("n", 3, "h", "w"))
    _, new = run(proto)
    assert ops(new)["Shape"] == 2 and ops(new)["Concat"] == 1  # each dim alone: Shape(x, 3, 4), Shape(x, 2, 3)
    same_outputs(proto, new, [(1, 3, 4, 6), (2, 3, 7, 5)])


# ------------------------------------------------------------------ Squeeze round trip

def test_squeeze_round_trip_around_scalar_arithmetic():
    """The dynamo U-Net's sizes: Reshape(Div(Squeeze(Shape(x, 2, 3)), 2), [1]) -> Div(Shape(x, 2, 3), 2)."""
    nodes = [h.make_node("Shape", ["x"], ["s"], start=2, end=3), h.make_node("Squeeze", ["s"], ["q"]),
             h.make_node("Div", ["q", "two"], ["d"]), h.make_node("Reshape", ["d", "one"], ["r"]),
             h.make_node("Cast", ["r"], ["y"], to=T.FLOAT)]
    proto = model(nodes, [i64("two", 2), i64("one", [1])], x_dims=("n", 3, "h", "w"))
    _, new = run(proto)
    assert ops(new) == {"Shape": 1, "Div": 1, "Cast": 1}
    same_outputs(proto, new, [(1, 3, 4, 6), (2, 3, 7, 5)])


# ------------------------------------------------------------------ Dense on N-D (tf2onnx's Tensordot)

@pytest.mark.parametrize("form, removed", [("shape", True), ("const", True), ("wrong", False)])
def test_reshape_round_trip_around_a_constant_matmul(form, removed):
    """Reshape(MatMul(Reshape(x, [-1, K]), W), Concat(Shape(x)[:-1], [N])) -> MatMul(x, W)."""
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Reshape", ["x", "flat"], ["f"]), h.make_node("MatMul", ["f", "w"], ["m"]),
             h.make_node("Shape", ["x"], ["s"]), h.make_node("Cast", ["s"], ["s32"], to=T.INT32),
             h.make_node("Gather", ["s32", "lead" if form != "wrong" else "lead_wrong"], ["g"], axis=0),
             h.make_node("Concat", ["g", "n"], ["t32"], axis=0), h.make_node("Cast", ["t32"], ["t"], to=T.INT64),
             h.make_node("Reshape", ["m", "t" if form != "const" else "tc"], ["y"])]
    inits = [i64("flat", [-1, 5]), f32("w", rng.standard_normal((5, 4))), nh.from_array(np.array([0, 1], np.int32), "lead"),
             nh.from_array(np.array([1, 0], np.int32), "lead_wrong"), nh.from_array(np.array([4], np.int32), "n"),
             i64("tc", [-1, 3, 4])]
    proto = model(nodes, inits, x_dims=("n", 3, 5))
    result, new = run(proto, "fold-shapes,simplify,cleanup")
    assert (ops(new) == {"MatMul": 1}) == removed, (ops(new), skipped(result))
    rng2 = np.random.default_rng(0)
    for shape in [(1, 3, 5), (2, 3, 5)]:
        feeds = {"x": rng2.standard_normal(shape).astype(np.float32)}
        try:
            ref = ort_run(proto, feeds)
        except Exception:  # noqa: BLE001 - the 'wrong' target fails where batch != 3: nothing to compare
            continue
        np.testing.assert_allclose(ort_run(new, feeds)[0], ref[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ repeats as a nearest Resize

def test_unsqueeze_tile_reshape_repeat_becomes_one_nearest_resize():
    """Keras' UpSampling2D (NCHW here): repeat H then W by 2 -> Resize(nearest, scales [1, 1, 2, 2])."""
    nodes = [h.make_node("Unsqueeze", ["x", "a3"], ["u1"]), h.make_node("Tile", ["u1", "r1"], ["t1"]),
             h.make_node("Shape", ["x"], ["s"]), h.make_node("Slice", ["s", "z", "two"], ["nc"]),
             h.make_node("Gather", ["s", "i2"], ["hh"], axis=0), h.make_node("Mul", ["hh", "k2"], ["h2"]),
             h.make_node("Gather", ["s", "i3"], ["ww"], axis=0),
             h.make_node("Concat", ["nc", "h2", "ww"], ["t1s"], axis=0), h.make_node("Reshape", ["t1", "t1s"], ["y1"]),
             h.make_node("Unsqueeze", ["y1", "a4"], ["u2"]), h.make_node("Tile", ["u2", "r2"], ["t2"]),
             h.make_node("Reshape", ["t2", "t2s"], ["y"])]
    inits = [i64("a3", [3]), i64("a4", [4]), i64("r1", [1, 1, 1, 2, 1]), i64("r2", [1, 1, 1, 1, 2]), i64("z", [0]),
             i64("two", [2]), i64("i2", [2]), i64("i3", [3]), i64("k2", [2]), i64("t2s", [0, 0, 0, -1])]
    proto = model(nodes, inits, x_dims=("n", 3, "h", "w"))
    _, new = run(proto, "fold-shapes,simplify,cleanup")
    assert ops(new) == {"Resize": 1}, ops(new)
    same_outputs(proto, new, [(1, 3, 4, 5), (2, 3, 3, 1)], atol=0)


@pytest.mark.parametrize("reps, axes, why", [([1, 1, 1, 3, 1], [3], "not a repeat of one axis by a power of two"),
                                              ([1, 1, 2, 2, 1], [3], "not a repeat of one axis by a power of two")])
def test_repeat_rule_declines(reps, axes, why):
    nodes = [h.make_node("Unsqueeze", ["x", "a"], ["u"]), h.make_node("Tile", ["u", "r"], ["t"]),
             h.make_node("Reshape", ["t", "shape"], ["y"])]
    target = [0, 3, -1, 5] if reps[2] == 1 else [0, 3, -1, 5]
    proto = model(nodes, [i64("a", axes), i64("r", reps), i64("shape", target)], x_dims=("n", 3, 4, 5))
    result, new = run(proto)
    assert "Resize" not in ops(new)
    assert any(k.endswith(why) for k in skipped(result)), skipped(result)


# ------------------------------------------------------------------ transpose-push

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
PUSH = "transpose-push,simplify,cleanup"


def _nhwc(body, inits=(), outputs=("y",), x_dims=("n", 3, "h", "w")):
    """x (NCHW) -> Transpose to NHWC -> body (reads 'a', writes 'b') -> Transpose back -> y."""
    nodes = [h.make_node("Transpose", ["x"], ["a"], perm=TO_NHWC), *body,
             h.make_node("Transpose", ["b"], ["y"], perm=TO_NCHW)]
    return model(nodes, list(inits), x_dims=x_dims, outputs=outputs)


PUSH_SHAPES = [(1, 3, 4, 5), (2, 3, 2, 6)]


@pytest.mark.parametrize("name, body, inits, transposes", [
    ("elementwise", [h.make_node("Add", ["a", "bias"], ["a1"]), h.make_node("Relu", ["a1"], ["a2"]),
                     h.make_node("Mul", ["a2", "half"], ["a3"]), h.make_node("Clip", ["a3", "lo", "hi"], ["b"])],
     [f32("bias", [0.1, -0.2, 0.3]), f32("half", 0.5), f32("lo", 0.0), f32("hi", 6.0)], 0),
    ("where", [h.make_node("Where", ["m", "a", "w"], ["b"])],
     [nh.from_array(np.array([True, False, True]), "m"), f32("w", np.arange(3, dtype=np.float32))], 0),
    ("pad", [h.make_node("Pad", ["a", "pads"], ["b"])], [i64("pads", [0, 1, 2, 0, 0, 0, 1, 0])], 0),
    ("resize", [h.make_node("Resize", ["a", "", "sc"], ["b"], mode="nearest")], [f32("sc", [1, 2, 3, 1])], 0),
    ("softmax", [h.make_node("Softmax", ["a"], ["b"], axis=-1)], [], 0),
    ("tile", [h.make_node("Tile", ["a", "reps"], ["b"])], [i64("reps", [1, 2, 1, 3])], 0),
    ("reduce_keep", [h.make_node("ReduceMean", ["a"], ["b"], axes=[1, 2], keepdims=1)], [], 0),
    ("reduce_sum_keep", [h.make_node("ReduceSum", ["a", "ax"], ["b"], keepdims=1)], [i64("ax", [2, -1])], 0),
    ("unsqueeze_reshape", [h.make_node("Unsqueeze", ["a", "u"], ["a1"]), h.make_node("Reshape", ["a1", "s"], ["b"])],
     [i64("u", [4]), i64("s", [0, 0, 0, 3])], 0),
    ("concat_two", [h.make_node("Transpose", ["x"], ["a2"], perm=TO_NHWC), h.make_node("Neg", ["a2"], ["a3"]),
                    h.make_node("Concat", ["a", "a3"], ["b"], axis=3)], [], 0),  # Neg's T crosses Concat with 'a''s
])
def test_transposes_cancel_through_layout_agnostic_ops(name, body, inits, transposes):
    proto = _nhwc(body, inits)
    result, new = run(proto, PUSH)
    assert ops(new)["Transpose"] == transposes, (ops(new), skipped(result))
    same_outputs(proto, new, PUSH_SHAPES, atol=1e-6)
    _, again = run(new, PUSH)
    assert ops(again) == ops(new)


def test_concat_of_two_same_transposes_merges_them():
    body = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Transpose", ["r"], ["t2"], perm=TO_NHWC),
            h.make_node("Concat", ["a", "t2"], ["b"], axis=-1)]
    proto = _nhwc(body)
    _, new = run(proto, PUSH)
    assert ops(new) == {"Relu": 1, "Concat": 1}
    same_outputs(proto, new, PUSH_SHAPES, atol=0)


def test_sibling_chains_without_a_common_transpose_stay():
    """Relu(T(x)) and Sigmoid(T(x)) into a Concat: no path reaches a Transpose, nothing moves."""
    body = [h.make_node("Relu", ["a"], ["r"]), h.make_node("Transpose", ["x"], ["t2"], perm=TO_NHWC),
            h.make_node("Sigmoid", ["t2"], ["s"]), h.make_node("Concat", ["r", "s"], ["b"], axis=-1)]
    proto = _nhwc(body)
    _, new = run(proto, PUSH)
    assert ops(new)["Transpose"] == 3
    same_outputs(proto, new, PUSH_SHAPES, atol=0)


def test_nhwc_global_pool_drops_the_transpose():
    """ReduceMean over NHWC's H, W with keepdims=0 gives [N, C]: the Transpose vanishes."""
    nodes = [h.make_node("Transpose", ["x"], ["a"], perm=TO_NHWC), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("ReduceMean", ["r"], ["y"], axes=[1, 2], keepdims=0)]
    proto = model(nodes, [], x_dims=("n", 3, "h", "w"))
    _, new = run(proto, PUSH)
    assert ops(new) == {"Relu": 1, "ReduceMean": 1}
    same_outputs(proto, new, PUSH_SHAPES)


@pytest.mark.parametrize("body, inits, outputs, why", [
    ([h.make_node("Add", ["a", "a2"], ["b"]), h.make_node("Relu", ["x"], ["a2"])], [], ("y",),
     "another input is neither a constant nor a Transpose of the same permutation used only here"),
    ([h.make_node("Relu", ["a"], ["b"])], [], ("y", "b"), None),   # a graph output on the path: the interface stays
    ([h.make_node("Relu", ["a"], ["b"]), h.make_node("Neg", ["a"], ["z"])], [], ("y", "z"), None),  # two users
    ([h.make_node("Reshape", ["a", "s"], ["b"])], [i64("s", [0, 0, 0, 3, 1])], ("y",), None),
])
def test_transpose_push_declines(body, inits, outputs, why):
    if len(inits) and body[0].op_type == "Reshape":  # a split (NHWC [n, h, w, 3] -> [n, h, w, 3, 1]) back to rank 4 is not a merge
        body = [h.make_node("Reshape", ["a", "s"], ["a1"]), h.make_node("Squeeze", ["a1", "sq"], ["b"])]
        inits = [*inits, i64("sq", [4])]
    if body[0].op_type == "Add" and len(body) == 2:
        body = [h.make_node("Relu", ["x"], ["a2"]), h.make_node("Transpose", ["a2"], ["a3"], perm=[0, 3, 2, 1]),
                h.make_node("Add", ["a", "a3"], ["b"])]
    proto = _nhwc(body, inits, outputs=outputs, x_dims=("n", 3, 4, 4))
    result, new = run(proto, PUSH)
    assert ops(new)["Transpose"] == ops(proto)["Transpose"]
    if why:
        assert any(k.endswith(why) for k in skipped(result)), skipped(result)
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 4, 4), (2, 3, 4, 4)]:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        for a, b in zip(ort_run(proto, feeds), ort_run(new, feeds)):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ the round-2 exports

#: the best correct peer's node count on each export (onnxsim 0.8.1, onnxslim 0.1.98, onnxoptimizer 0.4.2:
#: tests/benchmarks/compare_graph_round2.py, docs/graph_round2.json) and its Transposes
PEERS = {"rnn_ts": (12, 2), "rnn_dynamo": (11, 2), "unet_resize_ts": (43, 0), "unet_resize_dynamo": (39, 0),
         "keras_lstm": (8, 1), "keras_attention": (149, 6), "keras_unet": (84, 6), "keras_resnet": (18, 1)}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_round2_export_at_or_below_every_peer(name):
    from models.round2 import SHAPES
    proto = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
    _, new = run(proto, pipeline.DEFAULT_PIPELINE)
    nodes, transposes = PEERS[name]
    assert len(new.graph.node) <= nodes, ops(new)
    assert ops(new)["Transpose"] <= transposes
    if name == "keras_unet":  # the NHWC layout transposes: only the two at the interface stay
        assert ops(new)["Transpose"] == 2 and [n.op_type for n in new.graph.node].count("Tile") == 0
    spatial = {"keras_unet": (1, 2), "unet_resize_ts": (2, 3), "unet_resize_dynamo": (2, 3)}.get(name, ())
    rng = np.random.default_rng(0)
    for scale in (1, 2):  # a second size (larger images) where the dims are dynamic
        feeds = {k: rng.standard_normal(tuple(d * scale if i in spatial else d for i, d in enumerate(shape))).astype(np.float32)
                 for k, shape in SHAPES[name].items()}
        for a, b in zip(ort_run(proto, feeds), ort_run(new, feeds)):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ focused differential fuzzing

@pytest.mark.parametrize("label", ["simplify", "transpose-push", "default"])
def test_round2_patterns_on_random_graphs(label):
    """tests/fuzz's oracle on graphs of issue 22's patterns only (strategies.block_round2): outputs equal
    at every point the original runs, no crash, valid, idempotent.  The long run is
    ``python -m tests.fuzz.soak --graphs 2000 --blocks round2``."""
    import logging

    from hypothesis import HealthCheck, given, reject, settings

    from tests.fuzz import oracle, strategies
    text = pipeline.DEFAULT_PIPELINE if label == "default" else label

    @settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategies.graphs(["round2"]))
    def check(case):
        verdict = oracle.check_case(case, [(label, text)])
        if not verdict.valid:
            reject()
        assert not verdict.findings, f"{case.describe()}: " + "; ".join(map(str, verdict.findings))

    logging.disable(logging.WARNING)
    try:
        check()
    finally:
        logging.disable(logging.NOTSET)

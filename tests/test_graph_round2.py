"""Issue 22 ("Graph round 2"): the simplify rules for nested Concats, consecutive Slices, a Pad before a
pool, run-time zero RNN states, neutral mask fills, Shape slices and Squeeze round trips, and the
transpose-push pass; op counts after the pass, outputs on ORT at several input sizes, the declines.
The round-2 exports (models/round2.py) must end at or below every peer's node count."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import pipeline
from tests.helpers import ort_run


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


POOL_SHAPES = [(1, 3, 4, 5), (2, 3, 7, 6), (1, 3, 1, 1)]


@pytest.mark.parametrize("proto, folds, reason", [
    (_pad_pool("MaxPool"), True, None),                                   # zeros before a Relu output: never the max
    (_pad_pool("MaxPool", source="Tanh"), False, "Pad value is not -inf, nor 0 before an input provably >= 0"),
    (_pad_pool("MaxPool", pad_value=-np.inf, source="Tanh"), True, None),
    (_pad_pool("MaxPool", ceil_mode=1), False, "ceil_mode: windows past the padding would differ"),
    (_pad_pool("MaxPool", pads=(0, 0, 3, 3, 0, 0, 3, 3)), False, "the merged pads would not be smaller than the kernel"),
    (_pad_pool("AveragePool", source="Tanh"), True, None),                 # becomes count_include_pad=1
    (_pad_pool("AveragePool", source="Tanh", pool_pads=[1, 1, 1, 1]), False,
     "AveragePool excludes its own padding from the mean (count_include_pad=0)"),
    (_pad_pool("AveragePool", source="Tanh", pad_value=0.5), False, "Pad value is not zero"),
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

"""Small classifiers whose class scores hide from a Softmax-op search (built with onnx.helper in
milliseconds): tf2onnx-style softmax written out as Exp / ReduceSum / Div (with or without the
ReduceMax subtraction), LogSoftmax written out, an output that is a probability only on the data,
and a raw linear head.  Used by tests/test_fidelity_kinds.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _head(rng: np.random.Generator, d: int, classes: int) -> tuple[list, list]:
    """x [n, d] -> hidden Relu -> logits [n, classes] (MatMul + bias); nodes and initializers."""
    w1 = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((d, classes)) / np.sqrt(d)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w1"], ["h"], name="embed"), h.make_node("Relu", ["h"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["z0"], name="head"), h.make_node("Add", ["z0", "b2"], ["z"], name="bias")]
    return nodes, [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(b2, "b2")]


def softmax_written_out(rng: np.random.Generator, *, d: int = 32, classes: int = 214, subtract_max: bool = True,
                        log: bool = False, opset: int = 13) -> onnx.ModelProto:
    """Class probabilities (or log-probabilities) computed in basic ops, as tf2onnx writes Keras'
    softmax: ``Exp(z - ReduceMax(z)) / ReduceSum(Exp(...))`` or ``z' - Log(ReduceSum(Exp(z')))``."""
    nodes, inits = _head(rng, d, classes)
    # axes: an input from opset 13 for ReduceSum, from opset 18 for ReduceMax; an attribute before
    max_attr = {"axes": [-1]} if opset < 18 else {}
    max_in = [] if opset < 18 else ["axes"]
    extra = [nh.from_array(np.array([-1], np.int64), "axes")]
    src = "z"
    if subtract_max:
        nodes += [h.make_node("ReduceMax", ["z", *max_in], ["zmax"], keepdims=1, name="max", **max_attr),
                  h.make_node("Sub", ["z", "zmax"], ["zs"], name="shift")]
        src = "zs"
    nodes += [h.make_node("Exp", [src], ["e"], name="exp"),
              h.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1, name="sum")]
    if log:
        nodes += [h.make_node("Log", ["s"], ["ls"], name="log"), h.make_node("Sub", [src, "ls"], ["scores"], name="logsm")]
    else:
        nodes.append(h.make_node("Div", ["e", "s"], ["scores"], name="div"))
    graph = h.make_graph(nodes, "written_out", [h.make_tensor_value_info("x", T.FLOAT, ["n", d])],
                         [h.make_tensor_value_info("scores", T.FLOAT, ["n", classes])], inits + extra)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def normalized_by_data(rng: np.random.Generator, *, d: int = 16, classes: int = 10) -> onnx.ModelProto:
    """An output that is a probability only on the data: |z| / sum |z| (no Exp, no Softmax)."""
    nodes, inits = _head(rng, d, classes)
    nodes += [h.make_node("Abs", ["z"], ["a"], name="abs"),
              h.make_node("ReduceSum", ["a", "axes"], ["s"], keepdims=1, name="sum"),
              h.make_node("Div", ["a", "s"], ["share"], name="div")]
    graph = h.make_graph(nodes, "by_data", [h.make_tensor_value_info("x", T.FLOAT, ["n", d])],
                         [h.make_tensor_value_info("share", T.FLOAT, ["n", classes])],
                         inits + [nh.from_array(np.array([-1], np.int64), "axes")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def linear_head(rng: np.random.Generator, *, d: int = 32, classes: int = 100, name: str = "predictions") -> onnx.ModelProto:
    """Raw logits from a MatMul head under a name no class-score word matches (Keras' ``predictions``)."""
    nodes, inits = _head(rng, d, classes)
    nodes.append(h.make_node("Identity", ["z"], [name], name="out"))
    graph = h.make_graph(nodes, "linear", [h.make_tensor_value_info("x", T.FLOAT, ["n", d])],
                         [h.make_tensor_value_info(name, T.FLOAT, ["n", classes])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)

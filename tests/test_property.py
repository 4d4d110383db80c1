"""Property: on random small graphs the default pipeline preserves outputs and is idempotent (a
second run changes nothing).  Outputs must agree to rtol 1e-5 / atol 1e-6: every pass is exact
except simplify's constant-chain merge, which reassociates float additions (rounding-level)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import pipeline
from onnxopt.base import count_nodes
from tests.helpers import ort_run

UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity", "Dropout", "Exp"]
BINARY = ["Add", "Sub", "Mul", "Max", "Min"]
SHAPE = [2, 3]


@st.composite
def random_graphs(draw):
    """A DAG over one input: unary/binary ops on earlier values, Constant nodes, initializers
    (some duplicated, some unused, some listed as inputs), dead branches and an optional If."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    values = ["x"]
    consts: list[str] = []
    nodes, inits, extra_inputs = [], [], []
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "constant", "initializer", "dup"]))
        out = f"v{i}"
        if kind == "unary":
            nodes.append(h.make_node(draw(st.sampled_from(UNARY)), [draw(st.sampled_from(values + consts))], [out]))
        elif kind == "binary":
            a, b = draw(st.sampled_from(values + consts)), draw(st.sampled_from(values + consts))
            nodes.append(h.make_node(draw(st.sampled_from(BINARY)), [a, b], [out]))
        elif kind == "constant":
            arr = rng.uniform(-2, 2, SHAPE).astype(np.float32)
            nodes.append(h.make_node("Constant", [], [out], value=nh.from_array(arr, out + "_t")))
            consts.append(out)
            continue
        else:
            source = inits[-1] if kind == "dup" and inits else None
            arr = nh.to_array(source).copy() if source is not None else rng.uniform(-2, 2, SHAPE).astype(np.float32)
            inits.append(nh.from_array(arr, out))
            if draw(st.booleans()) and draw(st.booleans()):
                extra_inputs.append(h.make_tensor_value_info(out, T.FLOAT, SHAPE))
            consts.append(out)
            continue
        values.append(out)
    if draw(st.booleans()):
        cond = f"c{len(nodes)}"
        nodes.append(h.make_node("ReduceSum", [values[-1]], [cond + "_s"], keepdims=0))
        nodes.append(h.make_node("Greater", [cond + "_s", "zero"], [cond]))
        inits.append(nh.from_array(np.array(0.0, np.float32), "zero"))
        pick = draw(st.sampled_from(values + consts))
        then_g = h.make_graph([h.make_node("Constant", [], ["k"], value=nh.from_array(np.full(SHAPE, 2.0, np.float32))),
                               h.make_node("Mul", [pick, "k"], ["t"]), h.make_node("Identity", ["t"], ["t_out"])],
                              "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)])
        else_g = h.make_graph([h.make_node("Neg", [pick], ["e_out"])], "else", [],
                              [h.make_tensor_value_info("e_out", T.FLOAT, None)])
        nodes.append(h.make_node("If", [cond], ["if_out"], then_branch=then_g, else_branch=else_g))
        values.append("if_out")
    n_out = draw(st.integers(1, min(2, len(values))))
    outputs = list(dict.fromkeys(values[-n_out:]))
    graph = h.make_graph(nodes, "random", [h.make_tensor_value_info("x", T.FLOAT, SHAPE)] + extra_inputs,
                         [h.make_tensor_value_info(o, T.FLOAT, SHAPE) for o in outputs], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.integers(0, 1000))
def test_default_pipeline_preserves_outputs_and_is_idempotent(proto, seed):
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    feeds = {"x": x}
    expected = ort_run(proto, feeds)

    model = ir.serde.deserialize_model(proto)
    specs = pipeline.parse(pipeline.DEFAULT_PIPELINE)
    first = pipeline.run(model, specs)
    assert first.converged
    optimized = ir.to_proto(model)
    onnx.checker.check_model(optimized)
    got = ort_run(optimized, feeds)
    assert [o.name for o in optimized.graph.output] == [o.name for o in proto.graph.output]
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    nodes = count_nodes(model)
    second = pipeline.run(model, specs)
    assert second.iterations == 1 and not any(r.modified for r in second.records)
    assert count_nodes(model) == nodes

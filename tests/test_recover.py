"""passes/recover.py alone: cross-layer equalization keeps float outputs, bias correction removes
the mean output shift of weight rounding, adaround lowers a layer's output error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt.quantization import qdq as qq
from onnxopt.quantization import recovery as recover


def _run(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _conv_relu_conv(rng) -> onnx.ModelProto:
    """Conv(3->8) -> Relu -> Conv(8->4); the first conv's output channels span ranges 0.01..10."""
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.logspace(-2, 1, 8, dtype=np.float32)[:, None, None, None]
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
    b2 = rng.standard_normal(4).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["y1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2", "b2"], ["out"], pads=[1, 1, 1, 1], name="conv2")]
    graph = h.make_graph(nodes, "crc", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 8, 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, ["n", 4, 8, 8])],
                         [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2"), nh.from_array(b2, "b2")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def test_cle_keeps_float_outputs_and_evens_channel_ranges():
    rng = np.random.default_rng(0)
    proto = _conv_relu_conv(rng)
    model = ir.from_proto(proto)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = _run(proto, x)
    changed = recover.cle(model)
    assert changed["pairs equalized"] == 1
    after = _run(model, x)
    assert np.abs(after - before).max() <= 1e-5 * max(1.0, np.abs(before).max()), np.abs(after - before).max()
    w1 = {n.name: n for n in model.graph}["conv1"].inputs[1].const_value.numpy()
    spread = lambda w: np.abs(w).reshape(8, -1).max(1).max() / np.abs(w).reshape(8, -1).max(1).min()  # noqa: E731
    assert spread(w1) < spread(nh.to_array(proto.graph.initializer[0])) / 10


def _biased_layer(rng, k=16, n=8) -> onnx.ModelProto:
    """Gemm over inputs with a large mean: weight rounding shifts every output by (W_q - W) . E[x]."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[0, :] *= 20  # per-tensor scale set by an outlier row: coarse rounding elsewhere
    b = rng.standard_normal(n).astype(np.float32)
    graph = h.make_graph([h.make_node("Gemm", ["x", "w", "b"], ["out"], name="fc")], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["n", k])], [h.make_tensor_value_info("out", T.FLOAT, ["n", n])],
                         [nh.from_array(w, "w"), nh.from_array(b, "b")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def _quantized(proto, ranges, correct: bool, batches) -> ir.Model:
    float_model = ir.from_proto(proto)
    model = ir.from_proto(proto)
    the_plan = qq.plan(model, qq.PROFILES["cpu"])
    qq.QuantizeQDQ(the_plan, ranges, qq.PROFILES["cpu"], per_channel=False, qmax=15)(model)
    if correct:
        means = recover.input_means(float_model, the_plan.primary(), batches)
        assert recover.bias_correction(model, the_plan, float_model, means)["biases corrected"] == 1
    return model


def test_bias_correction_reduces_the_mean_output_error():
    rng = np.random.default_rng(1)
    proto = _biased_layer(rng)
    batches = [{"x": (rng.random((32, 16)) * 2 + 3).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([b["x"] for b in batches])
    ref = _run(proto, x)
    ranges = {"x": (0.0, float(x.max()))}
    errors = {}
    for correct in (False, True):
        got = _run(_quantized(proto, ranges, correct, batches), x)
        errors[correct] = np.abs((got - ref).mean(axis=0)).mean()  # mean output shift per channel
    assert errors[True] < errors[False] / 3, errors


def test_adaround_lowers_the_layer_output_error():
    """Error-feedback rounding beats round-to-nearest on the calibration activations' ||XW - XW_q||."""
    rng = np.random.default_rng(2)
    k, n = 32, 8
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["out"], name="mm")], "m",
                         [h.make_tensor_value_info("x", T.FLOAT, ["n", k])], [h.make_tensor_value_info("out", T.FLOAT, ["n", n])],
                         [nh.from_array(w, "w")])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    mix = rng.standard_normal((k, k)).astype(np.float32)  # correlated inputs: where error feedback pays
    batches = [{"x": (rng.standard_normal((64, k)) @ mix).astype(np.float32)} for _ in range(4)]
    model = ir.from_proto(proto)
    the_plan = qq.plan(model, qq.PROFILES["cpu"])
    rounded = recover.adaround(model, the_plan, batches, proto.SerializeToString(), per_channel=True, qmax=7)
    q_ada, scale = rounded["mm"]
    q_near, scale_near = qq.weight_params(w, 1, 7)
    np.testing.assert_array_equal(scale, scale_near)
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    err = {name: np.linalg.norm(x @ w - x @ (q.astype(np.float64) * scale)) for name, q in (("ada", q_ada), ("near", q_near))}
    assert err["ada"] < 0.9 * err["near"], err


def test_sampled_conv_rows_are_rows_of_the_full_im2col():
    """The Hessian's rows of a strided, asymmetrically padded 3x3 Conv (42 output positions),
    sampled to 9: every sampled row is a row of the full im2col (sampling picks windows, it does
    not reorder a window's features) and they are distinct; the per-batch share of the ROWS_PER_K
    budget never goes below MIN_ROWS, and one batch gets all of ROWS_PER_K x K."""
    import onnx_ir as ir

    from onnxopt.quantization import recovery as recover

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    w = ir.Value(name="w", const_value=ir.tensor(np.zeros((4, 3, 3, 3), np.float32)))
    node = ir.node("Conv", [ir.Value(name="x"), w], {"pads": [1, 0, 1, 2], "strides": [2, 1]})
    full = recover._rows(x, node, rng, limit=10**6)
    assert full.shape == (2 * 3 * 7, 27)
    some = recover._rows(x, node, np.random.default_rng(1), limit=9)
    assert some.shape == (9, 27) and len({r.tobytes() for r in some}) == 9
    assert all(any(np.array_equal(r, f) for f in full) for r in some)
    big = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)  # 2 * 20 * 41 = 1640 windows
    budget = recover._rows(big, node, rng, limit=-100)  # 100 batches: ROWS_PER_K * 27 / 100 < MIN_ROWS
    assert len(budget) == recover.MIN_ROWS < len(recover._rows(big, node, rng, limit=10**6))
    one = recover._rows(big, node, rng, limit=-1)  # one batch: the whole budget
    assert len(one) == max(recover.MIN_ROWS, recover.ROWS_PER_K * 27)


def test_error_feedback_batches_and_inverse_cholesky_are_exact():
    """The Hessian's inverse Cholesky factor (from a Cholesky of the reversed matrix and a triangular
    inverse by halves) equals ``cholesky(inv(h)).T`` at sizes below, at and above the 64-wide leaf,
    odd ones included; lazy batches of rows (errors pulled within a batch) give the same codes as
    one row at a time, with and without zero points (int4-style grids)."""
    rng = np.random.default_rng(5)
    for n in (1, 7, 64, 65, 131, 300):
        x = rng.standard_normal((2 * n + 8, n))
        hess = x.T @ x / len(x) + np.eye(n) * 0.01
        u = recover._inverse_cholesky(hess)
        ref = np.linalg.cholesky(np.linalg.inv(hess)).T
        assert np.allclose(u, np.triu(u)) and np.abs(u - ref).max() <= 1e-10 * np.abs(ref).max(), n
    k, n = 150, 24
    x = rng.standard_normal((512, k)) @ rng.standard_normal((k, k)) * 0.3  # correlated features
    hess, w = x.T @ x / len(x), rng.standard_normal((k, n))
    s = np.abs(w).max(axis=0) / 127
    batched, single = recover.error_feedback(w, s, hess, 127), recover.error_feedback(w, s, hess, 127, lazy=1)
    assert np.array_equal(batched, single)
    assert not np.array_equal(batched, np.clip(np.round(w / s), -127, 127))  # the feedback changed codes
    s4, zero = np.abs(w).max(axis=0) / 7.5, np.full(n, 8.0)
    assert np.array_equal(recover.error_feedback(w, s4, hess, 15, zero=zero, qmin=0, lazy=32),
                          recover.error_feedback(w, s4, hess, 15, zero=zero, qmin=0, lazy=1))

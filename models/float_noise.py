"""A model whose correct Conv+BatchNormalization fold moves outputs beyond the fixed lossless
tolerance (rtol 1e-4, atol 1e-5): a BN with a tiny variance amplifies the conv output by 1e4 around
its mean (0-255 pixel inputs), so reassociating the fold costs ~0.1 in absolute terms at outputs near
zero, as ORT's own BN fusion does too.  Built with onnx.helper and onnxruntime in milliseconds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def amplified_bn(rng: np.random.Generator, channels: int = 8, variance: float = 1e-8) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """(model, two batches of 0-255 pixels [2, 3, 8, 8]); the BN mean is the conv output's mean on the
    first batch, so outputs straddle zero."""
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    batches = [rng.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    conv = h.make_graph([h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])], "conv",
                        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                        [h.make_tensor_value_info("c", T.FLOAT, None)], [nh.from_array(w, "w")])
    sess = ort.InferenceSession(h.make_model(conv, opset_imports=[h.make_opsetid("", 13)], ir_version=8).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    mean = sess.run(None, {"x": batches[0]})[0].mean(axis=(0, 2, 3)).astype(np.float32)
    stats = [nh.from_array(np.ones(channels, np.float32), "g"), nh.from_array(np.zeros(channels, np.float32), "b"),
             nh.from_array(mean, "m"), nh.from_array(np.full(channels, variance, np.float32), "v")]
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    graph = h.make_graph(nodes, "amplified_bn", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", channels, 8, 8])], [nh.from_array(w, "w"), *stats])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8), batches

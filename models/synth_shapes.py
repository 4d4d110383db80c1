"""Models that run only at input sizes a data-less run must find (issue 21, item 5): written with
onnx.helper, deterministic (fixed seeds), built in milliseconds, for ``tests/test_synth_shapes.py``.

- :func:`yolo_detector`: a YOLO-style detector with symbolic H/W.  Five stride-2 3x3 Convs
  (strides 2..32), then a feature-pyramid neck as YOLOv8's: the stride-32 map upsampled x2
  (Resize, nearest) and concatenated with the stride-16 map, that upsampled and concatenated with
  the stride-8 map.  A 3x3 stride-2 Conv with pad 1 gives ceil(n / 2), so the upsampled map and
  the skip connection differ by one unless ceil(H / 8) and ceil(H / 16) are even (any multiple of
  32 is): at H = W = 1 ORT fails in Concat with ``mismatched dimensions``, as YOLOv8n does.
- :func:`vad_audio`: a VAD-style audio model (as silero-vad): ``input`` [batch, samples], a
  recurrent ``state`` [2, batch, 16], a reflect Pad of 256 samples on each side (ORT refuses 256
  samples or fewer) then a framing Conv (512-sample frame, hop 256, as an STFT), beside the same
  framing on the unpadded signal (fails under 512 samples: the frame), a speech probability
  [batch, 1] and the next state.
- :func:`runs_at_one`: image-like (symbolic H/W) and signal-like (symbolic length) inputs that run
  at every dim 1 (global pooling): a data-less run must keep using 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OPSET = 17
#: reflect padding of vad_audio's signal on each side, and its frame (Conv kernel) and hop
VAD_PAD, VAD_FRAME, VAD_HOP = 256, 512, 256


def _model(nodes, inputs, outputs, inits, name: str) -> onnx.ModelProto:
    graph = h.make_graph(nodes, name, inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="handwritten",
                         ir_version=onnx.helper.find_min_ir_version_for([h.make_opsetid("", OPSET)]))
    onnx.checker.check_model(model)
    return model


def _conv(rng, inits: list, nodes: list, x: str, out: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
    """Conv + bias + SiLU (x * Sigmoid(x), as YOLOv8 writes it); returns the output name."""
    inits += [nh.from_array((rng.standard_normal((cout, cin, k, k)) * (1.0 / np.sqrt(cin * k * k))).astype(np.float32),
                            f"{out}_w"),
              nh.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{out}_b")]
    pad = k // 2
    nodes += [h.make_node("Conv", [x, f"{out}_w", f"{out}_b"], [f"{out}_c"], kernel_shape=[k, k],
                          strides=[stride, stride], pads=[pad] * 4),
              h.make_node("Sigmoid", [f"{out}_c"], [f"{out}_s"]),
              h.make_node("Mul", [f"{out}_c", f"{out}_s"], [out])]
    return out


def yolo_detector(classes: int = 3) -> onnx.ModelProto:
    """images [batch, 3, height, width] -> output0 [batch, 4 + classes, anchors] (stride-8 grid)."""
    rng = np.random.default_rng(21)
    nodes: list = []
    inits: list = [nh.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"),
                   nh.from_array(np.array([0, 4 + classes, -1], np.int64), "out_shape")]
    widths = [8, 8, 12, 16, 16]
    x, cin, levels = "images", 3, []
    for i, c in enumerate(widths):  # strides 2, 4, 8, 16, 32
        x = _conv(rng, inits, nodes, x, f"p{i + 1}", cin, c, stride=2)
        cin = c
        levels.append((x, c))
    (p3, c3), (p4, c4), (p5, c5) = levels[2], levels[3], levels[4]
    for up_from, skip, name, cin in ((p5, p4, "n4", c5 + c4), ("n4", p3, "n3", 16 + c3)):
        nodes += [h.make_node("Resize", [up_from, "", "up_scales"], [f"{name}_up"], mode="nearest"),
                  h.make_node("Concat", [f"{name}_up", skip], [f"{name}_cat"], axis=1)]
        _conv(rng, inits, nodes, f"{name}_cat", name, cin, 16, k=1)
    head_w = (rng.standard_normal((4 + classes, 16, 1, 1)) * 0.25).astype(np.float32)
    inits.append(nh.from_array(head_w, "head_w"))
    nodes += [h.make_node("Conv", ["n3", "head_w"], ["head"], kernel_shape=[1, 1]),
              h.make_node("Reshape", ["head", "out_shape"], ["output0"])]
    inputs = [h.make_tensor_value_info("images", T.FLOAT, ["batch", 3, "height", "width"])]
    outputs = [h.make_tensor_value_info("output0", T.FLOAT, ["batch", 4 + classes, "anchors"])]
    return _model(nodes, inputs, outputs, inits, "yolo_detector")


def vad_audio() -> onnx.ModelProto:
    """input [batch, samples], state [2, batch, 16] -> output [batch, 1], stateN [2, batch, 16]."""
    rng = np.random.default_rng(5)
    frame = (rng.standard_normal((16, 1, VAD_FRAME)) / np.sqrt(VAD_FRAME)).astype(np.float32)
    inits = [nh.from_array(np.array([1], np.int64), "one"), nh.from_array(np.array([0], np.int64), "zero"),
             nh.from_array(np.array([0, 0, VAD_PAD, 0, 0, VAD_PAD], np.int64), "pads"),
             nh.from_array(frame, "frame_w"), nh.from_array(frame[::-1].copy(), "raw_w"),
             nh.from_array((rng.standard_normal((16, 1)) * 0.3).astype(np.float32), "cls_w"),
             nh.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "rec_w")]
    nodes = [h.make_node("Unsqueeze", ["input", "one"], ["x3"]),  # [batch, 1, samples]
             h.make_node("Pad", ["x3", "pads"], ["padded"], mode="reflect"),
             h.make_node("Conv", ["padded", "frame_w"], ["spec"], kernel_shape=[VAD_FRAME], strides=[VAD_HOP]),
             h.make_node("Mul", ["spec", "spec"], ["power"]),
             h.make_node("ReduceMean", ["power"], ["feat_padded"], axes=[2], keepdims=0),  # [batch, 16]
             h.make_node("Conv", ["x3", "raw_w"], ["raw"], kernel_shape=[VAD_FRAME], strides=[VAD_HOP]),  # unpadded
             h.make_node("ReduceMean", ["raw"], ["feat_raw"], axes=[2], keepdims=0),
             h.make_node("Add", ["feat_padded", "feat_raw"], ["feat"]),
             h.make_node("Softplus", ["feat"], ["lfeat"]),
             h.make_node("Gather", ["state", "one"], ["state_last_1"], axis=0),  # [1, batch, 16]
             h.make_node("Squeeze", ["state_last_1", "zero"], ["state_last"]),
             h.make_node("MatMul", ["state_last", "rec_w"], ["rec"]),
             h.make_node("Add", ["lfeat", "rec"], ["hidden_pre"]),
             h.make_node("Tanh", ["hidden_pre"], ["hidden"]),
             h.make_node("MatMul", ["hidden", "cls_w"], ["logit"]),
             h.make_node("Sigmoid", ["logit"], ["output"]),
             h.make_node("Unsqueeze", ["hidden", "zero"], ["hidden_1"]),
             h.make_node("Concat", ["state_last_1", "hidden_1"], ["stateN"], axis=0)]
    inputs = [h.make_tensor_value_info("input", T.FLOAT, ["batch", "samples"]),
              h.make_tensor_value_info("state", T.FLOAT, [2, "batch", 16])]
    outputs = [h.make_tensor_value_info("output", T.FLOAT, ["batch", 1]),
               h.make_tensor_value_info("stateN", T.FLOAT, [2, "batch", 16])]
    return _model(nodes, inputs, outputs, inits, "vad_audio")


def runs_at_one() -> onnx.ModelProto:
    """image [batch, 3, height, width] and signal [batch, samples] -> score [batch, 4]: a Conv and
    global pooling, so every size (1 included) runs."""
    rng = np.random.default_rng(1)
    nodes: list = []
    inits: list = [nh.from_array(np.array([1], np.int64), "one"),
                   nh.from_array((rng.standard_normal((1, 4)) * 0.5).astype(np.float32), "sig_w")]
    _conv(rng, inits, nodes, "image", "c1", 3, 4, stride=2)
    nodes += [h.make_node("GlobalAveragePool", ["c1"], ["pooled"]),
              h.make_node("Flatten", ["pooled"], ["flat"]),
              h.make_node("ReduceMean", ["signal"], ["sig_mean"], axes=[1], keepdims=1),  # [batch, 1]
              h.make_node("MatMul", ["sig_mean", "sig_w"], ["sig_feat"]),
              h.make_node("Add", ["flat", "sig_feat"], ["score"])]
    inputs = [h.make_tensor_value_info("image", T.FLOAT, ["batch", 3, "height", "width"]),
              h.make_tensor_value_info("signal", T.FLOAT, ["batch", "samples"])]
    outputs = [h.make_tensor_value_info("score", T.FLOAT, ["batch", 4])]
    return _model(nodes, inputs, outputs, inits, "runs_at_one")

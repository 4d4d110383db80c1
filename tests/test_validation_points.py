"""With --data, validation's second point comes from the data (issue 21): another batch with its batch
dim changed by tiling its own rows, never N(0, 1) inputs whose range may be nothing like the data's."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import runtime, validation


def _pixel_model() -> onnx.ModelProto:
    """0-255 pixels -> /255 -> Conv -> BatchNormalization -> Relu -> GlobalAveragePool (batch symbolic)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bn = [nh.from_array(a.astype(np.float32), n) for a, n in
          ((rng.uniform(0.5, 2, 4), "g"), (rng.standard_normal(4), "b"), (rng.standard_normal(4), "m"), (rng.uniform(0.1, 1, 4), "v"))]
    nodes = [h.make_node("Mul", ["x", "inv255"], ["xs"]), h.make_node("Conv", ["xs", "w"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]), h.make_node("Relu", ["n"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["y"])]
    graph = h.make_graph(nodes, "pixels", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4, 1, 1])],
                         [nh.from_array(w, "w"), nh.from_array(np.array(1 / 255, np.float32), "inv255"), *bn])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def _pixels(tmp_path, batches: int):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(batches):
        np.savez(folder / f"b{i}.npz", x=rng.integers(0, 256, (2, 3, 8, 8)).astype(np.float32))
    return folder


def test_the_second_point_is_the_data_with_another_batch_size(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_pixel_model(), str(src))
    v = validation.Validator(src, data=_pixels(tmp_path, 3))
    first, second = v.points
    assert first.label == "data batch 1" and second.label.startswith("data batch 2, batch dim 2 -> 3")
    x1, x2 = first.feeds["x"], second.feeds["x"]
    assert x2.shape == (3, 3, 8, 8) and x2.min() >= 0 and x2.max() <= 255 and not np.array_equal(x2[:2], x1)
    assert np.array_equal(x2[2], x2[0])  # tiled from the batch's own rows


def test_one_batch_still_gives_a_point_from_the_data(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_pixel_model(), str(src))
    v = validation.Validator(src, data=_pixels(tmp_path, 1))
    assert [p.label for p in v.points] == ["data batch 1", "new values in data batch 1's ranges, batch dim 2 -> 3 (rows tiled)"]
    x1, x2 = v.points[0].feeds["x"], v.points[1].feeds["x"]
    lo, hi = x1.min(axis=0), x1.max(axis=0)
    assert np.all(x2 >= lo) and np.all(x2 <= hi) and not np.array_equal(x2[:2], x1)  # new values, the data's ranges


def test_a_fixed_batch_model_with_one_batch_gets_new_values_in_its_ranges(tmp_path):
    model = _pixel_model()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    v = validation.Validator(src, data=_pixels(tmp_path, 1))
    assert v.points[1].label == "new values in data batch 1's ranges" and v.points[1].reference is not None
    assert v.points[1].feeds["x"].shape == (2, 3, 8, 8)


def test_optimize_with_data_never_validates_on_noise(cli, tmp_path):
    """The report's points are the data's; the fused result passes at both."""
    src = tmp_path / "m.onnx"
    onnx.save(_pixel_model(), str(src))
    rep = tmp_path / "r.json"
    r = cli("optimize", src, "-o", tmp_path / "o.onnx", "--data", _pixels(tmp_path, 2), "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    points = report["validation"]["points"]
    assert [p["status"] for p in points] == ["compared", "compared"]
    assert all(p["label"].startswith("data batch") for p in points)
    assert "BatchNormalization" not in report["output"]["ops"]
    assert runtime.session(str(tmp_path / "o.onnx")) is not None

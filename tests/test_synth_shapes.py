"""Runnable synthesized inputs for common models (issue 21, item 5): without --data, a model that does
not run with its symbolic dims at 1 is tried at image sizes (multiples of 32, H = W) and at doubling
signal lengths before odd sizes, and the sizes used are named in one warning line; a model that runs
at 1 keeps 1.  Models: models/synth_shapes.py (built here, in milliseconds)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from models import synth_shapes
from onnxopt import runtime
from onnxopt.errors import BadInputError

SEARCH_LINE = re.compile(r"the model does not run with every symbolic dim at 1; using ([^(]*) \(([^)]*)\)")


@pytest.fixture
def saved(tmp_path):
    def save(name: str):
        path = tmp_path / f"{name}.onnx"
        onnx.save(getattr(synth_shapes, name)(), str(path))
        return path

    return save


def _dims_used(output: str) -> tuple[dict[str, int], str]:
    """The dims (and the reason) named by the search's warning; exactly one such line."""
    found = SEARCH_LINE.findall(output)
    assert len(found) == 1, output
    values, why = found[0]
    return {k: int(v) for k, v in (kv.split("=") for kv in values.split(", "))}, why


def _optimize(cli, path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    r = cli("optimize", path, "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    assert out.exists()
    rep = json.loads(report.read_text())
    assert rep["validation"]["ok"], rep["validation"]
    return r.output, rep


def test_yolo_detector_optimizes_at_a_multiple_of_32(cli, saved, tmp_path):
    """H = W = 1 fails in Concat (upsampled map vs skip connection); the first image size tried,
    224, runs: the warning names it, the primary validation point has that shape, and the second
    point stays on a multiple of 32 (192), so both are compared."""
    output, rep = _optimize(cli, saved("yolo_detector"), tmp_path)
    dims, why = _dims_used(output)
    assert dims == {"batch": 1, "height": 224, "width": 224}, dims
    assert dims["height"] % 32 == 0 and "image-like input 'images'" in why
    primary = rep["validation"]["points"][0]
    assert primary["status"] == "compared" and primary["shapes"]["images"] == [1, 3, 224, 224]
    second = rep["validation"]["points"][1]
    assert second["status"] == "compared" and second["shapes"]["images"][2] % 32 == 0, second


def test_vad_audio_optimizes_at_a_length_of_at_least_its_frame(cli, saved, tmp_path):
    """samples <= 256 fails the reflect Pad, < 512 the framing Conv: lengths double from 2 and the
    first that runs is the frame, 512; the state keeps batch 1; validated at 2 points."""
    output, rep = _optimize(cli, saved("vad_audio"), tmp_path)
    dims, why = _dims_used(output)
    assert dims == {"batch": 1, "samples": synth_shapes.VAD_FRAME}, dims
    assert "signal-like input 'input'" in why
    points = rep["validation"]["points"]
    assert points[0]["shapes"] == {"input": [1, 512], "state": [2, 1, 16]}
    assert all(p["status"] == "compared" for p in points) and len(points) == 2


def test_a_model_that_runs_at_one_keeps_one(cli, saved, tmp_path):
    """Image-like and signal-like inputs that run at every dim 1: no search, no search warning, dims 1."""
    output, rep = _optimize(cli, saved("runs_at_one"), tmp_path)
    assert not SEARCH_LINE.search(output), output
    assert rep["validation"]["points"][0]["shapes"] == {"image": [1, 3, 1, 1], "signal": [1, 1]}


def test_batch_without_data_runs_both(cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("yolo_detector", "vad_audio"):
        onnx.save(getattr(synth_shapes, name)(), str(folder / f"{name}.onnx"))
    r = cli("batch", folder, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {m["name"]: m["status"] for m in summary["models"]}
    assert status == {"yolo_detector": "ok", "vad_audio": "ok"}, summary["models"]
    logs = {name: (tmp_path / "out" / name / "log.txt").read_text() for name in status}
    assert _dims_used(logs["yolo_detector"])[0] == {"batch": 1, "height": 224, "width": 224}
    assert _dims_used(logs["vad_audio"])[0] == {"batch": 1, "samples": 512}


# ---------------------------------------------------------------- the search itself

def _session(model: onnx.ModelProto):
    return runtime.session(model.SerializeToString())


def _io(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def test_shape_kinds_images_signals_and_look_alikes():
    """NCHW and NHWC images (channels 1 or 3, or two symbolic spatial dims), a float signal's last
    dim; not a transformer's past [batch, heads, past, head_dim], an int64 mask or a float
    sequence with a static last dim."""
    inputs = [_io("nchw", T.FLOAT, ["n", 3, "h", "w"]), _io("nhwc", T.FLOAT, ["n", "y", "x", 1]),
              _io("line", T.FLOAT, ["n", 1, 32, "width"]), _io("past", T.FLOAT, ["n", 4, "past", 16]),
              _io("audio", T.FLOAT, ["n", "samples"]), _io("mask", T.INT64, ["n", "total"]),
              _io("attn_mask", T.FLOAT, ["n", "mlen"]), _io("tokens", T.FLOAT, ["n", "seq", 64])]
    nodes = [h.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [_io(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in inputs]
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs), opset_imports=[h.make_opsetid("", 17)])
    sess = _session(model)
    every = set(runtime.symbolic_dims(sess).values())
    assert runtime.shape_kinds(sess, every) == {
        "h": ("image", "nchw"), "w": ("image", "nchw"), "y": ("image", "nhwc"), "x": ("image", "nhwc"),
        "width": ("image", "line"), "samples": ("signal", "audio")}
    assert runtime.shape_kinds(sess, {"h"}) == {"h": ("image", "nchw")}  # only the open dims


def test_size_trials_order_and_bound():
    """Image sizes come before any odd size, all five before the DIM_CHOICES search; the whole
    search is bounded by SIZE_ROUNDS x (sizes + lengths) + DIM_TRIES assignments."""
    sess = _session(synth_shapes.yolo_detector())
    trials = [values for values, _why in runtime.size_trials(sess, {"batch", "height", "width"})]
    firsts = [(v["height"], v["width"]) for v in trials[:5]]
    assert firsts == [(s, s) for s in runtime.IMAGE_SIZES] and all(v["batch"] == 1 for v in trials[:5])
    assert len(trials) <= runtime.SIZE_ROUNDS * (len(runtime.IMAGE_SIZES) + len(runtime.SIGNAL_LENGTHS)) + runtime.DIM_TRIES
    gpt2_like = {"batch", "seq", "past", "total"}  # no image or signal dims: today's search, unchanged
    before = [v for v in runtime.assignments({d: runtime.DIM_CHOICES for d in gpt2_like}, runtime.DIM_TRIES)
              if any(x != 1 for x in v.values())]
    assert [v for v, _why in runtime.size_trials(sess, gpt2_like)] == before


def test_a_model_that_never_runs_fails_within_the_bound(monkeypatch):
    """An image model that runs at no size (a Reshape to a fixed count): one error naming what was
    tried, after at most 1 + SIZE_ROUNDS x (sizes + lengths) + DIM_TRIES runs."""
    inputs = [_io("images", T.FLOAT, ["batch", 3, "height", "width"]), _io("audio", T.FLOAT, ["batch", "samples"])]
    nodes = [h.make_node("Reshape", ["images", "shape"], ["r"]), h.make_node("Reshape", ["audio", "shape"], ["a"])]
    init = [onnx.numpy_helper.from_array(np.array([7, 11], np.int64), "shape")]
    model = h.make_model(h.make_graph(nodes, "g", inputs, [_io("r", T.FLOAT, None), _io("a", T.FLOAT, None)], init),
                         opset_imports=[h.make_opsetid("", 17)])
    sess = _session(model)
    runs = []
    real_run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda s, feeds, outputs=None: runs.append(1) or real_run(s, feeds, outputs))
    with pytest.raises(BadInputError) as e:
        runtime.run_synthesized(sess, quiet=True)
    assert "image sizes 224-640, signal lengths 2-16384 and up to 64 other sizes" in str(e.value)
    assert len(runs) <= 1 + runtime.SIZE_ROUNDS * (len(runtime.IMAGE_SIZES) + len(runtime.SIGNAL_LENGTHS)) + runtime.DIM_TRIES


def test_shape_given_for_an_image_input_is_kept():
    """--shape images:1x3x64x64 (a size the detector runs on): used as given, no search."""
    sess = _session(synth_shapes.yolo_detector())
    feeds = runtime.synthesize_runnable(sess, {"images": (1, 3, 64, 64)}, quiet=True)
    assert feeds["images"].shape == (1, 3, 64, 64)

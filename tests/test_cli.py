"""The CLI end to end: every reference model, reports, exit codes, in-process and as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from tests.helpers import MODELS, ort_run, sha256

# Symbolic dims made concrete for validation with realistic sizes (others default to 1).
SHAPES = {
    "cnn_dynamic.onnx": ["image:2x3x24x40"],
    "transformer_encoder.onnx": ["tokens:2x7x64"],
    "exporter_opset11.onnx": ["x:3x3x8x8"],
}

# Token-id models (models/transformers.py) run on their committed batch: synthesized ids fall outside the vocabulary.
DATA = {f"{arch}_{exporter}.onnx": MODELS[0].parent / "data" / f"{arch}_inputs.npz"
        for arch in ("bert", "gpt2") for exporter in ("ts", "dynamo")}


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
def test_optimize_every_reference_model(cli, model, tmp_path):
    before = sha256(model)
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    shape_args = [a for s in SHAPES.get(model.name, []) for a in ("--shape", s)]
    shape_args += ["--data", DATA[model.name]] if model.name in DATA else []
    result = cli("optimize", model, "-o", out, "--report", rep, *shape_args)
    assert result.exit_code == 0, result.output
    assert sha256(model) == before, "input modified"
    report = json.loads(rep.read_text())
    assert report["written"] and report["validation"]["ok"]
    for o in report["validation"]["outputs"]:
        assert o["max_abs"] <= 1e-5 + 1e-4 * 10, o  # lossless tolerance, outputs are O(10) at most
    assert report["output"]["nodes"] < report["input"]["nodes"]
    # the weights never grow; merging parallel MatMuls adds a Split and its sizes (a few hundred bytes of protobuf)
    assert report["output"]["file_bytes"] <= report["input"]["file_bytes"] + 512
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    # Interface preserved: output names, dtypes and declared dims.
    a, b = onnx.load(str(model)), onnx.load(str(out))
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert [o.type for o in a.graph.output] == [o.type for o in b.graph.output]
    assert [i.name for i in b.graph.input] == [i.name for i in a.graph.input if i.name not in
                                              {t.name for t in a.graph.initializer}]
    assert a.metadata_props == b.metadata_props


def test_default_pipeline_is_idempotent(cli, tmp_path):
    for model in MODELS:
        once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
        assert cli("optimize", model, "-o", once, "--no-validate").exit_code == 0
        rep = tmp_path / "second.json"
        assert cli("optimize", once, "-o", twice, "--no-validate", "--report", rep).exit_code == 0
        report = json.loads(rep.read_text())
        assert report["iterations"] == 1, (model.name, report["passes"])
        assert all(not p["changed"] for p in report["passes"].values()), (model.name, report["passes"])
        assert report["input"]["nodes"] == report["output"]["nodes"]


def test_markdown_report_and_summary(cli, model_copy, tmp_path):
    model = model_copy("exporter_opset11.onnx")
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    result = cli("optimize", model, "-o", tmp_path / "o.onnx", "--report", md, "--shape", "x:2x3x8x8")
    assert result.exit_code == 0, result.output
    assert cli("optimize", model, "-o", tmp_path / "o2.onnx", "--report", js, "--shape", "x:2x3x8x8").exit_code == 0
    report = json.loads(js.read_text())
    after = report["output"]["nodes"]
    assert after <= 8  # Conv, Relu, Reshape, MatMul/Gemm and the bias arithmetic at most
    assert f"22 -> {after} nodes" in result.output
    text = md.read_text()
    assert md.stat().st_mode & 0o777 == (tmp_path / "o.onnx").stat().st_mode & 0o777  # same as any written file
    assert "| before | 22 |" in text and f"| after | {after} |" in text
    assert "Result: **pass**" in text and "| logits |" in text
    assert "initializer-backed inputs removed: 10" in text
    assert "Reshape shape made constant: 1" in text


def test_user_data_npz(cli, model_copy, tmp_path):
    model = model_copy("cnn_dynamic.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, image=np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32))
    rep = tmp_path / "r.json"
    assert cli("optimize", model, "-o", tmp_path / "o.onnx", "--data", data, "--report", rep).exit_code == 0
    assert json.loads(rep.read_text())["validation"]["outputs"][0]["shape_ref"] == [4, 10]


@pytest.mark.parametrize("arrays, message", [
    ({"wrong": np.zeros((1, 3, 8, 8), np.float32)}, "do not match model inputs"),
    ({"image": np.zeros((1, 3, 8, 8), np.float64)}, "dtype float64"),
    ({"image": np.zeros((3, 8, 8), np.float32)}, "expects rank 4"),
    ({"image": np.full((1, 3, 8, 8), np.nan, np.float32)}, "NaN or Inf"),
])
def test_bad_data_is_exit_2(cli, model_copy, tmp_path, arrays, message):
    model = model_copy("cnn_dynamic.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "--data", data)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_shape_override_errors(cli, model_copy, tmp_path):
    model = model_copy("cnn_dynamic.onnx")
    assert cli("optimize", model, "-o", tmp_path / "o.onnx", "--shape", "image=1x3").exit_code == 1
    result = cli("optimize", model, "-o", tmp_path / "o.onnx", "--shape", "nope:1x3x8x8")
    assert result.exit_code == 2 and "unknown input" in result.stderr
    result = cli("optimize", model, "-o", tmp_path / "o.onnx", "--shape", "image:1x3x8")
    assert result.exit_code == 2 and "rank 3 given" in result.stderr


def test_usage_errors_are_exit_1(cli, model_copy, tmp_path):
    model = model_copy("control_flow.onnx")
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "-p", "cleanup,no-such-pass")
    assert result.exit_code == 1 and "unknown pass 'no-such-pass'" in result.stderr
    result = cli("optimize", model, "-o", out, "-p", "fold-constants{size-limt=3}")
    assert result.exit_code == 1 and "has no option 'size-limt'" in result.stderr
    assert cli("optimize", model).exit_code == 1  # missing -o
    assert cli("optimize", model, "-o", out, "--report", tmp_path / "r.txt").exit_code == 1
    assert cli("no-such-command").exit_code == 1
    assert not out.exists()


def test_output_equal_to_input_needs_in_place(cli, model_copy):
    model = model_copy("control_flow.onnx")
    before = sha256(model)
    result = cli("optimize", model, "-o", model)
    assert result.exit_code == 1 and "--in-place" in result.stderr
    assert sha256(model) == before
    result = cli("optimize", model, "-o", model, "--in-place")
    assert result.exit_code == 0, result.output
    assert sha256(model) != before
    x = np.ones((2, 4), np.float32)
    assert np.allclose(ort_run(model, {"x": x})[0], x + np.array([0.5, 1, 1.5, 2]) + 1.5)
    assert not list(model.parent.glob(".onnxopt-*")), "temporary files left behind"


def test_no_validate_and_unknown_custom_op(cli, tmp_path):
    """An op ORT does not know: validation cannot run (clear exit 2); --no-validate optimizes around it."""
    from onnx import TensorProto as T
    from onnx import helper as h
    nodes = [
        h.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
        h.make_node("Identity", ["x"], ["xi"]),
        h.make_node("MyOp", ["xi", "c"], ["y"], domain="my.custom", alpha=3),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    model = tmp_path / "custom.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("my.custom", 1)]), str(model))
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out)
    assert result.exit_code == 2 and "ONNX Runtime cannot load it" in result.stderr
    assert "MyOp" in result.stderr and not out.exists()
    result = cli("optimize", model, "-o", out, "--no-validate")
    assert result.exit_code == 0 and "validation: skipped" in result.output
    opt = onnx.load(str(out))
    assert [n.op_type for n in opt.graph.node] == ["MyOp"]
    assert opt.graph.node[0].domain == "my.custom" and opt.graph.node[0].attribute[0].i == 3
    assert opt.graph.node[0].input[0] == "x"


def test_inspect_and_passes(cli, tmp_path):
    result = cli("inspect", next(m for m in MODELS if m.name == "control_flow.onnx"))
    assert result.exit_code == 0
    assert "opsets: ai.onnx 13" in result.output
    assert "x: FLOAT [nx4]" in result.output
    assert "If ''.then_branch: 5 nodes" in result.output and "If ''.else_branch: 5 nodes" in result.output
    assert "Loop" in result.output
    result = cli("inspect", "--json", next(m for m in MODELS if m.name == "custom_domain.onnx"))
    info = json.loads(result.output)
    assert info["custom_domains"] == ["com.microsoft"]
    assert info["ops"]["com.microsoft::Gelu"] == 1 and info["parameters"] == 16
    result = cli("passes")
    assert result.exit_code == 0
    for name in ("cleanup", "fold-constants", "dedup"):
        assert name in result.output
    assert "size-limit=1024" in result.output


def test_real_subprocess(tmp_path):
    """The installed console script, as a user runs it."""
    model = next(m for m in MODELS if m.name == "exporter_opset11.onnx")
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(model), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "validation: ok" in proc.stdout and out.exists()
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(tmp_path / "missing.onnx"),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


@pytest.mark.parametrize("model, small, large", [
    ("crnn.onnx", "line:1x1x32x8", "line:3x1x32x80"),
    ("cnn_dynamic.onnx", "image:1x3x8x8", "image:3x3x40x24"),
    ("transformer_encoder.onnx", "tokens:1x2x64", "tokens:3x11x64"),
    ("bert_encoder.onnx", "input_ids:1x2", "input_ids:3x17"),
    ("yolo_head.onnx", "images:1x3x64x64", "images:4x3x64x64"),
])
def test_optimized_dynamic_models_hold_for_other_sizes(cli, tmp_path, model, small, large):
    """Optimizing (and validating) at one size must not bake that size in: symbolic dims stay symbolic."""
    src = next(m for m in MODELS if m.name == model)
    out = tmp_path / "o.onnx"

    def with_mask(spec):  # bert's two inputs share their dims
        return ["--shape", spec] + (["--shape", spec.replace("input_ids", "attention_mask")] if "input_ids" in spec else [])

    result = cli("optimize", src, "-o", out, *with_mask(small))
    assert result.exit_code == 0, result.output
    result = cli("validate", src, out, *with_mask(large))
    assert result.exit_code == 0, result.output

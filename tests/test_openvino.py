"""ONNX Runtime's OpenVINO EP for real: validate across EPs, bench, quantize --ep openvino, convert.

These run where ``onnxruntime-openvino`` is installed (it replaces the ``onnxruntime`` module, so
``.ci/run`` runs them in a second virtualenv: ``pytest -m openvino``); elsewhere they skip with the
reason.  Every model and input is real; nothing about the EP is patched.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from models import tasks

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.openvino,
    pytest.mark.skipif("OpenVINOExecutionProvider" not in ort.get_available_providers(),
                       reason="ONNX Runtime's OpenVINO EP is not installed here (pip install onnxruntime-openvino, "
                              "in its own virtualenv: .ci/run does)"),
]


def test_validate_one_model_across_eps_agrees_within_the_default_tolerance(cli, tmp_path):
    """digits_cnn on the OpenVINO EP against the CPU EP: same outputs within rtol 1e-4 (exit 0), and the
    report names the pair compared."""
    rep = tmp_path / "v.json"
    r = cli("validate", ROOT / "models" / "digits_cnn.onnx", "--ep", "cpu,openvino", "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["b"] is None and list(report["comparison"]["per_ep"]) == ["openvino vs cpu"]
    (out,) = report["comparison"]["per_ep"]["openvino vs cpu"]["outputs"]
    assert out["ok"] and out["cosine"] > 0.999999


def test_validate_across_eps_names_the_first_diverging_node(cli, tmp_path):
    """With a zero tolerance the EPs diverge (OpenVINO's Conv sums in another order: ~1e-7), and the first
    diverging value is the first Conv's output (the graph input itself cannot differ): exit 3, named."""
    src = ROOT / "models" / "digits_cnn.onnx"
    first_conv = next(n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv")
    rep = tmp_path / "v.json"
    r = cli("validate", src, "--ep", "cpu,openvino", "--tol", "0", "--rtol", "0", "--report", rep)
    assert r.exit_code == 3, r.output
    report = json.loads(rep.read_text())
    first = report["layerwise"]["first_divergence"]
    assert report["layerwise"]["eps"] == ["cpu", "openvino"]
    assert first["op_type"] == "Conv" and first["node"] == first_conv and 0 < first["max_abs"] < 1e-4, first
    assert "openvino against cpu" in r.output and first_conv in r.output


def test_validate_and_bench_two_models_on_both_eps(cli, tmp_path):
    """validate A B and bench A B across cpu,openvino: one result per EP, each run for real."""
    src = ROOT / "models" / "digits_cnn.onnx"
    opt = tmp_path / "o.onnx"
    assert cli("optimize", src, "-o", opt, "--no-validate").exit_code == 0
    rep = tmp_path / "v.json"
    r = cli("validate", src, opt, "--ep", "cpu,openvino", "--report", rep)
    assert r.exit_code == 0, r.output
    assert set(json.loads(rep.read_text())["comparison"]["per_ep"]) == {"cpu", "openvino"}
    rep = tmp_path / "b.json"
    r = cli("bench", src, opt, "--ep", "cpu,openvino", "--runs", "20", "--warmup", "3", "--report", rep)
    assert r.exit_code == 0, r.output
    text = rep.read_text()
    assert "openvino" in text and "cpu" in text


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return tasks.write_calibration("digits_cnn", tmp_path_factory.mktemp("calib") / "d", batches=8, batch_size=8)


def test_quantize_for_openvino_is_validated_on_openvino(cli, tmp_path, calib):
    """quantize --ep openvino on the trained digits CNN: written, its latency measured on the OpenVINO
    EP, predictions within the default budget there."""
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = cli("quantize", ROOT / "models" / "digits_cnn.onnx", "-o", out, "--data", calib, "--ep", "openvino",
            "--report", rep)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["ep"] == "openvino"
    assert report["accuracy"]["drop"] <= report["accuracy"]["max_drop"]
    sess = ort.InferenceSession(str(out), providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "OpenVINOExecutionProvider"


def test_converted_fp16_model_runs_on_openvino(cli, tmp_path):
    """convert --fp16 (validated on the CPU EP), then the result against the original on both EPs."""
    src = ROOT / "models" / "digits_cnn.onnx"
    out = tmp_path / "h.onnx"
    r = cli("convert", src, "-o", out, "--fp16")
    assert r.exit_code == 0, r.output
    r = cli("validate", src, out, "--ep", "cpu,openvino", "--metric", "cosine", "--tol", "0.999")
    assert r.exit_code == 0, r.output

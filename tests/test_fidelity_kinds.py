"""Class scores wherever they are (issue 21): a softmax written out in basic ops, LogSoftmax written
out, outputs that are probabilities on the data, raw linear heads, --output-kind, and no class-flip
judgement on synthesized inputs.  Real ORT runs on models built by models/classifiers.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import classifiers
from onnxopt import fidelity


def _data(tmp_path, d: int, n: int = 16, rows: int = 64):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        np.savez(folder / f"b{i}.npz", x=rng.standard_normal((rows, d)).astype(np.float32))
    return folder


@pytest.mark.parametrize("subtract_max, log, opset", [(True, False, 13), (False, False, 13), (True, True, 13),
                                                       (True, False, 18)])
def test_softmax_written_out_is_class_scores(subtract_max, log, opset):
    model = ir.from_proto(classifiers.softmax_written_out(np.random.default_rng(0), subtract_max=subtract_max, log=log,
                                                          opset=opset))
    rule = fidelity.rules(model)["scores"]
    assert (rule.metric, rule.axis, rule.check) == ("top-1", 1, "logsoftmax" if log else "softmax"), rule
    assert "written out" in rule.reason


def test_a_look_alike_is_not_a_softmax():
    """z / sum(exp(z)) is no softmax: its output (renamed so no class word names it) is judged by cosine."""
    proto = classifiers.softmax_written_out(np.random.default_rng(0), subtract_max=False)
    for node in proto.graph.node:
        if node.op_type == "Div":
            node.input[0] = "z"  # z / sum(exp(z)): not normalized
            node.output[0] = "ratio"
    proto.graph.output[0].name = "ratio"
    rule = fidelity.rules(ir.from_proto(proto))["ratio"]
    assert rule.metric == "cosine" and "written out" not in rule.reason


def test_probabilities_on_the_data_are_class_scores():
    """An output the graph does not explain becomes top-1 when the reference rows are non-negative
    and sum to 1; the same graph fed inputs where they do not (a zero row) would stay cosine."""
    proto = classifiers.normalized_by_data(np.random.default_rng(0))
    rules = fidelity.rules(ir.from_proto(proto))
    assert rules["share"].metric == "cosine" and rules["share"].check == "probabilities"
    fid = fidelity.Fidelity(rules)
    ref = np.abs(np.random.default_rng(2).standard_normal((8, 10))).astype(np.float32)
    ref /= ref.sum(-1, keepdims=True)
    fid.add({"share": ref}, {"share": ref[:, ::-1].copy()})
    (res,) = fid.results()
    assert res["metric"] == "top-1" and "probabilities on the data" in res["reason"] and res["score"] < 0.5
    fid = fidelity.Fidelity(rules)
    fid.add({"share": ref - 0.05}, {"share": ref - 0.05})  # negative entries: not probabilities
    assert fid.results()[0]["metric"] == "cosine"


def test_quantize_judges_a_decomposed_softmax_by_top1_and_output_kind_overrides(cli, tmp_path):
    src = tmp_path / "clf.onnx"
    onnx.save(classifiers.softmax_written_out(np.random.default_rng(0)), str(src))
    data = _data(tmp_path, 32)
    rep = tmp_path / "q.json"
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", data, "--no-latency-guard", "--report", rep)
    assert r.exit_code == 0, r.output
    (out,) = json.loads(rep.read_text())["accuracy"]["outputs"]
    assert out["metric"] == "top-1" and "written out" in out["reason"] and out["positions"] >= 4 * 64
    r = cli("quantize", src, "-o", tmp_path / "q2.onnx", "--data", data, "--no-latency-guard", "--output-kind",
            "scores=embedding", "--report", rep)
    assert r.exit_code == 0, r.output
    (out,) = json.loads(rep.read_text())["accuracy"]["outputs"]
    assert out["metric"] == "cosine" and out["reason"] == "declared not class scores"
    r = cli("quantize", src, "-o", tmp_path / "q3.onnx", "--data", data, "--output-kind", "scores=labels")
    assert r.exit_code == 1 and "--output-kind 'scores=labels'" in r.output


def test_a_linear_head_is_judged_as_logits(cli, tmp_path):
    """Keras' raw `predictions` from a MatMul head: top-1 agreement by default (cosine hid flips)."""
    src = tmp_path / "lin.onnx"
    onnx.save(classifiers.linear_head(np.random.default_rng(0)), str(src))
    rep = tmp_path / "q.json"
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", _data(tmp_path, 32), "--no-latency-guard",
            "--report", rep)
    assert r.exit_code == 0, r.output
    (out,) = json.loads(rep.read_text())["accuracy"]["outputs"]
    assert out["metric"] == "top-1" and "linear head" in out["reason"]


def test_without_data_class_flips_on_noise_are_not_judged(cli, tmp_path):
    """Dynamic int8 without --data scores on synthesized inputs: the class output is judged by cosine
    there, said in one warning line recommending --data; with data it is top-1 again."""
    src = tmp_path / "lin.onnx"
    onnx.save(classifiers.linear_head(np.random.default_rng(0), name="logits"), str(src))
    rep = tmp_path / "q.json"
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--mode", "dynamic", "--report", rep)
    assert r.exit_code == 0, r.output
    (out,) = json.loads(rep.read_text())["accuracy"]["outputs"]
    assert out["metric"] == "cosine" and "synthesized" in out["reason"]
    assert "judged by cosine on synthesized inputs" in r.output and "give --data" in r.output
    r = cli("quantize", src, "-o", tmp_path / "q2.onnx", "--mode", "dynamic", "--data", _data(tmp_path, 32),
            "--report", rep)
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["accuracy"]["outputs"][0]["metric"] == "top-1"


def test_too_few_positions_are_judged_by_the_margins_not_a_lucky_sample():
    """16 positions where the candidate happens to flip none: with close top-2 margins and output
    noise of the margins' size the estimate predicts flips and judges by it; with wide margins the
    same noise predicts none and the point estimate stands.  Enough positions certify as before."""
    rng = np.random.default_rng(0)
    rules = {"logits": fidelity.Rule("logits", fidelity.TOP1, "test", 1)}
    ref = rng.standard_normal((16, 10))
    noise = 0.05 * rng.standard_normal((16, 10))
    for spread, expect_estimate in ((0.02, True), (50.0, False)):
        r = ref.copy()
        r[:, 0] = r.max(axis=1) + spread  # the top-1 margin
        got = r + noise
        got[np.arange(16), r.argmax(1)] += 1.0  # the candidate keeps every prediction (a lucky sample)
        fid = fidelity.Fidelity(rules, max_drop=0.01)
        fid.add({"logits": r}, {"logits": got})
        (res,) = fid.results()
        assert res["agreement"] == 1.0
        if expect_estimate:
            assert res["score"] < 0.99 and res["judged_by"].startswith("margin estimate"), res
        else:
            assert res["score"] == 1.0 and res["judged_by"].startswith("point estimate"), res
    assert fidelity.top2_margins(np.zeros((4, 1))).size == 0  # one class: nothing to flip
    assert fidelity.flip_rate(np.zeros(0), 1.0) == 0.0 and fidelity.flip_rate(np.zeros(3), 0.0) == 0.0


def test_the_flip_estimate_takes_margins_from_every_batch():
    """16 held-out positions with wide margins predict no flips; the calibration batches' near-tied
    positions (the reference's margins, which fitting cannot bias) are where the flips come from, and
    with them the estimate falls below the budget.  Same candidate, same noise, both ways."""
    rng = np.random.default_rng(1)
    rules = {"logits": fidelity.Rule("logits", fidelity.TOP1, "test", 1)}
    ref = rng.standard_normal((16, 10))
    ref[:, 0] = ref.max(axis=1) + 1.0
    got = ref + 0.02 * rng.standard_normal((16, 10))
    tied = rng.uniform(0.0, 0.02, 200)  # the other positions' top-2 margins
    scores = []
    for extra in (None, {"logits": tied}):
        fid = fidelity.Fidelity(rules, max_drop=0.01, margins=extra)
        fid.add({"logits": ref}, {"logits": got})
        (res,) = fid.results()
        assert res["agreement"] == 1.0
        scores.append(res["score"])
    assert scores[0] > 0.99 and scores[1] < 0.99, scores
    sigma = float(np.sqrt(((got - ref) ** 2).mean()))
    margins = np.concatenate([fidelity.top2_margins(ref), tied])
    assert scores[1] == pytest.approx(1.0 - fidelity.flip_rate(margins, sigma), abs=1e-9)


def test_a_linear_head_counts_its_values_too_and_declarations_are_checked():
    """A presumed-logits linear head whose argmax survives while its other values are replaced is
    judged by its cosine (the lower score); --output-kind naming no output is a usage error, and an
    integer output stays exact whatever is declared."""
    from onnxopt.errors import UsageError

    model = ir.from_proto(classifiers.linear_head(np.random.default_rng(0), name="y", classes=8))
    rules = fidelity.rules(model)
    assert rules["y"].check == "logits"
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4096, 8))
    ref[:, 0] = 6.0
    got = rng.standard_normal((4096, 8))
    got[:, 0] = 6.0  # the same argmax everywhere, every other value new
    fid = fidelity.Fidelity(rules, max_drop=0.01)
    fid.add({"y": ref}, {"y": got})
    (res,) = fid.results()
    assert res["agreement"] == 1.0 and res["score"] == pytest.approx(res["cosine"]) and res["score"] < 0.95
    with pytest.raises(UsageError, match="not an output"):
        fidelity.rules(model, {"yy": None})
    labels = ir.from_proto(classifiers.linear_head(np.random.default_rng(0), name="y"))
    labels.graph.outputs[0].dtype = ir.DataType.INT64
    assert fidelity.rules(labels, {"y": -1})["y"].metric == "exact"


def test_witness_batches_show_what_the_held_out_ones_missed():
    """A candidate that differs from the float model only on negative inputs (Relu against
    Identity): the held-out batch is all positive and shows nothing; the calibration batch the
    teacher keeps as a witness shows the change, and the lower score is the one judged (and said)."""
    import onnx_ir as ir
    from onnx import TensorProto as T
    from onnx import helper as h

    from onnxopt.teacher import Teacher

    def model(op):
        g = h.make_graph([h.make_node(op, ["x"], ["emb"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 8])],
                         [h.make_tensor_value_info("emb", T.FLOAT, [4, 8])])
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)

    rng = np.random.default_rng(0)
    positive = {"x": np.abs(rng.standard_normal((4, 8))).astype(np.float32) + 0.1}
    mixed = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    float_model, candidate = model("Identity"), model("Relu").SerializeToString()
    scores = []
    for witness in ([], [mixed]):
        t = Teacher(ir.from_proto(float_model), float_model.SerializeToString(), [positive], ep="cpu", threads=1,
                    metric=None, metric_name=None, max_drop=0.01)
        t.learn_from(witness)
        scores.append(t.score(candidate))
        judged = t.last_results[0]["judged_by"] or ""
        assert ("calibration batches" in judged) == bool(witness), judged
    assert scores[0] == 1.0 and scores[1] < 0.9, scores


def test_raw_logits_count_their_values_where_top1_cannot_be_certified():
    """An output named 'logits' made by a MatMul head: judged by top-1 agreement; where the held-out
    positions are too few to certify the budget, its cosine counts too (a candidate that keeps every
    arg-max of 32 confident positions while its logits move scores that cosine, ~0.9); with enough
    positions the 95% lower bound of top-1 certifies alone."""
    import onnx_ir as ir
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["logits"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 8])], [h.make_tensor_value_info("logits", T.FLOAT, ["n", 10])],
                     [nh.from_array(np.ones((8, 10), np.float32), "w")])
    (rule,) = fidelity.rules(ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))).values()
    assert rule.metric == fidelity.TOP1 and rule.check == "raw" and "linear head" in rule.reason
    rng = np.random.default_rng(0)
    scores = {}
    for n in (32, 1024):
        ref = rng.standard_normal((n, 10))
        top = rng.integers(0, 10, n)
        ref[np.arange(n), top] += 20.0  # confident
        got = ref + 2.0 * rng.standard_normal((n, 10))
        got[np.arange(n), top] = ref[np.arange(n), top] - 5.0  # every arg-max kept (15 vs < 10), the values moved
        fid = fidelity.Fidelity({"logits": rule}, max_drop=0.01)
        fid.add({"logits": ref}, {"logits": got})
        (res,) = fid.results()
        assert res["agreement"] == 1.0
        scores[n] = (res["score"], res["judged_by"], res["cosine"])
    assert scores[32][0] == pytest.approx(scores[32][2]) and scores[32][0] < 0.99 and "cosine" in scores[32][1]
    assert scores[1024][1] == "95% lower bound" and scores[1024][0] > 0.99

"""Models where fp16 matters to the prediction budget (``convert --fp16``, issue 21), with their data.

- :func:`written_softmax_classifier`: a tf2onnx-style classifier (softmax written as ReduceMax / Sub /
  Exp / ReduceSum / Div, ``models.classifiers.softmax_written_out``) whose logits reach a few tens:
  fp16 rounds them by up to ~0.03, which moves some probabilities beyond rtol 1e-2 / atol 1e-3
  while the predicted classes (clustered data, clear margins) stay.
- :func:`cancelling_classifier`: a hidden layer shifted by a large offset and shifted back
  (``h + 1500 - 1500``, as a folded normalization or an exporter's re-centering writes it): in
  fp16 the spacing at 1500 is 1, so the hidden values are rounded to integers and predictions
  change; in float32 the two nodes ``offset``/``unoffset`` are exact enough.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models.classifiers import softmax_written_out

OFFSET = 1500.0


def written_softmax_classifier(rng: np.random.Generator, *, d: int = 32, classes: int = 214,
                               scale: float = 12.0) -> onnx.ModelProto:
    """``softmax_written_out`` with an identity hidden layer and a head of unit class vectors times
    ``scale``: on :func:`margin_rows` the logits reach a few tens."""
    model = softmax_written_out(rng, d=d, classes=classes)
    w2 = rng.standard_normal((d, classes))
    w2 = (scale * w2 / np.linalg.norm(w2, axis=0)).astype(np.float32)
    new = {"w1": np.eye(d, dtype=np.float32), "w2": w2, "b2": np.zeros(classes, np.float32)}
    for i, t in enumerate(model.graph.initializer):
        if t.name in new:
            model.graph.initializer[i].CopyFrom(nh.from_array(new[t.name], t.name))
    return model


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The logits of :func:`written_softmax_classifier` in float64 (numpy)."""
    w = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return np.maximum(x.astype(np.float64) @ w["w1"], 0) @ w["w2"] + w["b2"]


def margin_rows(rng: np.random.Generator, model: onnx.ModelProto, rows: int, margin: float = 0.5,
                d: int = 32) -> np.ndarray:
    """``rows`` inputs (|N(0, 1)|) whose top-2 logit margin is at least ``margin``: data with
    predictions, whose probabilities are often moderate (0.3-0.7)."""
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < rows:
        x = np.abs(rng.standard_normal((4 * rows, d))).astype(np.float32)
        top = np.sort(logits(model, x), axis=1)
        out.append(x[top[:, -1] - top[:, -2] >= margin])
    return np.concatenate(out)[:rows]


def cancelling_classifier(rng: np.random.Generator, *, d: int = 16, hidden: int = 32,
                          classes: int = 10) -> onnx.ModelProto:
    """x -> MatMul (``embed``) -> Add 1500 (``offset``) -> Sub 1500 (``unoffset``) -> Relu ->
    MatMul + bias (``head``) -> Softmax: exact in float32, hidden values rounded to integers in fp16."""
    w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) * 2).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    inits = [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(b2, "b2"),
             nh.from_array(np.array(OFFSET, np.float32), "big")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["e"], name="embed"),
             h.make_node("Add", ["e", "big"], ["shifted"], name="offset"),
             h.make_node("Sub", ["shifted", "big"], ["back"], name="unoffset"),
             h.make_node("Relu", ["back"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["z0"], name="head"),
             h.make_node("Add", ["z0", "b2"], ["z"], name="bias"),
             h.make_node("Softmax", ["z"], ["probs"], axis=-1, name="softmax")]
    graph = h.make_graph(nodes, "cancelling", [h.make_tensor_value_info("x", T.FLOAT, ["n", d])],
                         [h.make_tensor_value_info("probs", T.FLOAT, ["n", classes])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def save_batches(folder: Path, arrays: list[np.ndarray], name: str = "x") -> Path:
    """One .npz per batch (``folder/b000.npz`` ...), the layout ``--data FOLDER`` reads in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.savez(folder / f"b{i:03d}.npz", **{name: a})
    return folder

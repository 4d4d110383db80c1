"""Least-squares refit of a layer on calibration activations, the fp32 model as the teacher.

For a Conv (2-D, any stride/pad/dilation, group 1), Gemm (transA 0) or MatMul with a constant
weight, the layer's input ``X`` is read from the *student* (the pruned model as it is now) and
its output ``Y`` from the *teacher* (the fp32 model), on the same calibration batches.  The new
weight and bias minimize ``|X W + b - Y|^2 + lam |W|^2`` (ridge, bias not regularized,
``lam = ridge x mean diagonal of X^T X``), in closed form.  Statistics are streamed: per batch
only ``X^T X`` ([d+1]^2) and ``X^T Y`` ([d+1] x out) are accumulated (d = input channels x kernel
size; at most ``ROWS_PER_BATCH`` rows are sampled from each batch's positions), so memory is
flat in the number of batches.  With a ``mask`` (unstructured pruning) each output channel is
refit on its surviving inputs only (zeros stay zero).
Conv im2col column order matches the ONNX weight layout ``[out, in, kh, kw]``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt import im2col, runtime
from onnxopt.base import add_initializer, graph_of, name_of, node_name, present, tensor_of

logger = logging.getLogger("onnxopt")
ROWS_PER_BATCH = 4096
RIDGE = 1e-3


def supports(node: ir.Node) -> str | None:
    """None when the layer can be refit, else why not."""
    if node.op_type == "Conv":
        w = present(node.inputs[1]).const_value  # a Conv has its weight input
        if w is None or len(w.shape) != 4:
            return "only 2-D Conv is refit"
        a = node.attributes.get("auto_pad")
        if a is not None and a.as_string() not in ("NOTSET", ""):
            return "Conv with auto_pad is not refit"
        if node.attributes.get("group") is not None and node.attributes["group"].as_int() != 1:
            return "grouped Conv is not refit"
        return None
    if node.op_type == "Gemm":
        a = node.attributes.get("transA")
        return "Gemm with transA is not refit" if a is not None and a.as_int() else None
    if node.op_type == "MatMul":
        return None
    return f"{node.op_type} is not refit"


def rows(node: ir.Node, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(sampled rows of the layer's input matrix, the flat output positions they belong to)."""
    if node.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        pick = np.arange(len(flat)) if len(flat) <= ROWS_PER_BATCH else np.sort(rng.choice(len(flat), ROWS_PER_BATCH, False))
        return flat[pick].astype(np.float64), pick
    kh, kw = (int(d) for d in tensor_of(node.inputs[1]).shape.numpy()[2:])
    win = im2col.windows(x, node, (kh, kw))
    total = win.shape[0] * win.shape[2] * win.shape[3]
    pick = np.arange(total) if total <= ROWS_PER_BATCH else np.sort(rng.choice(total, ROWS_PER_BATCH, False))
    return im2col.rows(win, pick).astype(np.float64), pick


def targets(node: ir.Node, y: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The teacher outputs at the sampled positions, [R, out]."""
    if node.op_type == "Conv":
        flat = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    else:
        flat = y.reshape(-1, y.shape[-1])
    return flat[pick].astype(np.float64)


@dataclasses.dataclass
class Stats:
    xtx: np.ndarray
    xty: np.ndarray
    rows: int = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
        self.xtx += x1.T @ x1
        self.xty += x1.T @ y
        self.rows += len(x)


def weight_matrix(node: ir.Node) -> np.ndarray:
    """The weight as [d, out] (rows in the im2col order)."""
    w = tensor_of(node.inputs[1]).numpy()
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].as_int():
        return w.T
    return w


def solve(stats: Stats, mask: np.ndarray | None, ridge: float = RIDGE, with_bias: bool = True) -> np.ndarray:
    """[d+1, out] weights (last row: bias) minimizing the ridge objective; with ``mask`` ([d, out]
    bool) each column uses only its unmasked rows (the others stay 0)."""
    d = stats.xtx.shape[0] - 1
    lam = ridge * max(float(np.mean(np.diag(stats.xtx)[:d])), 1e-12)
    reg = np.diag(np.r_[np.full(d, lam), 0.0 if with_bias else 1e12])
    a = stats.xtx + reg
    if mask is None:
        return np.linalg.solve(a, stats.xty)
    out = np.zeros_like(stats.xty)
    for o in range(stats.xty.shape[1]):
        keep = np.r_[np.flatnonzero(mask[:, o]), d]
        out[keep, o] = np.linalg.solve(a[np.ix_(keep, keep)], stats.xty[keep, o])
    return out


def apply(node: ir.Node, solution: np.ndarray, teacher_has_bias: bool) -> None:
    """Write the solved weight (and bias) into ``node`` (dtype kept; a bias input is added to a
    Conv/Gemm that had none when the solution needs one)."""
    w = present(node.inputs[1])  # supports() checked the layer's weight
    old = tensor_of(w).numpy()
    mat, bias = solution[:-1], solution[-1]
    if node.op_type == "Conv":
        new = mat.T.reshape(old.shape)
    elif node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].as_int():
        new = mat.T
    else:
        new = mat
    w.const_value = ir.tensor(np.ascontiguousarray(new.astype(old.dtype)), name=w.name)
    if node.op_type == "MatMul":
        return
    bias = bias.astype(old.dtype)
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None:
        b = node.inputs[2]
        if tensor_of(b).size == bias.size and len(b.uses()) == 1:
            b.const_value = ir.tensor(bias.reshape(tensor_of(b).shape), name=b.name)
            return
    if len(node.inputs) == 2 and (teacher_has_bias or np.any(bias)):
        if node.op_type == "Gemm" and node.attributes.get("beta") is not None and node.attributes["beta"].as_float() != 1.0:
            return
        node.resize_inputs(3)
        node.replace_input_with(2, add_initializer(graph_of(node), f"{w.name}_bias", bias))


def refit(student: ir.Model, teacher_bytes: bytes, layers: Iterable[str], batches: Iterable[Mapping[str, np.ndarray]],
          out_index: Mapping[str, np.ndarray] | None = None, masks: Mapping[str, np.ndarray] | None = None,
          ridge: float = RIDGE, threads: int = 1, seed: int = 0) -> dict[str, str]:
    """Refit the named layers of ``student`` (in place) together from one streamed pass over
    ``batches``; ``out_index[layer]``: which of the teacher's output channels the student layer
    still has (structured pruning); ``masks[layer]``: [d, out] bool support (unstructured).
    Returns layer -> "refit on N rows" or why it was not."""
    nodes = {n.name: n for n in student.graph}
    todo: list[ir.Node] = []
    notes: dict[str, str] = {}
    for name in layers:
        node = nodes.get(name)
        why = "not in the model" if node is None else supports(node)
        if why:
            notes[name] = why
        else:
            todo.append(present(node))  # not None: why is set for a missing node
    if not todo:
        return notes
    ins = [name_of(n.inputs[0]) for n in todo]
    outs = [name_of(n.outputs[0]) for n in todo]
    s_sess = runtime.session(runtime.with_outputs(ir.to_proto(student), ins), "cpu", threads)
    t_sess = runtime.session(_teacher_with(teacher_bytes, outs), "cpu", threads)
    stats: dict[str, Stats] = {}
    rng = np.random.default_rng(seed)
    for feeds in batches:
        xs = runtime.run_candidate(s_sess, feeds, ins)
        ys = runtime.run_candidate(t_sess, feeds, outs)
        for node in todo:
            x, pick = rows(node, xs[name_of(node.inputs[0])], rng)
            y = targets(node, ys[name_of(node.outputs[0])], pick)
            if out_index and node_name(node) in out_index:
                y = y[:, out_index[node_name(node)]]
            st = stats.setdefault(node_name(node), Stats(np.zeros((x.shape[1] + 1,) * 2), np.zeros((x.shape[1] + 1, y.shape[1]))))
            st.add(x, y)
    for node in todo:
        found = stats.get(node_name(node))
        if found is None:
            notes[node_name(node)] = "no calibration rows"
            continue
        with_bias = node.op_type != "MatMul"
        mask = masks.get(node_name(node)) if masks else None
        apply(node, solve(found, mask, ridge, with_bias), with_bias)
        notes[node_name(node)] = f"refit on {found.rows} rows"
    return notes


def _teacher_with(teacher_bytes: bytes, names: list[str]) -> bytes:
    import onnx

    return runtime.with_outputs(onnx.load_from_string(teacher_bytes), names)

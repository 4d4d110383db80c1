"""Least-squares refit of a layer on calibration activations, the fp32 model as the teacher.

For a Conv (2-D, any stride/pad/dilation, group 1), Gemm (transA 0) or MatMul with a constant
weight, the layer's input ``X`` is read from the *student* (the pruned model as it is now) and
its output ``Y`` from the *teacher* (the fp32 model), on the same calibration batches.  The new
weight and bias minimize ``|X W + b - Y|^2 + lam |W - W0|^2`` (ridge toward the layer's current
weight ``W0``, bias not regularized), in closed form, with ``lam = alpha x mean diagonal of X^T X``
and ``alpha = ridge + (d / rows)^2`` (:func:`strength`): negligible with many rows per weight, and
with fewer rows than the fan-in ``d`` the fit stays near ``W0`` instead of fitting noise.
Statistics are streamed: per batch only ``X^T X`` ([d+1]^2) and ``X^T Y`` ([d+1] x out) are
accumulated (d = input channels x kernel size), so memory is flat in the number of batches.  Rows
wanted per layer: ``ROWS_PER_INPUT x (d + 1)``, at most ``MAX_ROWS`` (:func:`wanted_rows`); from
each batch at most ``max(ROWS_PER_BATCH, wanted / batches)`` positions are sampled (every position
when a batch has fewer), taken in chunks of ``CHUNK`` rows.  With a ``mask`` (unstructured
pruning) each output channel is refit on its surviving inputs only (zeros stay zero).
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
#: rows wanted per fan-in entry (+1 for the bias), and at most this many in all
ROWS_PER_INPUT, MAX_ROWS = 8, 65536
#: rows turned into X^T X at once (bounds the im2col copy)
CHUNK = 4096
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


def wanted_rows(fan_in: int) -> int:
    """Rows a refit of a layer with ``fan_in`` inputs per output wants (all batches together)."""
    return min(MAX_ROWS, ROWS_PER_INPUT * (fan_in + 1))


def strength(fan_in: int, rows: int, ridge: float = RIDGE) -> float:
    """alpha of the ridge toward the current weight (module docstring): ``ridge + (fan_in / rows)^2``."""
    return ridge + (fan_in / max(rows, 1)) ** 2


def positions(node: ir.Node, x: np.ndarray, rng: np.random.Generator, limit: int = ROWS_PER_BATCH) -> np.ndarray:
    """The flat output positions (sorted) whose rows are taken from input ``x``: all of them, or
    ``limit`` sampled without replacement."""
    if node.op_type != "Conv":
        total = int(np.prod(x.shape[:-1]))
    else:
        kh, kw = (int(d) for d in tensor_of(node.inputs[1]).shape.numpy()[2:])
        win = im2col.windows(x[:1, :1], node, (kh, kw))
        total = x.shape[0] * win.shape[2] * win.shape[3]
    return np.arange(total) if total <= limit else np.sort(rng.choice(total, limit, False))


def rows_at(node: ir.Node, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The layer's input rows at flat output positions ``pick``, float64 [R, d]."""
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])[pick].astype(np.float64)
    kh, kw = (int(d) for d in tensor_of(node.inputs[1]).shape.numpy()[2:])
    return im2col.rows(im2col.windows(x, node, (kh, kw)), pick).astype(np.float64)


def rows(node: ir.Node, x: np.ndarray, rng: np.random.Generator, limit: int = ROWS_PER_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(sampled rows of the layer's input matrix, the flat output positions they belong to)."""
    pick = positions(node, x, rng, limit)
    return rows_at(node, x, pick), pick


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


def solve(stats: Stats, mask: np.ndarray | None, ridge: float = RIDGE, with_bias: bool = True,
          prior: np.ndarray | None = None) -> np.ndarray:
    """[d+1, out] weights (last row: bias) minimizing the ridge objective (toward ``prior``, [d, out],
    else toward 0; strength from the rows, :func:`strength`); with ``mask`` ([d, out] bool) each
    column uses only its unmasked rows (the others stay 0)."""
    d = stats.xtx.shape[0] - 1
    lam = strength(d, stats.rows, ridge) * max(float(np.mean(np.diag(stats.xtx)[:d])), 1e-12)
    reg = np.diag(np.r_[np.full(d, lam), 0.0 if with_bias else 1e12])
    a = stats.xtx + reg
    b = stats.xty.copy()
    if prior is not None:
        b[:d] += lam * prior
    if mask is None:
        return np.linalg.solve(a, b)
    out = np.zeros_like(b)
    for o in range(b.shape[1]):
        keep = np.r_[np.flatnonzero(mask[:, o]), d]
        out[keep, o] = np.linalg.solve(a[np.ix_(keep, keep)], b[keep, o])
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
          ridge: float = RIDGE, threads: int = 1, seed: int = 0, batch_count: int | None = None,
          used: dict[str, int] | None = None) -> dict[str, str]:
    """Refit the named layers of ``student`` (in place) together from one streamed pass over
    ``batches`` (``batch_count`` of them when known: the rows a layer wants are spread over them);
    ``out_index[layer]``: which of the teacher's output channels the student layer still has
    (structured pruning); ``masks[layer]``: [d, out] bool support (unstructured).  Returns layer ->
    "refit on N rows" or why it was not; ``used[layer]``: the rows each refit used."""
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
    stats = _accumulate(student, teacher_bytes, todo, batches, out_index, threads, seed, batch_count)
    for node in todo:
        found = stats.get(node_name(node))
        if found is None or not found.rows:
            notes[node_name(node)] = "no calibration rows"
            continue
        with_bias = node.op_type != "MatMul"
        mask = masks.get(node_name(node)) if masks else None
        prior = weight_matrix(node).astype(np.float64)
        apply(node, solve(found, mask, ridge, with_bias, prior), with_bias)
        d = found.xtx.shape[0] - 1
        few = f" (fewer than the {wanted_rows(d)} wanted: ridge {strength(d, found.rows, ridge):.3g} toward the pruned weights)"
        notes[node_name(node)] = f"refit on {found.rows} rows" + (few if found.rows < wanted_rows(d) else "")
        if used is not None:
            used[node_name(node)] = found.rows
    return notes


def _accumulate(student: ir.Model, teacher_bytes: bytes, todo: list[ir.Node], batches: Iterable[Mapping[str, np.ndarray]],
                out_index: Mapping[str, np.ndarray] | None, threads: int, seed: int,
                batch_count: int | None) -> dict[str, Stats]:
    """Per layer of ``todo``: X^T X and X^T Y over the batches (X from the student, Y from the teacher)."""
    ins = [name_of(n.inputs[0]) for n in todo]
    outs = [name_of(n.outputs[0]) for n in todo]
    s_sess = runtime.session(runtime.with_outputs(ir.to_proto(student), ins), "cpu", threads)
    t_sess = runtime.session(_teacher_with(teacher_bytes, outs), "cpu", threads)
    stats: dict[str, Stats] = {}
    fan_in = {node_name(n): int(weight_matrix(n).shape[0]) for n in todo}
    rng = np.random.default_rng(seed)
    for feeds in batches:
        xs = runtime.run_candidate(s_sess, feeds, ins)
        ys = runtime.run_candidate(t_sess, feeds, outs)
        for node in todo:
            x_all = xs[name_of(node.inputs[0])]
            d = fan_in[node_name(node)]
            limit = max(ROWS_PER_BATCH, -(-wanted_rows(d) // max(batch_count or 1, 1)))
            pick = positions(node, x_all, rng, limit)
            y_all = ys[name_of(node.outputs[0])]
            for start in range(0, len(pick), CHUNK):
                part = pick[start:start + CHUNK]
                y = targets(node, y_all, part)
                if out_index and node_name(node) in out_index:
                    y = y[:, out_index[node_name(node)]]
                st = stats.setdefault(node_name(node), Stats(np.zeros((d + 1,) * 2), np.zeros((d + 1, y.shape[1]))))
                st.add(rows_at(node, x_all, part), y)
    return stats


def _teacher_with(teacher_bytes: bytes, names: list[str]) -> bytes:
    import onnx

    return runtime.with_outputs(onnx.load_from_string(teacher_bytes), names)

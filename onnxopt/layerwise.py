"""Layerwise comparison: where inside the graph do two models start to disagree?

Intermediate tensors of A (reference) and B (candidate) are paired (1) by name, for values both
graphs compute (onnxopt passes keep the names of the values they keep), then (2) by structure for
renamed values: a B node whose op, domain and attributes equal an A node's and whose inputs are
already paired (graph inputs by name, initializers by content) pairs its outputs with that node's.
The paired values are exposed as extra graph outputs (in chunks, to bound memory), both models
run on the same inputs, and each pair is compared with the chosen tolerance.  The *first
divergence* is the first failing value in B's topological order: its producer is the first node
whose output is wrong while every paired input is still right - the op (or the pass) that broke
the model.  Cost: 2 x ceil(pairs / chunk) model runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt import validation as validate
from onnxopt.errors import BadInputError


@dataclasses.dataclass
class LayerResult:
    index: int  # position of the producing node in B
    value_a: str
    value_b: str
    node: str
    op_type: str
    matched_by: str  # "name" or "structure"
    ok: bool
    max_abs: float
    max_rel: float
    cosine: float | None
    reason: str = ""


@dataclasses.dataclass
class Layerwise:
    pairs: int
    values_in_b: int
    layers: list[LayerResult]

    @property
    def first_divergence(self) -> LayerResult | None:
        return next((r for r in self.layers if not r.ok), None)

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {"pairs": self.pairs, "values_in_b": self.values_in_b,
                "first_divergence": dataclasses.asdict(first) if first else None,
                "layers": [dataclasses.asdict(r) for r in self.layers]}


def _load(path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))  # external data is loaded: layerwise runs from memory
    except Exception as e:  # noqa: BLE001
        raise BadInputError(f"{path}: cannot load for layerwise comparison ({e})") from None
    if model.ByteSize() > 2_000_000_000:
        raise BadInputError(f"{path}: layerwise comparison needs a model under 2 GB")
    return model


def _attr_key(node: onnx.NodeProto) -> tuple:
    return tuple(sorted(a.SerializeToString() for a in node.attribute))


def _tensor_key(t: onnx.TensorProto) -> tuple:
    return (t.data_type, tuple(t.dims), hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())


def match_values(a: onnx.ModelProto, b: onnx.ModelProto) -> list[tuple[str, str, int, str, str, str]]:
    """(value in A, value in B, node index in B, node name in B, op type, how) in B's order."""
    produced_a = {o for n in a.graph.node for o in n.output if o}
    outputs_a = {o.name for o in a.graph.output}
    a2 = {i.name: i.name for i in a.graph.input}
    b2a: dict[str, str] = {i.name: i.name for i in b.graph.input if i.name in a2}
    by_content = {_tensor_key(t): t.name for t in a.graph.initializer}
    for t in b.graph.initializer:
        name = by_content.get(_tensor_key(t))
        if name is not None:
            b2a[t.name] = name
    index_a: dict[tuple, onnx.NodeProto] = {}
    for n in a.graph.node:
        index_a.setdefault((n.domain, n.op_type, tuple(n.input), _attr_key(n)), n)
    pairs, seen = [], set()
    for i, n in enumerate(b.graph.node):
        mapped = tuple(b2a.get(x) if x else "" for x in n.input)
        twin = index_a.get((n.domain, n.op_type, mapped, _attr_key(n))) if None not in mapped else None
        for k, out in enumerate(n.output):
            if not out:
                continue
            if out in produced_a or out in outputs_a:
                b2a[out] = out
                how = "name"
            elif twin is not None and k < len(twin.output) and twin.output[k]:
                b2a[out] = twin.output[k]
                how = "structure"
            else:
                continue
            if b2a[out] not in seen:
                seen.add(b2a[out])
                pairs.append((b2a[out], out, i, n.name, n.op_type, how))
    return pairs


def compare_layers(a_path, b_path, feeds: Mapping[str, np.ndarray],
                   tolerance: validate.Tolerance = validate.LOSSLESS, ep: str = "cpu",
                   chunk: int = 256, progress=None, ep_b: str | None = None) -> Layerwise:
    """Intermediate values of A and B (paired by :func:`match_values`) at ``feeds``, A on ``ep`` and B
    on ``ep_b`` (default the same EP: A against itself on two EPs finds where the EPs diverge)."""
    a, b = _load(a_path), _load(b_path)
    pairs = match_values(a, b)
    results: list[LayerResult] = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        sa = runtime.session(runtime.with_outputs(a, [p[0] for p in part]), ep)
        sb = runtime.session(runtime.with_outputs(b, [p[1] for p in part]), ep_b or ep)
        ra = runtime.run(sa, feeds, [p[0] for p in part])
        rb = runtime.run_candidate(sb, feeds, [p[1] for p in part])
        for value_a, value_b, index, node, op, how in part:
            x, y = ra.get(value_a), rb.get(value_b)
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                continue
            c = validate.compare_arrays(value_b, x, y, tolerance)
            results.append(LayerResult(index, value_a, value_b, node, op, how, c.ok, c.max_abs, c.max_rel,
                                       c.cosine, c.reason))
        if progress:
            progress(len(part))
    results.sort(key=lambda r: r.index)
    values_in_b = sum(1 for n in b.graph.node for o in n.output if o)
    return Layerwise(len(pairs), values_in_b, results)

"""prune-magnitude: zero the smallest-magnitude weights of Conv/Gemm/MatMul layers."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.base import OptPass, is_constant, is_standard, tensor_of

LAYER_OPS = ("Conv", "Gemm", "MatMul")
SCOPES = ("global", "layer")


@dataclasses.dataclass
class Layer:
    """A prunable layer: the node and its weight (a float initializer used by this node only)."""

    node: ir.Node
    weight: ir.Value

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"


def layers(model: ir.Model) -> tuple[list[Layer], collections.Counter]:
    """Conv/Gemm/MatMul nodes of the main graph whose weight (input 1) is a constant float tensor
    of rank >= 2 used by that node alone, in graph order; and the declined ones by reason."""
    found: list[Layer] = []
    skipped: collections.Counter = collections.Counter()
    for node in model.graph:
        if node.op_type not in LAYER_OPS or not is_standard(node) or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not is_constant(w):
            skipped[f"{node.op_type}: weight is not a constant initializer"] += 1
        elif tensor_of(w).dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            skipped[f"{node.op_type}: weight is not float"] += 1
        elif len(tensor_of(w).shape) < 2:
            skipped[f"{node.op_type}: weight of rank < 2"] += 1
        elif len(w.uses()) != 1:
            skipped[f"{node.op_type}: weight shared with another node"] += 1
        else:
            found.append(Layer(node, w))
    return found, skipped


def set_weight(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's content (same name, dtype and shape unless ``array`` changes it)."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def selected(all_layers: list[Layer], exclude: Iterable[str] = (), skip_ends: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """The layers to prune, and the others with why (first/last layer, ``exclude``)."""
    excluded = set(exclude)
    why: dict[str, str] = {}
    for i, layer in enumerate(all_layers):
        if layer.name in excluded or layer.weight.name in excluded:
            why[layer.name] = "excluded"
        elif skip_ends and i == 0:
            why[layer.name] = "first layer (kept dense by default)"
        elif skip_ends and i == len(all_layers) - 1:
            why[layer.name] = "last layer (kept dense by default)"
    return [la for la in all_layers if la.name not in why], why


def _zero_smallest(w: np.ndarray, k: int) -> np.ndarray:
    """``w`` with its ``k`` smallest-magnitude entries zeroed (entries already zero count first)."""
    flat = w.reshape(-1).copy()
    if k > 0:
        flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return flat.reshape(w.shape)


def global_threshold(weights: list[np.ndarray], sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all entries of ``weights`` lie (the k-th smallest)."""
    mags = np.concatenate([np.abs(w).reshape(-1) for w in weights])
    k = int(round(sparsity * mags.size))
    if k == 0:
        return 0.0
    return float(np.partition(mags, k - 1)[k - 1])


def prune(model: ir.Model, *, sparsity: float | None = None, threshold: float | None = None, scope: str = "global",
          exclude: Iterable[str] = (), skip_ends: bool = True) -> tuple[list[dict], dict[str, str]]:
    """Prune in place; returns per-layer records (``layer``, ``op``, ``params``, ``zeros``,
    ``sparsity``, ``pruned``) and the layers left dense with why."""
    all_layers, _ = layers(model)
    chosen, why = selected(all_layers, exclude, skip_ends)
    arrays = {la.name: tensor_of(la.weight).numpy() for la in chosen}
    if threshold is None and scope == "global" and chosen:
        threshold = global_threshold(list(arrays.values()), float(sparsity or 0.0))
        cut = "<="  # the k-th smallest is pruned too (ties at the threshold: all of them)
    else:
        cut = "<"
    records: list[dict[str, Any]] = []
    for la in all_layers:
        w = arrays.get(la.name)
        if w is None:
            w0 = tensor_of(la.weight).numpy()
            records.append({"layer": la.name, "op": la.node.op_type, "params": int(w0.size),
                            "zeros": int(np.count_nonzero(w0 == 0)), "pruned": False, "why": why.get(la.name, "")})
            continue
        if threshold is not None:
            mask = np.abs(w) <= threshold if cut == "<=" and threshold > 0 else np.abs(w) < threshold
            new = np.where(mask, np.zeros_like(w), w)
        else:
            new = _zero_smallest(w, int(round(float(sparsity or 0.0) * w.size)))
        new_zeros = int(np.count_nonzero(new == 0)) - int(np.count_nonzero(w == 0))
        if new_zeros:
            set_weight(la.weight, new.astype(w.dtype))
        records.append({"layer": la.name, "op": la.node.op_type, "params": int(w.size),
                        "zeros": int(np.count_nonzero(new == 0)), "new_zeros": new_zeros, "pruned": True, "why": ""})
    for r in records:
        r["sparsity"] = r["zeros"] / r["params"] if r["params"] else 0.0
    return records, why


class PruneMagnitude(OptPass):
    """Zero the smallest-magnitude weights of Conv/Gemm/MatMul layers (unstructured, lossy).

    ``sparsity`` (fraction in [0, 1)) of the weights are zeroed, over all chosen layers together
    (``scope="global"``: one magnitude threshold) or in each layer (``scope="layer"``); or every
    weight with ``|w| < threshold``.  Chosen layers: Conv/Gemm/MatMul with a constant float weight
    used by that node alone, except ``exclude`` (node or weight names) and, with ``skip_ends``, the
    first and last such layer (the most sensitive).  Preserves shapes, dtypes, names, the graph
    and everything but weight values; never touches biases, integer weights, shared weights or
    weights that are graph inputs (reasons counted).  Lossy: callers validate with a fidelity
    budget (``onnxopt prune``).  Idempotent (already-zero entries count as the smallest).  The
    file only shrinks once compressed (gzip, CSR; see ``onnxopt.compression.engine``).  Cost: O(weights).
    """

    name = "prune-magnitude"

    def __init__(self, sparsity: float = 0.5, scope: str = "global", threshold: float | None = None, skip_ends: bool = True):
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
        if scope not in SCOPES:
            raise ValueError(f"scope '{scope}': expected global or layer")
        self.sparsity, self.scope, self.threshold, self.skip_ends = sparsity, scope, threshold, skip_ends

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _, skipped = layers(model)
        records, why = prune(model, sparsity=self.sparsity, threshold=self.threshold, scope=self.scope,
                             skip_ends=self.skip_ends)
        changed = collections.Counter({"weights zeroed": sum(r.get("new_zeros", 0) for r in records)})
        for reason in why.values():
            skipped[reason] += 1
        return self.result(model, changed, skipped)

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
#: no layer is pruned beyond this under the global scope (see layer_cap)
MAX_LAYER_SPARSITY = 0.95


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


def layer_cap(sparsity: float) -> float:
    """The largest sparsity any one layer gets under the global scope at overall ``sparsity`` S:
    halfway from S to 1, at most :data:`MAX_LAYER_SPARSITY` (and never below S itself)."""
    return max(sparsity, min(MAX_LAYER_SPARSITY, (1.0 + sparsity) / 2))


def relative_magnitudes(w: np.ndarray) -> np.ndarray:
    """|w| / the layer's RMS, flat: magnitudes a layer of small weights shares with a layer of large ones."""
    a = np.abs(w.astype(np.float64)).reshape(-1)
    rms = float(np.sqrt(np.mean(a * a))) if a.size else 0.0
    return a / rms if rms > 0 else a


def allocate(weights: list[np.ndarray], sparsity: float, cap: float | None = None) -> list[int]:
    """How many entries of each of ``weights`` to zero so that ``sparsity`` of all their entries are
    zero: the smallest by |w| / the layer's RMS over all layers together (one threshold on magnitudes
    relative to their layer, so a layer of small weights is not emptied), no layer above ``cap``
    (default :func:`layer_cap`); what a capped layer cannot take goes to the others (water filling)."""
    cap = layer_cap(sparsity) if cap is None else cap
    sizes = [int(w.size) for w in weights]
    limits = [int(np.floor(cap * n + 1e-9)) for n in sizes]
    k = min(int(round(sparsity * sum(sizes))), sum(limits))
    rel = [relative_magnitudes(w) for w in weights]
    capped: set[int] = set()
    counts = [0] * len(weights)
    while True:
        open_ = [i for i in range(len(weights)) if i not in capped]
        need = k - sum(limits[i] for i in capped)
        if need <= 0 or not open_:
            break
        mags = np.concatenate([rel[i] for i in open_])
        owner = np.repeat(np.array(open_), [sizes[i] for i in open_])
        got = np.bincount(owner[np.argpartition(mags, need - 1)[:need]], minlength=len(weights))
        over = {i for i in open_ if got[i] > limits[i]}
        if not over:
            counts = [int(got[i]) for i in range(len(weights))]
            break
        capped |= over
    for i in capped:
        counts[i] = limits[i]
    return counts


def prune(model: ir.Model, *, sparsity: float | None = None, threshold: float | None = None, scope: str = "global",
          exclude: Iterable[str] = (), skip_ends: bool = True, cap: float | None = None) -> tuple[list[dict], dict[str, str]]:
    """Prune in place; returns per-layer records (``layer``, ``op``, ``params``, ``zeros``,
    ``sparsity``, ``pruned``) and the layers left dense with why.  ``sparsity`` under the global
    scope: :func:`allocate` (relative magnitudes, no layer above ``cap``); in each layer (``scope
    ="layer"``): that fraction of every layer; ``threshold``: every |w| < threshold, as given."""
    all_layers, _ = layers(model)
    chosen, why = selected(all_layers, exclude, skip_ends)
    arrays = {la.name: tensor_of(la.weight).numpy() for la in chosen}
    counts: dict[str, int] = {}
    if threshold is None and chosen:
        s = float(sparsity or 0.0)
        if scope == "global":
            counts = dict(zip(arrays, allocate(list(arrays.values()), s, cap)))
        else:
            counts = {name: int(round(s * w.size)) for name, w in arrays.items()}
    records: list[dict[str, Any]] = []
    for la in all_layers:
        w = arrays.get(la.name)
        if w is None:
            w0 = tensor_of(la.weight).numpy()
            records.append({"layer": la.name, "op": la.node.op_type, "params": int(w0.size),
                            "zeros": int(np.count_nonzero(w0 == 0)), "pruned": False, "why": why.get(la.name, "")})
            continue
        if threshold is not None:
            new = np.where(np.abs(w) < threshold, np.zeros_like(w), w)
        else:
            new = _zero_smallest(w, counts[la.name])
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
    (``scope="global"``: one threshold on |w| / the layer's RMS, no layer above ``layer_cap(S)`` =
    min(0.95, (1 + S) / 2)) or in each layer (``scope="layer"``); or every weight with
    ``|w| < threshold``.  Chosen layers: Conv/Gemm/MatMul with a constant float weight
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

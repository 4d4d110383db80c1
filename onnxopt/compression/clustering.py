"""cluster-weights: per-layer k-means weight sharing, stored as a codebook and uint8 indices."""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.base import FreshNames, OptPass, add_initializer, name_of, present, tensor_of
from onnxopt.compression.magnitude import layers

KMEANS_ITERATIONS = 30


def kmeans_1d(values: np.ndarray, k: int, iterations: int = KMEANS_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialization over [min, max] (Deep Compression's
    best-performing init: large weights keep their own centroids; a cluster left empty is re-seeded
    at the value served worst, so no code is wasted).  Returns (sorted centroids,
    the index of each value's centroid).  O(n log k) per iteration (1-D: nearest centroid by
    bisection on the midpoints)."""
    values = values.astype(np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    lo, hi = float(values.min()), float(values.max())
    centroids = np.linspace(lo, hi, k) if hi > lo else np.full(1, lo)
    for _ in range(iterations):
        idx = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        sums = np.bincount(idx, values, len(centroids))
        counts = np.bincount(idx, minlength=len(centroids))
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # an empty cluster is re-seeded at the value its centroid serves worst
            err = np.abs(values - centroids[idx])
            worst = np.argpartition(-err, min(empty.size, err.size) - 1)[:empty.size]
            new[empty[:worst.size]] = values[worst]
        new = np.unique(new) if empty.size else new
        new.sort()
        if new.shape == centroids.shape and np.allclose(new, centroids, rtol=0, atol=1e-12):
            break
        centroids = new
    return centroids, np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)


def cluster(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook of at most ``k`` float values, uint8 indices of ``w``'s shape).  Exact zeros (pruned
    weights) keep the value 0 as their own entry 0, so sparsity survives clustering."""
    flat = w.reshape(-1)
    nonzero = flat != 0
    zeros = not nonzero.all()
    cents, idx = kmeans_1d(flat[nonzero], k - 1 if zeros else k)
    if zeros:
        codebook = np.concatenate([[0.0], cents])
        indices = np.zeros(flat.size, np.int64)
        indices[nonzero] = idx + 1
    else:
        codebook, indices = cents, idx
    return codebook.astype(w.dtype), indices.astype(np.uint8).reshape(w.shape)


def huffman_lengths(counts: Iterable[int]) -> dict[int, int]:
    """Code length per symbol of a Huffman code for these symbol counts (symbols with count 0
    get none; a single symbol gets length 1)."""
    heap = [(c, i, [s]) for i, (s, c) in enumerate((s, c) for s, c in enumerate(counts) if c > 0)]
    lengths = {syms[0]: 0 for _, _, syms in heap}
    if len(heap) == 1:
        return {heap[0][2][0]: 1}
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in (*s1, *s2):
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def huffman_bits(indices: np.ndarray) -> tuple[int, int]:
    """(bits of ``indices`` Huffman-coded with a code built for their own frequencies, symbols)."""
    counts = np.bincount(indices.reshape(-1).astype(np.int64))
    lengths = huffman_lengths(counts)
    return int(sum(int(counts[s]) * n for s, n in lengths.items())), len(lengths)


class ClusterWeights(OptPass):
    """Share weights: k-means each Conv/Gemm/MatMul weight to ``clusters`` (<= 256) values.

    Each chosen weight ``W`` becomes ``Gather(codebook, Cast(indices, int32))`` with ``codebook``
    float [k] and ``indices`` uint8 of W's shape (ORT folds the two constant ops at session start,
    so inference speed is unchanged; the file stores 1 byte per weight instead of 4).  With <= 16
    clusters on an opset >= 21 model the indices are uint4 (half a byte per weight; ORT's Cast reads
    uint4, exact).  Older models keep uint8: their opset import is not changed, and opset 21's int4
    DequantizeLinear cannot represent arbitrary (non-uniform) centroids exactly.  Exact
    zeros (pruned weights) stay exactly zero (their own codebook entry 0).  Preserves every other
    tensor, graph inputs/outputs, opsets (Gather/Cast exist in every opset we load) and metadata;
    never touches biases, shared, integer or graph-input weights, or ``exclude`` (node names).
    Lossy: callers validate (``onnxopt compress``).  Idempotent (a clustered weight is no longer a
    constant initializer of the layer, so it is not chosen again).  Cost: O(weights x iterations).
    """

    name = "cluster-weights"

    def __init__(self, clusters: int = 16, exclude: tuple[str, ...] = ()):
        super().__init__()
        if not 2 <= clusters <= 256:
            raise ValueError(f"clusters {clusters} outside [2, 256]")
        self.clusters, self.exclude = clusters, tuple(exclude)
        self.records: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found, skipped = layers(model)
        names = FreshNames(model)
        changed: collections.Counter = collections.Counter()
        self.records = []
        uint4 = self.clusters <= 16 and packs_uint4(model)
        for layer in found:
            if layer.name in self.exclude:
                skipped["excluded"] += 1
                continue
            w = tensor_of(layer.weight).numpy()
            codebook, indices = cluster(w, self.clusters)
            self.records.append(rewrite(model.graph, layer.node, codebook, indices, names, uint4))
            changed["weights clustered"] += 1
        return self.result(model, changed, skipped)


def packs_uint4(model: ir.Model) -> bool:
    """Whether indices may be stored as uint4 (two a byte): Cast reads uint4 from opset 21 (IR 10) on;
    an older model keeps uint8 indices rather than have its opset import changed."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    return opset >= 21 and (model.ir_version or 0) >= 10


def rewrite(graph: ir.Graph, node: ir.Node, codebook: np.ndarray, indices: np.ndarray, names: FreshNames,
            uint4: bool = False) -> dict:
    """Make ``node``'s weight ``Gather(codebook, Cast(indices))`` (indices uint4 when ``uint4`` and the
    codebook has <= 16 entries, else uint8); returns the layer's record."""
    weight = present(node.inputs[1])  # a clustered layer has its weight input
    base = weight.name or node.name
    cb = add_initializer(graph, f"{base}_codebook", codebook)
    idx = add_initializer(graph, f"{base}_indices", indices)
    if uint4 and len(codebook) <= 16:
        idx.const_value = ir.Tensor(indices, dtype=ir.DataType.UINT4, name=idx.name)
        idx.type = ir.TensorType(ir.DataType.UINT4)
    cast = ir.node("Cast", [idx], attributes={"to": ir.DataType.INT32}, name=names.node(f"{node.name}_indices_cast"),
                   outputs=[ir.Value(name=names.value(f"{base}_indices_i32"))])
    gather = ir.node("Gather", [cb, cast.outputs[0]], attributes={"axis": 0}, name=names.node(f"{node.name}_gather"),
                     outputs=[ir.Value(name=names.value(f"{base}_shared"))])
    gather.outputs[0].shape = ir.Shape(indices.shape)
    gather.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(codebook.dtype))
    graph.insert_before(node, [cast, gather])
    node.replace_input_with(1, gather.outputs[0])
    if not weight.uses() and weight.is_initializer() and not weight.is_graph_input():
        graph.initializers.pop(name_of(weight), None)
    return {"layer": node.name, "params": int(indices.size), "clusters": int(len(codebook)),
            "zeros": int(np.count_nonzero(indices == 0)) if codebook[0] == 0 else 0,
            "indices": indices, "codebook": codebook}

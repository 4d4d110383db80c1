"""dedup: merge identical initializers, reading as few weights as possible."""

from __future__ import annotations

import collections
import hashlib

import onnx_ir as ir

from onnxopt.base import OptPass

_CHUNK = 16 << 20
_CONFIRM_LIMIT = 64 << 20
_SAMPLE = 64 << 10


class Deduplicate(OptPass):
    """Make every use of an initializer read the first identical one (same dtype, shape, bytes).

    Contract: outputs bit-identical; initializers that are graph inputs or outputs are kept.
    Works per graph (main graph and each subgraph).  Only tensors that share dtype and shape with
    another are read at all; external tensors are hashed from their file in 16 MiB chunks, so a
    large model is not pulled into memory (why we do not reuse onnx-ir's DeduplicateHashed
    pass, which materializes each tensor).  A digest of three 64 KiB samples comes first; only
    tensors whose samples collide are hashed whole.  Equal SHA-256 digests are confirmed byte by
    byte below 64 MiB.  Cost: O(same-shaped initializers x 192 KiB + bytes of likely duplicates),
    full digests of external tensors memoized for the run.
    """

    name = "dedup"

    def __init__(self):
        super().__init__()
        # Digest of an external tensor's file range; the range's bytes never change during a run,
        # so the fixed-point loop's later iterations do not re-read gigabytes.
        self._external_digests: dict[tuple, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        for graph in model.graphs():
            groups: dict[tuple, list[ir.Value]] = collections.defaultdict(list)
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if value.is_graph_input() or value.is_graph_output():
                    skipped["initializer is a graph input or output"] += 1
                    continue
                groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
            for same_shape in groups.values():
                if len(same_shape) < 2:
                    continue
                by_sample: dict[str, list[ir.Value]] = collections.defaultdict(list)
                for value in same_shape:  # cheap prefilter: only sample collisions get a full hash
                    by_sample[_sample_digest(value.const_value)].append(value)
                for candidates in by_sample.values():
                    if len(candidates) >= 2:
                        self._merge(graph, candidates, changed)
        return self.result(model, changed, skipped)

    def _merge(self, graph: ir.Graph, candidates: list[ir.Value], changed: collections.Counter) -> None:
        """Point every use of a duplicate at the first tensor with the same full digest."""
        kept: dict[str, ir.Value] = {}
        for value in candidates:
            digest = self._digest(value.const_value)
            keep = kept.get(digest)
            if keep is None:
                kept[digest] = value
                continue
            if value.const_value.nbytes <= _CONFIRM_LIMIT and \
                    value.const_value.tobytes() != keep.const_value.tobytes():
                continue
            value.replace_all_uses_with(keep)
            del graph.initializers[value.name]
            changed["initializers merged"] += 1
            changed["bytes saved"] += value.const_value.nbytes


    def _digest(self, tensor) -> str:
        if isinstance(tensor, ir.ExternalTensor):
            key = (tensor.path, tensor.offset, tensor.length)
            if key not in self._external_digests:
                self._external_digests[key] = _digest(tensor)
            return self._external_digests[key]
        return _digest(tensor)


def _read(tensor, start: int, length: int) -> bytes:
    """``length`` bytes of the tensor's data from ``start`` (from its file when external)."""
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as f:
            f.seek((tensor.offset or 0) + start)
            return f.read(length)
    return tensor.tobytes()[start:start + length]


def _sample_digest(tensor) -> str:
    """Digest of three 64 KiB samples (start, middle, end): equal tensors always agree, and
    different weights almost never do, so full hashes are computed only for real candidates."""
    n = tensor.nbytes
    if n <= 3 * _SAMPLE:
        return _digest(tensor)
    h = hashlib.sha256()
    for start in (0, n // 2, n - _SAMPLE):
        h.update(_read(tensor, start, _SAMPLE))
    return h.hexdigest()


def _digest(tensor) -> str:
    h = hashlib.sha256()
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            remaining = tensor.length if tensor.length is not None else tensor.nbytes
            while remaining > 0:
                block = f.read(min(_CHUNK, remaining))
                if not block:
                    break
                h.update(block)
                remaining -= len(block)
    else:
        h.update(tensor.tobytes())
    return h.hexdigest()

"""dedup: merge identical initializers, reading as few weights as possible."""

from __future__ import annotations

import collections
import hashlib

import onnx_ir as ir

from onnxopt.base import OptPass

_CHUNK = 16 << 20
_CONFIRM_LIMIT = 64 << 20


class Deduplicate(OptPass):
    """Make every use of an initializer read the first identical one (same dtype, shape, bytes).

    Contract: outputs bit-identical; initializers that are graph inputs or outputs are kept.
    Works per graph (main graph and each subgraph).  Only tensors that share dtype and shape with
    another are read at all; external tensors are hashed from their file in 16 MiB chunks, so a
    large model is not pulled into memory (why we do not reuse onnx-ir's DeduplicateHashed
    pass, which materializes each tensor).  Equal SHA-256 digests are confirmed byte by byte
    below 64 MiB.  Cost: O(bytes of same-shaped initializers), once per run (external digests are memoized).
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
            for candidates in groups.values():
                if len(candidates) < 2:
                    continue
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
        return self.result(model, changed, skipped)


    def _digest(self, tensor) -> str:
        if isinstance(tensor, ir.ExternalTensor):
            key = (tensor.path, tensor.offset, tensor.length)
            if key not in self._external_digests:
                self._external_digests[key] = _digest(tensor)
            return self._external_digests[key]
        return _digest(tensor)


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

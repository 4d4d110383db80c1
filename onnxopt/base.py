"""What every onnxopt pass shares: a result that says what changed and what was skipped, and why.

Passes are onnx-ir ``InPlacePass`` subclasses (DESIGN "A pass"); this module adds only the
reporting contract on top, so the pipeline can print "fold-constants: folded 12, skipped 3
(custom domain: 2, result too large: 1)".
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import onnx_ir as ir

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


@dataclasses.dataclass
class OptResult(ir.passes.PassResult):
    """A PassResult with counts of changes (by kind) and of declined rewrites (by reason)."""

    changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class OptPass(ir.passes.InPlacePass):
    """Base of our passes: ``name`` is the pipeline spelling; the docstring's first line is the
    one-line contract shown by ``onnxopt passes``."""

    name: ClassVar[str] = ""

    def result(self, model: ir.Model, changed: collections.Counter,
               skipped: collections.Counter | None = None) -> OptResult:
        changed = +changed  # drop zero counts
        return OptResult(model, bool(changed), changed, +(skipped or collections.Counter()))

    @classmethod
    def contract(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph and every subgraph."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def op_histogram(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in STANDARD_DOMAINS else n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph))


def is_standard(node: ir.Node) -> bool:
    return node.domain in STANDARD_DOMAINS

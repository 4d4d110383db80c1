"""What every onnxopt pass shares: a result that says what changed and what was skipped, and why.

Passes are onnx-ir ``InPlacePass`` subclasses (DESIGN "A pass"); this module adds only the
reporting contract on top, so the pipeline can print "fold-constants: folded 12, skipped 3
(custom domain: 2, result too large: 1)".
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, ClassVar, TypeGuard, TypeVar, cast

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.io import weight_bytes

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
#: model.meta key: serialized size when the pipeline started (size guards budget against it).
#: Above this many weight bytes the serialized size is not measured (too costly per pass).
SIZE_MEASURE_LIMIT = 64 << 20


@dataclasses.dataclass
class OptResult(ir.passes.PassResult):
    """A PassResult with counts of changes (by kind) and of declined rewrites (by reason)."""

    changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class Match:
    """Outcome of one rewrite rule (or one check of it) at one node; onnxscript's ``MatchResult``
    is the model.  ``Match.ok(value)``: the pattern is there and the check passed (for a rule: it
    rewrote; ``value`` carries what a check computed); ``Match.fail(reason)``: the pattern is there
    but the check declined, and says why; ``NO_MATCH``: the pattern is absent (nothing to report)."""

    matched: bool
    reason: str = ""
    value: object = None

    @classmethod
    def ok(cls, value: object = None) -> Match:
        return cls(True, "", value)

    @classmethod
    def fail(cls, reason: str) -> Match:
        assert reason, "a declined rule must say why"
        return cls(True, reason)

    @property
    def succeeded(self) -> bool:
        return self.matched and not self.reason

    def tally(self, changed: collections.Counter, skipped: collections.Counter, what: str,
              prefix: str = "") -> None:
        """Count a success under ``what`` and a decline under its reason (``prefix: reason``)."""
        if self.succeeded:
            changed[what] += 1
        elif self.reason:
            skipped[f"{prefix}: {self.reason}" if prefix else self.reason] += 1


NO_MATCH = Match(False)


def declined(reason: str | None) -> Match:
    """Map a helper's "None on success, else a reason" (e.g. :func:`substitute`) to a Match."""
    return Match.ok() if reason is None else Match.fail(reason)


class _Reporting:
    """What every onnxopt pass adds to onnx-ir's: ``name`` is the pipeline spelling; the docstring's
    first line is the one-line contract shown by ``onnxopt passes``; results count changes and
    declined rewrites by reason."""

    name: ClassVar[str] = ""

    def result(self, model: ir.Model, changed: collections.Counter,
               skipped: collections.Counter | None = None) -> OptResult:
        changed = +changed  # drop zero counts
        return OptResult(model, bool(changed), changed, +(skipped or collections.Counter()))

    @classmethod
    def contract(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class OptPass(_Reporting, ir.passes.InPlacePass):
    """Base of our in-place passes (the model is mutated and returned)."""


class FunctionalOptPass(_Reporting, ir.passes.FunctionalPass):
    """Base of passes that build a new model and leave their input untouched (e.g. a pass handing
    the model to another library)."""


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph and every subgraph."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def count_initializers(model: ir.Model) -> int:
    """Initializers in the main graph and every subgraph."""
    return sum(len(g.initializers) for g in model.graphs())


def op_histogram(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in STANDARD_DOMAINS else n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph))


T = TypeVar("T")


def present(value: T | None) -> T:
    """``value`` typed as present, where it is by construction (the caller says why).  A pure typing
    cast: nothing is checked, so a None fails at its next use exactly as it would have."""
    return cast(Any, value)


def name_of(value: ir.Value | None) -> str:
    """``value.name`` typed as ``str``, for a value that is present and named by construction (onnx-ir
    names every value of a graph).  A pure typing cast: a None value raises AttributeError, exactly as
    the attribute access would."""
    return present(present(value).name)


def node_name(node: ir.Node | None) -> str:
    """``node.name`` typed as ``str``, for a node named by construction (a pure typing cast, like name_of)."""
    return present(present(node).name)


def graph_of(node: ir.Node | None) -> ir.Graph:
    """``node.graph`` typed as present, for a node of a graph (a pure typing cast, like name_of)."""
    return present(present(node).graph)


def tensor_of(value: ir.Value | None) -> ir.TensorProtocol:
    """``value.const_value`` typed as present, for a value that holds a constant by construction (an
    initializer).  A pure typing cast: nothing is checked, so a missing value or constant fails at
    the caller's next attribute access exactly as before."""
    return present(present(value).const_value)


def producer_of(value: ir.Value | None) -> ir.Node:
    """``value.producer()`` typed as present, for a node output (a pure typing cast, like tensor_of)."""
    return present(present(value).producer())


def is_standard(node: ir.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def is_constant(value: ir.Value | None) -> TypeGuard[ir.Value]:
    """True for a value whose content is fixed: it has a constant and is not a graph input (an
    initializer listed as an input is a default the user may replace at run time)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def constant(value: ir.Value | None):
    """The numpy array of a fixed value (see is_constant), else None."""
    return tensor_of(value).numpy() if is_constant(value) else None


def node_axes(node: ir.Node) -> list[int] | None:
    """A node's ``axes``: the attribute (older opsets) or its constant second input, else None."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    arr = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if arr is None else [int(a) for a in arr.reshape(-1)]


class FreshNames:
    """Node and value names not yet used anywhere in a model, for the nodes a pass creates (ORT
    refuses duplicate node names).  Built once per pass call, O(nodes); O(1) per new name."""

    def __init__(self, model: ir.Model):
        self.nodes = {n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name}
        self.values = {v.name for g in model.graphs() for v in (*g.inputs, *g.initializers.values()) if v.name}
        self.values |= {o.name for n in ir.traversal.RecursiveGraphIterator(model.graph) for o in n.outputs if o.name}

    @staticmethod
    def _fresh(taken: set[str], base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def node(self, base: str) -> str:
        return self._fresh(self.nodes, base)

    def value(self, base: str) -> str:
        return self._fresh(self.values, base)


def remove_dead_producers(values: list[ir.Value | None]) -> int:
    """Remove the nodes that produced ``values`` and now feed nothing (no uses, no graph output),
    walking back through their inputs; returns how many.  O(nodes removed)."""
    removed = 0
    stack = [producer_of(v) for v in values if v is not None and v.producer() is not None]
    while stack:
        node = stack.pop()
        if node.graph is None or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        node.graph.remove(node, safe=True)
        removed += 1
        stack.extend(producer_of(v) for v in inputs if v.producer() is not None)
    return removed


def substitute(node: ir.Node, replacement: ir.Value) -> str | None:
    """Make every user of ``node.outputs[0]`` read ``replacement`` and remove ``node``.

    ``node`` must have a single used output.  When that output is a graph output, the value that
    replaces it takes over its name, type and declared dims, which is only done when
    ``replacement`` is made by a node of the same graph and is not itself a graph output;
    otherwise nothing changes and the reason is returned (renaming a graph input, an initializer
    or an outer-scope value would change the model's interface)."""
    graph = present(node.graph)  # the node being rewritten is in a graph (else .remove fails as before)
    out = node.outputs[0]
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "another output is used"
    if out.is_graph_output():
        producer = replacement.producer()
        if producer is None or producer.graph is not graph:
            return "graph output fed directly by a graph input, initializer or outer-scope value"
        if replacement.is_graph_output():
            return "its input is itself a graph output"
        ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
        name, type_, shape = out.name, out.type, out.shape
        graph.remove(node, safe=True)
        replacement.name = name
        replacement.type = type_ or replacement.type
        replacement.shape = shape if shape is not None else replacement.shape
        return None
    out.replace_all_uses_with(replacement)
    graph.remove(node, safe=True)
    return None


def add_initializer(graph: ir.Graph, name: str, array) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a name not yet taken."""
    unique, i = name, 1
    while unique in graph.initializers:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def replace_with_initializer(value: ir.Value, array) -> ir.Value:
    """Make every user of ``value`` (a node output) read a new initializer of its graph holding
    ``array``, under ``value``'s name; the producing node is left for the caller to remove."""
    graph = present(producer_of(value).graph)
    name, value.name = name_of(value), None
    new = add_initializer(graph, name, array)
    value.replace_all_uses_with(new)
    return new


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Delete the main graph's initializers nothing reads (not graph inputs or outputs either);
    returns how many.  What a build that replaced weights leaves behind, for a fraction of the
    ``cleanup`` pass's cost.  O(initializers)."""
    dropped = 0
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
            dropped += 1
    return dropped


def serialized_size(model: ir.Model) -> int | None:
    """Bytes of the serialized model (external data excluded), or None for models whose weights
    exceed SIZE_MEASURE_LIMIT.  Cost: one serialization."""
    if weight_bytes(model) > SIZE_MEASURE_LIMIT:
        return None
    return ir.to_proto(model).ByteSize()


#: Initializers at least this large are left out of structure-only serializations (:func:`light_proto`);
#: smaller ones (shape, axes and index constants, which shape inference's data propagation reads) stay in.
LIGHT_BYTES = 1024
#: where :func:`light_proto` says a left-out tensor lives (never a file: its readers are given the tensors)
LIGHT_LOCATION = "onnxopt-in-memory"
#: the types left out: weights (float, and 8-bit quantized codes).  Wider integers stay in whatever
#: their size: a table of ints may feed a shape computation, which onnx inference reads only inline.
_LIGHT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
                          ir.DataType.UINT8})


def light_proto(model: ir.Model, min_bytes: int = LIGHT_BYTES) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """``model`` serialized with each main-graph initializer of at least ``min_bytes`` (a weight:
    _LIGHT_TYPES) that a node uses as an external-data reference to LIGHT_LOCATION instead of its
    bytes (ORT refuses an external initializer it has dropped as unused); returns the proto and the
    left-out tensors by name.  For onnx shape inference, which needs no weights, and ORT
    sessions given the tensors (``runtime.Light``): copying the weights into the proto was most of
    their cost.  A weight still in an external-data file is always left out when used (the arrays are
    memory-mapped) and omitted when unused (a reference ORT would resolve against the working folder).
    The model is left as it was (its initializers are swapped back, also on error), but is briefly
    changed: not for a model another thread reads."""
    left: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    unused_on_disk: dict[str, ir.Value] = {}  # would be file references ORT resolves against the working folder
    for name, v in model.graph.initializers.items():
        t = v.const_value
        on_disk = isinstance(t, ir.ExternalTensor) and t.location != LIGHT_LOCATION
        if t is not None and v.uses() and (on_disk or (t.dtype in _LIGHT_TYPES and t.nbytes >= min_bytes)):
            left[name] = (v, t)
        elif on_disk and not v.uses() and not v.is_graph_input() and not v.is_graph_output():
            unused_on_disk[name] = v  # a weight a build replaced (cleanup drops it at the end): not for ORT
    try:
        for name, (v, t) in left.items():
            v.const_value = ir.ExternalTensor(LIGHT_LOCATION, 0, t.nbytes, t.dtype, shape=ir.Shape(t.shape.numpy()), name=name,
                                              base_dir="")
        order = list(model.graph.initializers.values()) if unused_on_disk else []
        for name in unused_on_disk:
            del model.graph.initializers[name]
        proto = ir.to_proto(model)
    finally:
        for v, t in left.values():
            v.const_value = t
        if unused_on_disk:  # back in their places: the model's initializer order is part of what it writes
            model.graph.initializers.clear()
            for v in order:
                model.graph.register_initializer(v)
    return proto, {name: t for name, (_, t) in left.items()}


#: ops whose output is >= 0 when the listed inputs are (integer position arithmetic)
_SAME_SIGN = {"Unsqueeze": (0,), "Squeeze": (0,), "Reshape": (0,), "Expand": (0,), "Identity": (0,), "Flatten": (0,),
              "Transpose": (0,), "Slice": (0,), "Gather": (0,), "Cast": (0,), "Add": None, "Mul": None, "Concat": None,
              "Max": None, "Min": None}


def nonnegative(value: ir.Value | None, depth: int = 12) -> bool:
    """True when every element of ``value`` is provably >= 0: a constant, Shape/Size, Range from a
    nonnegative start with a positive constant step, or integer arithmetic of such values
    (``_SAME_SIGN``: all listed inputs, or all inputs when None; a Cast only from an integer to
    int64/float/double, which cannot wrap).  False when not provable.  Cost: O(depth) nodes visited."""
    if value is None or depth == 0:
        return False
    arr = constant(value)
    if arr is not None:
        return arr.size > 0 and bool(np.all(arr >= 0)) and bool(np.all(np.isfinite(arr)))  # inf * 0 is NaN
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    if node.op_type == "Range":
        step = constant(node.inputs[2])
        return step is not None and step.size == 1 and float(step.reshape(-1)[0]) > 0 and nonnegative(node.inputs[0], depth - 1)
    if node.op_type not in _SAME_SIGN or (node.op_type == "Cast" and not _widening_int_cast(node)):
        return False
    indices = _SAME_SIGN[node.op_type] or range(len(node.inputs))
    return all(nonnegative(node.inputs[i], depth - 1) for i in indices)


def _widening_int_cast(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    source = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
    return (source is not None and source.is_integer() and to is not None
            and to.as_int() in (ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.DOUBLE))


def node_output(node: ir.Node, names: FreshNames, base: str, dtype: ir.DataType | None = None) -> ir.Value:
    """Name ``node``'s first output fresh from ``base`` (and retype it to ``dtype``); returns it."""
    value = node.outputs[0]
    value.name = names.value(base)
    if dtype is not None:
        value.type = ir.TensorType(dtype)
    return value


def replace_node(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> str | None:
    """Insert ``new_nodes`` before ``old`` and make ``result`` replace its output (graph output
    names kept); on a decline the new nodes are removed again."""
    graph.insert_before(old, new_nodes)
    result.shape = old.outputs[0].shape
    reason = substitute(old, result)
    if reason is not None:
        graph.remove(list(reversed(new_nodes)), safe=True)
    return reason


def float_initializer(value: ir.Value | None) -> TypeGuard[ir.Value]:
    """A float32 initializer no user can override (not also a graph input)."""
    return (value is not None and value.const_value is not None and value.is_initializer()
            and not value.is_graph_input() and value.dtype == ir.DataType.FLOAT)


def new_initializer(graph: ir.Graph, names: FreshNames, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer under a name no value of the model has (initializers, node outputs)."""
    return add_initializer(graph, names.value(base), array)

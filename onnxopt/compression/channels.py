"""prune-channels: find channel dependency groups and remove channels physically (structured pruning).

A **group** is a set of tensors that share one channel numbering: removing channel ``c`` means
removing it from every tensor of the group at once.  It is found from the graph alone (no probe
run), walking from a producing layer's output forwards and backwards through ops that keep
channels apart:

- **producers** (their output channels are the group's): Conv (group 1), Gemm, MatMul with a
  constant 2-D weight;
- **consumers** (their input channels are the group's): the same layers reading a group tensor as
  their data input; their weights lose the matching input slices (``block`` entries per channel
  after a Flatten of ``[N, C, H, W]``: ``H*W`` features per channel);
- **tied** depthwise Conv (``group == C``, one filter per channel): input and output are in the
  same group, its filters and ``group`` attribute shrink with it;
- **pass-through** ops: elementwise activations (Relu, Clip, ...), pooling, BatchNormalization and
  per-channel constants of Add/Mul/Sub/Div (their parameters are sliced), residual Add/Mul/Sub/
  Max/Min of two group tensors (joined), Transpose, Squeeze/Unsqueeze (the channel axis moves),
  Flatten (channels become blocks of features), Concat/Split along another axis;
- **windows**: through a Concat along the channel axis the group's channels become a window
  ``[offset, offset + C)`` of the concatenation (consumers after it lose only that window's
  slices, the other inputs' channels are untouched); a Split along the channel axis passes the
  window on when it lies inside one output.

A group is **unresolved** (left untouched, its reason kept) when a tensor of it is a graph input
or output, is made or read by another op (Reshape, Gather, a grouped non-depthwise Conv, ...), is
cut by a Split into several outputs, meets another tensor in an Add/Mul after a channel-axis Concat
(windows of different groups would have to line up), or has an unknown rank.
Shapes come from the model's value infos (run shape inference first).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    OptPass,
    add_initializer,
    constant,
    graph_of,
    is_constant,
    is_standard,
    name_of,
    node_axes,
    node_name,
    present,
    producer_of,
    tensor_of,
)

UNARY = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu",
                   "Softplus", "Identity", "Dropout", "Neg", "Abs", "Erf", "PRelu", "Mish", "Celu", "ThresholdedRelu"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min"})
LAYERS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Slice:
    """A constant input of ``node`` (input ``index``) cut along ``axis`` when channels go (``block``
    entries per channel)."""

    node: ir.Node
    index: int
    axis: int
    block: int = 1


@dataclasses.dataclass
class Group:
    """One channel numbering shared by ``tensors`` (name -> (channel axis, block))."""

    id: int
    channels: int = 0
    tensors: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    producers: list[ir.Node] = dataclasses.field(default_factory=list)
    consumers: list[ir.Node] = dataclasses.field(default_factory=list)
    tied: list[ir.Node] = dataclasses.field(default_factory=list)
    slices: list[Slice] = dataclasses.field(default_factory=list)
    #: tensors that hold the group's channels as a window [offset, offset + channels) of a longer
    #: channel axis (after a Concat along it, or a Split that keeps the window whole)
    windows: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Reshape nodes that split the channel axis into [heads, head_dim] (or merge it back): input 1
    #: entry ``position`` of their shape constant is ``channels x per`` (updated on removal)
    reshapes: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)
    #: set by the walk when a Reshape splits the channels into heads of this size (the walk is
    #: redone with one channel per head, ``block`` = head size)
    head_dim: int | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        return node_name(self.producers[0]) if self.producers else f"group{self.id}"

    def fail(self, reason: str) -> None:
        self.reason = self.reason or reason

    def to_dict(self) -> dict:
        return {"group": self.name, "channels": self.channels, "producers": [n.name for n in self.producers],
                "consumers": [n.name for n in self.consumers], "tied": [n.name for n in self.tied],
                "tensors": len(self.tensors), "resolved": self.reason is None, "reason": self.reason}


# ---------------------------------------------------------------- layer roles

def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.as_int())


def _has_weight(node: ir.Node) -> bool:
    return len(node.inputs) > 1 and is_constant(node.inputs[1]) and len(tensor_of(node.inputs[1]).shape) >= 2 \
        and len(node.inputs[1].uses()) == 1


def is_depthwise(node: ir.Node) -> bool:
    if node.op_type != "Conv" or not _has_weight(node):
        return False
    w = tensor_of(node.inputs[1]).shape.numpy()
    g = _attr(node, "group", 1)
    return g > 1 and int(w[1]) == 1 and int(w[0]) == g


def is_layer(node: ir.Node) -> bool:
    """A producer/consumer layer: Conv (group 1), Gemm (transA 0), MatMul with a constant 2-D weight."""
    if not is_standard(node) or node.op_type not in LAYERS or not _has_weight(node):
        return False
    if node.op_type == "Conv":
        return _attr(node, "group", 1) == 1
    if node.op_type == "Gemm":
        return _attr(node, "transA", 0) == 0
    return len(tensor_of(node.inputs[1]).shape) == 2


def out_axis(node: ir.Node) -> tuple[int, int]:
    """(weight axis of the output channels, channel axis of the output tensor; -1 = last)."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        return (0 if _attr(node, "transB", 0) else 1), 1
    return 1, -1


def in_axis(node: ir.Node) -> tuple[int, int]:
    """(weight axis of the input channels, channel axis of the data input; -1 = last)."""
    if node.op_type == "Conv":
        return 1, 1
    if node.op_type == "Gemm":
        return (1 if _attr(node, "transB", 0) else 0), 1
    return 0, -1


def channels_out(node: ir.Node) -> int:
    return int(tensor_of(node.inputs[1]).shape.numpy()[out_axis(node)[0]])


# ---------------------------------------------------------------- the walk

class _Walk:
    def __init__(self, graph: ir.Graph, group: Group):
        self.graph, self.g = graph, group
        self.queue: list[tuple[ir.Value, int, int]] = []
        self.related: set[int] = set()  # pass-through nodes whose tensors are already related (once each)
        self.offset: int | None = None  # the window of the tensor being processed (None: all of its channels)

    def add(self, v: ir.Value, axis: int, block: int, offset: int | None = -1) -> None:
        """``v`` holds the group's channels on ``axis`` (``offset``: where its window starts;
        default: the same window as the tensor being processed)."""
        offset = self.offset if offset == -1 else offset
        rank = _rank(v)
        if rank is None:
            self.g.fail(f"tensor '{v.name}' has an unknown rank (run shape inference)")
            return
        axis = axis % rank if -rank <= axis < rank else axis
        if not 0 <= axis < rank:
            self.g.fail(f"tensor '{v.name}': channel axis out of range")
            return
        seen = self.g.tensors.get(name_of(v))
        if seen is not None:
            if seen != (axis, block):
                self.g.fail(f"tensor '{v.name}' is reached with two different channel layouts")
            return
        self.g.tensors[name_of(v)] = (axis, block)
        dim = present(v.shape)[axis]  # the rank is known: so is the shape
        if offset is not None:
            self.g.windows[name_of(v)] = offset
            if block != 1 or not isinstance(dim, int) or dim < offset + self.g.channels:
                self.g.fail(f"tensor '{v.name}': the concatenated channels are not static")
        elif isinstance(dim, int) and dim != self.g.channels * block:
            self.g.fail(f"tensor '{v.name}' has {dim} entries on its channel axis, expected {self.g.channels * block}")
        self.queue.append((v, axis, block))

    def run(self) -> None:
        while self.queue:
            v, axis, block = self.queue.pop()
            self.offset = self.g.windows.get(name_of(v))
            if v.is_graph_output():
                self.g.fail(f"tensor '{v.name}' is a graph output")
            if v.is_graph_input() or v.producer() is None:
                self.g.fail(f"tensor '{v.name}' is a graph input or constant")
            else:
                self.producer_side(producer_of(v), v, axis, block)
            for node, index in list(v.uses()):
                self.consumer_side(node, index, v, axis, block)

    def producer_side(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        if is_layer(node) and node.outputs[0] is v:
            if axis != out_axis(node)[1] % (_rank(v) or 1) or (block != 1 and node.op_type == "Conv"):
                self.g.fail(f"'{node.name}' ({node.op_type}) makes channels on another axis")
            elif node not in self.g.producers:
                self.g.producers.append(node)
            return
        if is_depthwise(node):
            if self.offset is not None:
                self.g.fail(f"'{node.name}' (depthwise Conv) reads concatenated channels")
            elif node not in self.g.tied:
                self.g.tied.append(node)
                self.add(present(node.inputs[0]), 1, block)
            return
        self.through(node, v, axis, block)

    def consumer_side(self, node: ir.Node, index: int, v: ir.Value, axis: int, block: int) -> None:
        if is_layer(node) and index == 0:
            if axis != in_axis(node)[1] % (_rank(v) or 1):
                self.g.fail(f"'{node.name}' ({node.op_type}) reads the channels on another axis")
            elif node not in self.g.consumers:
                self.g.consumers.append(node)
            return
        if is_depthwise(node) and index == 0:
            if self.offset is not None:
                self.g.fail(f"'{node.name}' (depthwise Conv) reads concatenated channels")
            elif node not in self.g.tied:
                self.g.tied.append(node)
                self.add(node.outputs[0], 1, block)
            return
        self.through(node, v, axis, block)

    def through(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        """Relate the other data tensors of a pass-through ``node`` to ``v``'s channel axis (once:
        the first visit relates all of them, and its parameters are cut once)."""
        if id(node) in self.related:
            return
        self.related.add(id(node))
        op = node.op_type
        if not is_standard(node):
            self.g.fail(f"'{node.name}' is a custom-domain op ({node.domain}::{op})")
        elif op in UNARY or op == "BatchNormalization" or op in POOLS:
            self.elementwise(node, axis, block)
        elif op in BINARY:
            self.binary(node, v, axis, block)
        elif op == "Transpose":
            perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
            if perm is None:
                self.g.fail(f"'{node.name}': Transpose without perm")
            elif v is node.inputs[0]:
                self.add(node.outputs[0], perm.index(axis), block)
            else:
                self.add(present(node.inputs[0]), perm[axis], block)
        elif op in ("Squeeze", "Unsqueeze"):
            self.squeeze(node, v, axis, block)
        elif op == "Flatten":
            self.flatten(node, v, axis, block)
        elif op in ("Concat", "Split"):
            self.concat(node, v, axis, block)
        elif op == "Reshape":
            self.reshape(node, v, axis, block)
        elif op == "MatMul":
            self.batched_matmul(node, v, axis, block)
        elif op in ("Softmax", "LogSoftmax"):
            rank = _rank(v) or 0
            if _attr(node, "axis", -1) % max(rank, 1) == axis:
                self.g.fail(f"'{node.name}' ({op}) normalizes over the channels")
            else:
                self.add(present(node.inputs[0]), axis, block)
                self.add(node.outputs[0], axis, block)
        else:
            self.g.fail(f"'{node.name}' ({op}) mixes or reshapes channels (not supported)")

    def elementwise(self, node: ir.Node, axis: int, block: int) -> None:
        op = node.op_type
        if (op in POOLS or op == "BatchNormalization") and (axis != 1 or block != 1):
            self.g.fail(f"'{node.name}' ({op}) works on axis 1, the channels are on axis {axis}")
            return
        for i, x in enumerate(node.inputs[1:], 1):
            if x is None:
                continue
            arr = constant(x)
            if arr is None:
                self.g.fail(f"'{node.name}' ({op}): parameter input {i} is not constant")
            elif op == "BatchNormalization" or (op == "PRelu" and arr.size > 1):
                self.param(node, i, x, axis, block)
            elif arr.size > 1:
                self.g.fail(f"'{node.name}' ({op}): non-scalar parameter")
        self.add(present(node.inputs[0]), axis, block)
        self.add(node.outputs[0], axis, block)

    def param(self, node: ir.Node, i: int, x: ir.Value, axis: int, block: int) -> None:
        """A constant broadcast against a group tensor of rank ``out_rank`` with channels on ``axis``."""
        out_rank = _rank(node.outputs[0]) or 0
        shape = list(tensor_of(x).shape)
        if node.op_type == "BatchNormalization":
            k = 0
        elif node.op_type == "PRelu" and len(shape) == 1 and shape[0] == self.g.channels and axis == 1:
            k = 0  # PRelu's slope broadcasts per channel
        else:
            k = axis - (out_rank - len(shape))
        if k < 0 or shape[k] == 1:
            return  # broadcast along the channels: nothing to cut
        if self.offset is not None:
            self.g.fail(f"'{node.name}': per-channel constant '{x.name}' on concatenated channels (not supported)")
            return
        if shape[k] != self.g.channels * block:
            self.g.fail(f"'{node.name}': constant '{x.name}' does not match the channel count")
            return
        self.g.slices.append(Slice(node, i, k, block))

    def binary(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        out = node.outputs[0]
        out_rank = _rank(out)
        if out_rank is None:
            self.g.fail(f"'{node.name}': output of unknown rank")
            return
        out_axis_ = axis + (out_rank - (_rank(v) or 0)) if v is not out else axis
        for i, x in enumerate(node.inputs):
            if x is None or x is v:
                continue
            if is_constant(x):
                self.param(node, i, x, out_axis_, block)
                continue
            r = _rank(x)
            k = None if r is None else out_axis_ - (out_rank - r)
            if self.offset is not None:
                self.g.fail(f"'{node.name}' ({node.op_type}) joins concatenated channels with another tensor")
            elif k is None:
                self.g.fail(f"'{node.name}' ({node.op_type}): '{x.name}' has an unknown rank")
            elif k >= 0 and present(x.shape)[k] != 1:  # the rank is known: so is the shape
                self.add(x, k, block)
            # else: x broadcasts along the channels (an attention mask over heads): nothing to cut
        self.add(out, out_axis_, block)

    def squeeze(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        axes = node_axes(node)
        rin, rout = _rank(present(node.inputs[0])), _rank(node.outputs[0])
        if axes is None or rin is None or rout is None:
            self.g.fail(f"'{node.name}' ({node.op_type}): axes or rank not known from the graph")
            return
        big = rin if node.op_type == "Squeeze" else rout  # the rank the axes refer to
        axes = sorted(a % big for a in axes)
        kept = [a for a in range(big) if a not in axes]
        squeezing_input = node.op_type == "Squeeze"
        if (v is node.inputs[0]) == squeezing_input:  # from the bigger side to the smaller
            if axis not in kept:
                self.g.fail(f"'{node.name}' removes the channel axis")
                return
            target, new_axis = (node.outputs[0] if squeezing_input else present(node.inputs[0])), kept.index(axis)
        else:
            target, new_axis = (present(node.inputs[0]) if squeezing_input else node.outputs[0]), kept[axis]
        self.add(target, new_axis, block)

    def flatten(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        x, y = present(node.inputs[0]), node.outputs[0]
        f = _attr(node, "axis", 1)
        rank = _rank(x)
        if rank is None or x.shape is None or self.offset is not None:
            self.g.fail(f"'{node.name}': input of unknown rank" if self.offset is None
                        else f"'{node.name}' (Flatten) of concatenated channels (not supported)")
            return
        f %= rank if f < 0 else rank + 1
        inner_dims = list(x.shape)[f + 1:] if f < rank else []
        if f >= rank or any(not isinstance(d, int) for d in inner_dims):
            self.g.fail(f"'{node.name}' (Flatten): the dims after the channels are not static")
            return
        inner = math.prod(d for d in inner_dims if isinstance(d, int))
        if v is x:
            if axis != f:
                self.g.fail(f"'{node.name}' (Flatten) merges the channel axis with the one before")
                return
            self.add(y, 1, block * inner)
        else:
            if axis != 1 or block % inner:
                self.g.fail(f"'{node.name}' (Flatten): channel blocks do not match")
                return
            self.add(x, f, block // inner)

    def concat(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        a = _attr(node, "axis", 0)
        rank = _rank(node.outputs[0])
        if rank is not None and a % rank == axis:
            self.window(node, v, axis)
            return
        if rank is None:
            self.g.fail(f"'{node.name}' ({node.op_type}): output of unknown rank")
            return
        if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None and not is_constant(node.inputs[1]):
            self.g.fail(f"'{node.name}' (Split): sizes not constant")
            return
        data = [present(node.inputs[0])] if node.op_type == "Split" else [x for x in node.inputs if x is not None]
        for x in [*data, *node.outputs]:
            if is_constant(x):
                self.g.fail(f"'{node.name}' (Concat) joins a constant")
            else:
                self.add(x, axis, block)


    def reshape(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        """Only the attention-head reshapes: ``[..., H*D] <-> [..., H, D]`` on the last axes, with a
        constant shape whose last entries are H, D (split) or H*D / -1 (merge)."""
        shape = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        x, y = present(node.inputs[0]), node.outputs[0]
        rx, ry = _rank(x), _rank(y)
        fail = f"'{node.name}' (Reshape) mixes or reshapes channels (not supported)"
        if shape is None or rx is None or ry is None or self.offset is not None:
            self.g.fail(fail)
            return
        s = [int(d) for d in shape.reshape(-1)]
        if ry == rx + 1 and len(s) == ry and s[-1] > 0 and s[-2] > 0:  # split
            d, h = s[-1], s[-2]
            if v is x and axis == rx - 1:
                if block == d and h == self.g.channels:
                    self.g.reshapes.append((node, len(s) - 2, 1))
                    self.add(y, ry - 2, 1)
                elif block == 1 and h * d == self.g.channels and self.g.head_dim is None:
                    self.g.head_dim = d
                    self.g.fail(f"'{node.name}' splits the channels into {h} heads of {d}")
                else:
                    self.g.fail(fail)
                return
            if v is y and axis == ry - 2 and block == 1 and h == self.g.channels:
                self.g.reshapes.append((node, len(s) - 2, 1))
                self.add(x, rx - 1, d)
                return
        last = x.shape[rx - 1] if x.shape is not None else None
        if rx == ry + 1 and len(s) == ry and isinstance(last, int):  # merge
            d = last
            if (v is x and axis == rx - 2 and block == 1) or (v is y and axis == ry - 1 and block == d):
                if s[-1] > 0:
                    self.g.reshapes.append((node, len(s) - 1, d))
                self.add(y, ry - 1, d) if v is x else self.add(x, rx - 2, 1)
                return
        self.g.fail(fail)

    def batched_matmul(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        """MatMul of two computed tensors (attention scores and context): channels on a batch axis
        (one matmul per head) pass through; on the last two axes they are contracted or mixed."""
        a, b, y = present(node.inputs[0]), present(node.inputs[1]), node.outputs[0]
        ranks = [_rank(t) for t in (a, b, y)]
        if any(r is None for r in ranks) or is_constant(a) or is_constant(b):
            self.g.fail(f"'{node.name}' (MatMul) of a constant or unknown rank")
            return
        ra, rb, ry = (int(r or 0) for r in ranks)
        own = ra if v is a else rb if v is b else ry
        if axis >= own - 2 or block != 1:
            self.g.fail(f"'{node.name}' (MatMul) contracts or mixes the channels")
            return
        out_axis_ = axis + (ry - own)
        for t, r in ((a, ra), (b, rb)):
            k = out_axis_ - (ry - r)
            if k >= 0 and t.shape is not None and t.shape[k] != 1:
                self.add(t, k, 1)
        self.add(y, out_axis_, 1)

    def window(self, node: ir.Node, v: ir.Value, axis: int) -> None:
        """Concat / Split along the channel axis: the group's channels become a window of the
        concatenation (forward through Concat), or stay whole inside one Split output."""
        start = self.offset or 0

        def dims(values) -> list[int] | None:
            out = [x.shape[axis] if x is not None and x.shape is not None else None for x in values]
            return [int(present(d)) for d in out] if all(isinstance(d, int) for d in out) else None

        if node.op_type == "Concat":
            if v is node.outputs[0]:
                self.g.fail(f"'{node.name}' (Concat) makes these channels from several tensors")
                return
            sizes = dims(node.inputs)
            if sizes is None:
                self.g.fail(f"'{node.name}' (Concat): input channel counts are not static")
                return
            index = next(i for i, x in enumerate(node.inputs) if x is v)
            self.add(node.outputs[0], axis, 1, start + sum(sizes[:index]))
            return
        if v is not node.inputs[0]:
            self.g.fail(f"'{node.name}' (Split) makes these channels from a longer tensor")
            return
        sizes = dims(node.outputs)
        if sizes is None:
            self.g.fail(f"'{node.name}' (Split): output channel counts are not static")
            return
        edges = np.cumsum([0, *sizes])
        inside = [j for j in range(len(sizes)) if edges[j] <= start and start + self.g.channels <= edges[j + 1]]
        if not inside:
            self.g.fail(f"'{node.name}' (Split) cuts these channels into several outputs (not supported)")
            return
        j = inside[0]
        out_offset = start - int(edges[j])
        whole = out_offset == 0 and sizes[j] == self.g.channels
        self.add(node.outputs[j], axis, 1, None if whole else out_offset)


def find_groups(model: ir.Model) -> list[Group]:
    """Every channel group of the main graph, in graph order of their first producer."""
    groups: list[Group] = []
    done: set[str] = set()
    for node in model.graph:
        if not is_layer(node) or node.outputs[0].name in done:
            continue
        g = Group(len(groups), channels_out(node))
        walk = _Walk(model.graph, g)
        walk.add(node.outputs[0], out_axis(node)[1], 1)
        walk.run()
        if g.head_dim and node.op_type != "Conv":  # attention: one channel per head, head_dim wide
            d = g.head_dim
            g = Group(len(groups), channels_out(node) // d, head_dim=d)
            walk = _Walk(model.graph, g)
            walk.add(node.outputs[0], out_axis(node)[1], d)
            walk.run()
        done |= set(g.tensors)
        if g.reason is None and not g.consumers:
            g.fail("no layer reads these channels")
        groups.append(g)
    return groups


# ---------------------------------------------------------------- removal

def _take(value: ir.Value | None, keep: np.ndarray, axis: int, block: int = 1) -> np.ndarray:
    idx = (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1) if block > 1 else keep
    return np.take(tensor_of(value).numpy(), idx, axis=axis)


def _in_window(keep: np.ndarray, channels: int, offset: int | None, full: int) -> np.ndarray:
    """Indices kept on a channel axis of ``full`` entries holding the group at ``offset``."""
    if offset is None:
        return keep
    return np.concatenate([np.arange(offset), offset + keep, np.arange(offset + channels, full)]).astype(np.int64)


def _set_input(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Input ``index`` of ``node`` becomes ``array`` (in place when only this node reads it)."""
    value = present(node.inputs[index])  # the input being replaced exists
    if value.is_initializer() and len(value.uses()) == 1:
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
        value.shape = ir.Shape(array.shape)
    else:
        node.replace_input_with(index, add_initializer(graph_of(node), f"{value.name}_pruned", np.ascontiguousarray(array)))


def remove(model: ir.Model, group: Group, keep: Iterable[int]) -> None:
    """Keep only the channels ``keep`` (indices into the group's current numbering) everywhere in
    ``group``.  The group must be resolved; its ``channels`` is updated."""
    assert group.reason is None, group.reason
    keep = np.asarray(sorted(set(int(k) for k in keep)), dtype=np.int64)
    for node in group.producers:
        w_axis, _ = out_axis(node)
        block = group.tensors[name_of(node.outputs[0])][1]
        _set_input(node, 1, _take(node.inputs[1], keep, w_axis, block))
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None \
                and node.inputs[2].const_value.size > 1:
            _set_input(node, 2, _take(node.inputs[2], keep, len(node.inputs[2].const_value.shape) - 1, block))
    for node, position, per in group.reshapes:
        shape = tensor_of(node.inputs[1]).numpy().copy()
        shape[position] = len(keep) * per
        _set_input(node, 1, shape)
    for node in group.tied:
        _set_input(node, 1, _take(node.inputs[1], keep, 0))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _set_input(node, 2, _take(node.inputs[2], keep, 0))
        node.attributes["group"] = ir.AttrInt64("group", len(keep))
    for s in group.slices:
        _set_input(s.node, s.index, _take(s.node.inputs[s.index], keep, s.axis, s.block))
    for node in group.consumers:
        w_axis, _ = in_axis(node)
        block = group.tensors[name_of(node.inputs[0])][1]
        full = int(tensor_of(node.inputs[1]).shape.numpy()[w_axis]) // block
        idx = _in_window(keep, group.channels, group.windows.get(name_of(node.inputs[0])), full)
        _set_input(node, 1, _take(node.inputs[1], idx, w_axis, block))
    values = {v.name: v for n in model.graph for v in (*n.inputs, *n.outputs) if v is not None}
    for name, (axis, block) in group.tensors.items():
        v = values.get(name)
        if v is not None and v.shape is not None:
            dims = list(v.shape)
            old = dims[axis]
            if name not in group.windows:
                dims[axis] = len(keep) * block
            elif isinstance(old, int):
                dims[axis] = old - (group.channels - len(keep))
            v.shape = ir.Shape(dims)
    group.channels = len(keep)


def weight_norms(group: Group, order: int = 1) -> np.ndarray:
    """Per channel: L1 (``order=1``) or L2 norm of the producers' and tied filters' weights."""
    total = np.zeros(group.channels)
    for node in [*group.producers, *group.tied]:
        w = tensor_of(node.inputs[1]).numpy().astype(np.float64)
        axis = out_axis(node)[0] if node in group.producers else 0
        w = np.moveaxis(w, axis, 0).reshape(group.channels, -1)
        total += np.abs(w).sum(1) if order == 1 else (w ** 2).sum(1)
    return total if order == 1 else np.sqrt(total)


def outgoing_norms(group: Group) -> np.ndarray:
    """Per channel: L2 norm of the weights that read it in every consumer."""
    total = np.zeros(group.channels)
    for node in group.consumers:
        w = tensor_of(node.inputs[1]).numpy().astype(np.float64)
        block = group.tensors[name_of(node.inputs[0])][1]
        w = np.moveaxis(w, in_axis(node)[0], 0)
        offset = group.windows.get(name_of(node.inputs[0]))
        if offset is not None:
            w = w[offset:offset + group.channels]
        total += (w.reshape(group.channels, block, -1) ** 2).sum((1, 2))
    return np.sqrt(total)


def kept_count(channels: int, fraction: float, align: int = 8) -> int:
    """Channels kept when ``fraction`` go, rounded to the nearest multiple of ``align`` (CPU kernels
    work on blocks of 8/16 channels; a ragged count can be slower) when there are at least
    4 * align (below that one step of ``align`` is too coarse: 16 channels at 0.3 would keep 8)."""
    keep = channels - int(round(fraction * channels))
    if align > 1 and channels >= 4 * align:
        keep = max(align, int(round(keep / align)) * align)
    return max(1, min(channels, keep))


class PruneChannels(OptPass):
    """Remove the ``fraction`` of channels with the smallest weight norm from every resolved group.

    Groups and what is cut: see the module docstring.  Importance: L1 (``criterion="l1"``) or L2
    norm of the producing filters; the data-driven criterion and the least-squares refit of the
    consumers need calibration data and live in ``onnxopt prune --channels`` (``onnxopt.compression.engine``).
    Kept counts are rounded to a multiple of ``align``.  Preserves graph inputs/outputs (a group
    reaching one is unresolved), opsets and metadata; never touches unresolved groups (reasons
    counted).  Lossy (outputs change): callers validate with a budget.  Not idempotent by nature
    (each run removes a fraction of what is left).  Cost: O(weights) + O(nodes) per group walk.
    """

    name = "prune-channels"

    def __init__(self, fraction: float = 0.3, criterion: str = "l1", align: int = 8):
        super().__init__()
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction {fraction} is outside [0, 1)")
        self.fraction, self.order, self.align = fraction, 1 if criterion == "l1" else 2, align

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        for g in find_groups(model):
            if g.reason is not None:
                skipped[g.reason] += 1
                continue
            n = kept_count(g.channels, self.fraction, self.align)
            if n < g.channels:
                keep = np.sort(np.argsort(-weight_norms(g, self.order), kind="stable")[:n])
                changed["channels removed"] += g.channels - n
                remove(model, g, keep)
        return self.result(model, changed, skipped)

"""Random valid ONNX graphs for differential fuzzing.

One construction (``build_case``) draws every decision from a ``Chooser``: ``HypothesisChooser``
wraps hypothesis' ``draw`` (shrinkable, used by ``graphs()``), ``RandomChooser`` wraps
``random.Random`` (fast, used by the soak runner).  A graph is a sequence of *blocks* over a
rank-4 float input ``x`` (dims ``[N, C, H, W]``, N/H/W symbolic or static): Conv/Gemm/MatMul
followed by size-1-broadcasting constants of every rank or BatchNormalization (fuse-affine),
exporter Shape->Gather->Unsqueeze->Concat->Reshape chains (fold-shapes), ops whose output shape
depends on values (Reduce* with ``axes`` as an input, NonZero, Unique, Compress, TopK, Range,
Tile, Expand, Slice, Pad, ConstantOfShape, OneHot, window ops, DFT) fed by integer graph inputs
directly or through Shape/Gather/Concat/Add/Mul chains, If and Loop subgraphs, and exporter
noise (Identity, Dropout, Constant nodes, duplicate initializers and subexpressions,
initializers listed as graph inputs, Transpose/Reshape/Squeeze/Unsqueeze/Cast chains, no-op
Concat/Slice/Pad/Expand/Tile, neutral elements, MatMul+Add).

A ``Case`` carries the model and how to feed it: the symbolic dim names and, for each integer or
bool input, >= 2 value sets (chosen so data-dependent shapes vary).  ``check_valid`` is the
filter: onnx.checker (full) and an ONNX Runtime CPU session must accept the model.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OPSETS = list(range(13, 22))
IR_VERSION = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
REDUCE_OPS = ["ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
              "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"]
NP2ONNX = {np.dtype(np.float32): T.FLOAT, np.dtype(np.int64): T.INT64, np.dtype(np.bool_): T.BOOL,
           np.dtype(np.int32): T.INT32, np.dtype(np.float64): T.DOUBLE}


# ----------------------------------------------------------------------------- choosers
class RandomChooser:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def choice(self, seq):
        seq = list(seq)
        return seq[self.r.randrange(len(seq))]

    def bool(self, p: float = 0.5) -> bool:
        return self.r.random() < p


class HypothesisChooser:
    def __init__(self, draw):
        from hypothesis import strategies as st
        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))

    def bool(self, p: float = 0.5) -> bool:
        # hypothesis shrinks booleans towards False: False is the "simpler" branch everywhere.
        if p >= 0.5:
            return self.draw(self.st.booleans())
        return self.draw(self.st.integers(0, max(1, round(1 / p) - 1))) == 1


# ----------------------------------------------------------------------------- case
@dataclasses.dataclass
class InputSpec:
    name: str
    kind: str  # "float" | "int" | "bool"
    dims: list  # int or symbolic name (float inputs); declared dims otherwise
    sets: list = dataclasses.field(default_factory=list)  # int/bool: >= 2 np arrays


@dataclasses.dataclass
class Case:
    model: onnx.ModelProto
    inputs: list[InputSpec]
    sym_dims: list[str]
    blocks: list[str]

    def describe(self) -> str:
        return f"opset {self.model.opset_import[0].version}, blocks {'+'.join(self.blocks)}"


@dataclasses.dataclass
class Val:
    name: str
    dtype: int
    dims: list  # int | str | None per axis; None = unknown (data-dependent); dims None = unknown rank


class Builder:
    def __init__(self, c, opset: int):
        self.c, self.opset = c, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.specs: list[InputSpec] = []
        self.outputs: list[Val] = []
        self.n = 0
        self.rng = np.random.default_rng(c.int(0, 2**31 - 1))
        self.last_init: onnx.TensorProto | None = None
        # a fully static model (every input dim fixed): the case where a probe run "measures" dims
        self.static = c.bool(0.3)

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, nodes=None, **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        (self.nodes if nodes is None else nodes).append(h.make_node(op, inputs, outs, **attrs))
        return outs

    def one(self, op, inputs, **attrs) -> str:
        return self.node(op, inputs, **attrs)[0]

    # constants: initializer, Constant node, initializer listed as input, duplicate initializer
    def const(self, arr: np.ndarray, overridable_ok: bool = False, nodes=None) -> str:
        arr = np.asarray(arr)
        how = self.c.choice(["init", "init", "constant", "dup", "input"] if overridable_ok else
                            ["init", "init", "constant", "dup"])
        if arr.dtype.kind == "f" and nodes is None and self.c.bool(0.1):
            how = "input"  # an initializer also listed as a graph input: users may override it
        name = self.fresh("c")
        if how == "constant" or nodes is not None:
            (self.nodes if nodes is None else nodes).append(
                h.make_node("Constant", [], [name], value=nh.from_array(arr, name + "_v")))
            return name
        t = nh.from_array(arr, name)
        self.inits.append(t)
        if how == "dup":  # an identical copy under another name
            d = nh.from_array(arr.copy(), self.fresh("dup"))
            self.inits.append(d)
            return self.c.choice([name, d.name])
        if how == "input":
            self.inputs.append(h.make_tensor_value_info(name, NP2ONNX[arr.dtype], list(arr.shape)))
        return name

    def weights(self, shape, scale=1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def ints(self, values) -> str:
        return self.const(np.array(values, np.int64))

    def int_input(self, sets: list, decl=None) -> str:
        """An int64 graph input with >= 2 value sets; declared dims static, symbolic or absent."""
        sets = [np.array(s, np.int64) for s in sets]
        name = self.fresh("k")
        rank = sets[0].ndim
        same_len = len({s.shape for s in sets}) == 1
        if self.static and same_len:
            decl = "static"
        elif decl is None or (decl == "static" and not same_len):
            opts = ["sym", "none"] + (["static"] if same_len else [])
            decl = self.c.choice(opts)
        if decl == "static":
            dims = list(sets[0].shape)
        elif decl == "sym":
            dims = [self.fresh("L") for _ in range(rank)] if rank else []
        else:
            dims = [None] * rank  # rank only (the checker requires a shape field)
        self.inputs.append(h.make_tensor_value_info(name, T.INT64, dims))
        self.specs.append(InputSpec(name, "int", dims, sets))
        return name

    def through_chain(self, v: str, scalar: bool = False) -> str:
        """Pass an int64 value through Identity/Add 0/Mul 1/Concat/Gather chains (same value)."""
        for _ in range(self.c.int(0, 2)):
            kind = self.c.choice(["add0", "mul1", "identity", "concat", "gather", "cast"])
            if kind == "add0":
                v = self.one("Add", [v, self.ints(0)])
            elif kind == "mul1":
                v = self.one("Mul", [self.ints(1), v])
            elif kind == "identity":
                v = self.one("Identity", [v])
            elif kind == "cast":
                v = self.one("Cast", [self.one("Cast", [v], to=T.INT32)], to=T.INT64)
            elif kind == "concat" and not scalar:
                v = self.one("Concat", [v, self.const(np.zeros((0,), np.int64))], axis=0)
            elif kind == "gather" and scalar:
                # scalar -> [s] -> Gather(idx 0) -> scalar
                u = self.one("Unsqueeze", [v, self.ints([0])])
                v = self.one("Gather", [u, self.ints(0)], axis=0)
        return v


def _vi(val: Val):
    return h.make_tensor_value_info(val.name, val.dtype, None)


# ----------------------------------------------------------------------------- blocks
def _affine_consts(b: Builder, y: Val, ch_axis: int, co: int) -> list[tuple]:
    rank = len(y.dims)
    shapes = [(), (1,), (1, 1), (1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1, 1), (co,), (1, co)]
    if rank >= 3 and ch_axis == 1:
        shapes += [(co, 1, 1)[: rank - 1], (1, co, 1, 1)[:rank], (1, 1, co, 1, 1), (1, co, 1, 1, 1)[: rank + 1]]
    if ch_axis == rank - 1:
        shapes += [(1,) * (rank - 1) + (co,), (1, 2, co), (2, co), (1,) * rank + (co,)]
    last = y.dims[-1]
    if isinstance(last, int) and last != co:
        shapes += [(last,), (1, 1, 1, last)]
    return shapes


def block_affine(b: Builder, x: Val) -> Val:
    """Conv/ConvTranspose/Gemm/MatMul then Mul/Add/Sub/Div by size-1 or per-channel constants, or BN."""
    c = b.c
    C = x.dims[1]
    co = c.choice([1, 2, 3, 4])
    prod = c.choice(["Conv", "Conv", "ConvTranspose", "Gemm", "MatMul", "MatMul3d"])
    if prod in ("Conv", "ConvTranspose"):
        k = c.choice([1, 3])
        group = c.choice([1, C]) if prod == "Conv" and co % C == 0 and C > 1 else 1
        wshape = (co, C // group, k, k) if prod == "Conv" else (C, co, k, k)
        ins = [x.name, b.const(b.weights(wshape, 0.5), overridable_ok=c.bool(0.1))]
        if c.bool():
            ins.append(b.const(b.weights((co,)), overridable_ok=c.bool(0.1)))
        y = Val(b.one(prod, ins, pads=[k // 2] * 4, group=group), T.FLOAT, [x.dims[0], co, x.dims[2], x.dims[3]])
        ch = 1
    elif prod == "Gemm":
        z = b.one("ReduceMean", [x.name, b.ints([2, 3])], keepdims=0) if b.opset >= 18 else \
            b.one("ReduceMean", [x.name], axes=[2, 3], keepdims=0)
        tb = c.bool()
        w = b.weights((co, C) if tb else (C, co), 0.5)
        ins = [z, b.const(w, overridable_ok=c.bool(0.1))]
        if c.bool(0.7):
            ins.append(b.const(b.weights(c.choice([(co,), (1, co), (), (1,)]))))
        y = Val(b.one("Gemm", ins, transB=int(tb), alpha=c.choice([1.0, 0.5])), T.FLOAT, [x.dims[0], co])
        ch = 1
    else:
        if prod == "MatMul":
            z = b.one("Flatten", [b.one("ReduceMax", [x.name], axes=[2, 3], keepdims=1) if b.opset < 18 else
                                  b.one("ReduceMax", [x.name, b.ints([2, 3])], keepdims=1)], axis=1)
            zd = [x.dims[0], C]
        else:
            z = b.one("Transpose", [x.name], perm=[0, 2, 3, 1])
            zd = [x.dims[0], x.dims[2], x.dims[3], C]
        y = Val(b.one("MatMul", [z, b.const(b.weights((C, co), 0.5))]), T.FLOAT, zd[:-1] + [co])
        ch = len(y.dims) - 1
        if c.bool():  # MatMul + Add (bias): simplify's MatMul+Add -> Gemm, fuse-affine's Add
            y = Val(b.one("Add", [y.name, b.const(b.weights(c.choice([(co,), (1, co)])))]), T.FLOAT, y.dims)
    for _ in range(c.int(1, 3)):
        kind = c.choice(["Mul", "Add", "Sub", "Div", "BN", "Mul", "Add"])
        if kind == "BN":
            if len(y.dims) < 2 or not isinstance(y.dims[1], int):
                continue  # (BN normalizes axis 1: after MatMul that is not the output channel)
            n = y.dims[1]
            ps = [b.const(b.weights((n,))), b.const(b.weights((n,))), b.const(b.weights((n,))),
                  b.const(np.abs(b.weights((n,))) + 0.1)]
            y = Val(b.one("BatchNormalization", [y.name] + ps, epsilon=c.choice([1e-5, 1e-3])), T.FLOAT, y.dims)
            continue
        shape = c.choice(_affine_consts(b, y, ch, co))
        arr = b.weights(shape) if kind != "Div" else (np.abs(b.weights(shape)) + 0.5).astype(np.float32)
        if c.bool(0.15):
            arr = np.full(shape, 1.0 if kind in ("Mul", "Div") else 0.0, np.float32)  # neutral
        cn = b.const(arr, overridable_ok=c.bool(0.1))
        ins = [y.name, cn] if (kind in ("Sub", "Div") and c.bool(0.75)) or c.bool() else [cn, y.name]
        out = b.one(kind, ins)
        r = max(len(y.dims), len(shape))
        dims = [None] * r
        yd = [1] * (r - len(y.dims)) + list(y.dims)
        sd = [1] * (r - len(shape)) + list(shape)
        dims = [a if s == 1 else (s if a == 1 else a) for a, s in zip(yd, sd)]
        ch += len(dims) - len(y.dims)
        y = Val(out, T.FLOAT, dims)
    if len(y.dims) == 4 and isinstance(y.dims[1], int):
        return y
    b.outputs.append(y)
    return x


def block_shape_chain(b: Builder, x: Val) -> Val:
    """Exporter pattern: Shape->Gather->Unsqueeze->Concat->Reshape (and back)."""
    c = b.c
    if b.opset >= 15 and c.bool(0.3):
        s = b.one("Shape", [x.name], start=0, end=c.choice([1, 2]))
        head = s
    else:
        s = b.one("Shape", [x.name])
        g0 = b.one("Gather", [s, b.ints(0)], axis=0)
        head = b.one("Unsqueeze", [g0, b.ints([0])])
        if c.bool(0.3):
            g1 = b.one("Gather", [s, b.ints([1])], axis=0)
            head = b.one("Concat", [head, g1], axis=0)
    form = c.choice(["flat", "hw", "neg1", "zero"])
    s2 = b.one("Shape", [x.name]) if c.bool() else s
    if form == "flat":
        target = b.one("Concat", [head, b.ints([-1])], axis=0)
    elif form == "hw":
        if _find(b, s2).attribute:  # Shape with start/end: take the full one
            s2 = b.one("Shape", [x.name])
        gh = b.one("Gather", [s2, b.ints(2)], axis=0)
        gw = b.one("Gather", [s2, b.ints(3)], axis=0)
        hw = b.one("Unsqueeze", [b.one("Mul", [gh, gw]), b.ints([0])])
        target = b.one("Concat", [head, b.ints([-1]), hw], axis=0) if c.bool() else \
            b.one("Concat", [head, hw, b.ints([-1])], axis=0)
    elif form == "neg1":
        target = b.one("Concat", [head, b.ints([0, -1]) if c.bool() else b.ints([-1, 1])], axis=0)
    else:
        target = b.one("Concat", [b.ints([0, 0]), b.ints([-1])], axis=0)
    r = b.one("Reshape", [x.name, target])
    if c.bool(0.3):
        b.outputs.append(Val(r, T.FLOAT, None))
    full_shape = s if _find(b, s) is not None and not _find(b, s).attribute else None
    back = full_shape if full_shape is not None and c.bool() else b.one("Shape", [x.name])
    y = b.one("Reshape", [b.one("Relu", [r]) if c.bool() else r, back])
    return Val(y, T.FLOAT, list(x.dims))


def block_shape_arith(b: Builder, x: Val) -> Val:
    """Integer arithmetic on Shape(x) (symbolic dims): negative Gather indices, Slices with
    negative starts/steps, Shape start/end, Add/Sub/Mul/Div, ReduceProd, Equal/Where, Max/Min;
    the vector is an output (as int64 or cast) and sometimes a Reshape target."""
    c = b.c
    if b.opset >= 15 and c.bool(0.3):
        s = b.one("Shape", [x.name], start=c.choice([-3, -2, 1, 0]), end=c.choice([-1, 4, 3, 10]))
    else:
        s = b.one("Shape", [x.name])
    v = s
    for _ in range(c.int(1, 4)):
        k = c.choice(["gather_neg", "slice_neg", "slice_rev", "add", "mul", "div", "sub", "prod", "where", "max",
                      "concat"])
        if k == "gather_neg":
            v = b.one("Gather", [v, b.ints([c.choice([-1, 0, -2])])], axis=0)
        elif k == "slice_neg":
            v = b.one("Slice", [v, b.ints([c.choice([-2, -3, 1])]), b.ints([INT64_MAX])])
        elif k == "slice_rev":
            v = b.one("Slice", [v, b.ints([-1]), b.ints([-INT64_MAX]), b.ints([0]), b.ints([-1])])
        elif k in ("add", "mul", "sub", "div"):
            op = {"add": "Add", "mul": "Mul", "sub": "Sub", "div": "Div"}[k]
            other = b.ints([c.choice([1, 2, 3])]) if c.bool() else b.one("Shape", [x.name])
            if op == "Div" and other != "" and other.startswith("shape"):
                other = b.ints([c.choice([1, 2])])
            v = b.one(op, [v, other])
        elif k == "prod":
            v = b.one("ReduceProd", [v], keepdims=1) if b.opset < 18 else b.one("ReduceProd", [v, b.ints([0])], keepdims=1)
        elif k == "where":
            eq = b.one("Equal", [v, b.ints([1])])
            v = b.one("Where", [eq, b.ints([c.choice([-1, 7])]), v])
        elif k == "max":
            v = b.one(c.choice(["Max", "Min"]), [v, b.ints([2])])
        elif k == "concat":
            v = b.one("Concat", [v, b.ints([c.choice([5, -1])])], axis=0)
    if c.bool():
        b.outputs.append(Val(b.one("Cast", [v], to=T.FLOAT), T.FLOAT, None))
    else:
        b.outputs.append(Val(b.one("Identity", [v]), T.INT64, None))
    if c.bool(0.3):  # Reshape x to [prod(dims) / ..., -1]-style targets built from the chain
        tgt = b.one("Concat", [b.one("Slice", [b.one("Shape", [x.name]), b.ints([0]), b.ints([1])]), b.ints([-1])], axis=0)
        b.outputs.append(Val(b.one("Reshape", [x.name, tgt]), T.FLOAT, None))
    return x


def block_second_input(b: Builder, x: Val) -> Val:
    """A second float input y[N, K] sharing x's batch dim (same symbolic name or same size):
    Shape chains across inputs, Reshape(x, [Shape(y)[0], -1]), Add(ReduceMean(x), y)."""
    c = b.c
    K = x.dims[1] if c.bool() else c.choice([1, 2, 5])
    name = b.fresh("y")
    dims = [x.dims[0], K]
    b.inputs.append(h.make_tensor_value_info(name, T.FLOAT, dims))
    b.specs.append(InputSpec(name, "float", dims))
    sy = b.one("Shape", [name])
    n0 = b.one("Slice", [sy, b.ints([0]), b.ints([1])]) if c.bool() else \
        b.one("Unsqueeze", [b.one("Gather", [sy, b.ints(0)], axis=0), b.ints([0])])
    r = b.one("Reshape", [x.name, b.one("Concat", [n0, b.ints([-1])], axis=0)])
    b.outputs.append(Val(r, T.FLOAT, None))
    if K == x.dims[1]:
        m = b.one("ReduceMean", [x.name], axes=[2, 3], keepdims=0) if b.opset < 18 else \
            b.one("ReduceMean", [x.name, b.ints([2, 3])], keepdims=0)
        b.outputs.append(Val(b.one("Add", [m, name]), T.FLOAT, None))
    else:  # y's dims feed an Expand of x's per-sample mean
        m = b.one("ReduceMean", [r], axes=[1], keepdims=1) if b.opset < 18 else \
            b.one("ReduceMean", [r, b.ints([1])], keepdims=1)
        b.outputs.append(Val(b.one("Expand", [m, sy]), T.FLOAT, None))
    return x


def _find(b: Builder, out: str):
    for n in b.nodes:
        if out in n.output:
            return n
    return None


def _axes_sets(c, rank: int) -> list:
    pool = [[1], [2, 3], [0], [-1], [3], [1, 2], [0, 2, 3], [-2]]
    if c.bool(0.3):
        return [[], [1]]  # empty axes: reduce all (or no-op with noop_with_empty_axes)
    a = c.choice(pool)
    rest = [p for p in pool if p != a]
    out = [a, c.choice(rest)]
    if c.bool():
        same = [p for p in rest if len(p) == len(a) and p != out[1]]
        out = [a, same[0]] if same else out
    return out


def block_reduce_axes(b: Builder, x: Val) -> Val:
    """Reduce* with ``axes`` from an integer graph input (data-dependent output shape)."""
    c = b.c
    ops = REDUCE_OPS if b.opset >= 18 else ["ReduceSum"]
    op = c.choice(ops)
    keep = c.choice([0, 1])
    axes = b.through_chain(b.int_input(_axes_sets(c, 4)))
    src = x.name if op not in ("ReduceLogSum",) else b.one("Abs", [x.name])
    attrs = {"keepdims": keep}
    if c.bool(0.3):
        attrs["noop_with_empty_axes"] = c.choice([0, 1])
    r = b.one(op, [src, axes], **attrs)
    _consume_dynamic(b, Val(r, T.FLOAT, None), x)
    return x


def _consume_dynamic(b: Builder, v: Val, x: Val) -> None:
    """Use a value of data-dependent shape: as output, via Shape (->Gather->...), in a Reshape."""
    c = b.c
    kind = c.choice(["out", "shape", "shape_gather", "reshape_x", "relu", "size", "shape_cast", "shape_rank",
                     "shape_expand"])
    if kind == "out":
        b.outputs.append(v)
    elif kind == "relu":
        b.outputs.append(Val(b.one("Relu", [v.name]) if v.dtype == T.FLOAT else v.name, v.dtype, None))
    elif kind == "size":
        b.outputs.append(Val(b.one("Size", [v.name]), T.INT64, []))
    elif kind == "shape":
        b.outputs.append(Val(b.one("Shape", [v.name]), T.INT64, None))
        if c.bool():
            b.outputs.append(v)
    elif kind == "shape_cast":  # Shape feeding an op (not a graph output itself)
        b.outputs.append(Val(b.one("Cast", [b.one("Shape", [v.name])], to=T.FLOAT), T.FLOAT, None))
    elif kind == "shape_rank":  # Shape -> Shape (the rank) -> Squeeze
        b.outputs.append(Val(b.one("Squeeze", [b.one("Shape", [b.one("Shape", [v.name])])]), T.INT64, []))
    elif kind == "shape_expand":  # Expand a constant to v's shape (exporter ones_like)
        ones = b.one("Expand", [b.const(np.array(1.0, np.float32)), b.one("Shape", [v.name])])
        b.outputs.append(Val(b.one("Mul", [ones, v.name]) if v.dtype == T.FLOAT else ones, T.FLOAT, None))
    elif kind == "shape_gather":
        s = b.one("Shape", [v.name])
        g = b.one("Gather", [s, b.ints([0])], axis=0)
        out = b.one("Concat", [g, b.ints([-1])], axis=0)
        b.outputs.append(Val(b.one("Reshape", [v.name, out]), v.dtype, None))
    else:
        # flatten v and count its elements through its Shape
        s = b.one("Shape", [v.name])
        size = b.one("ReduceProd", [s], keepdims=1) if b.opset < 18 else b.one("ReduceProd", [s, b.ints([0])], keepdims=1)
        b.outputs.append(Val(b.one("Reshape", [v.name, b.ints([-1])]), v.dtype, None))
        b.outputs.append(Val(size, T.INT64, None))


def block_dynamic(b: Builder, x: Val) -> Val:
    """One op whose output shape depends on input values, fed from integer inputs or data."""
    c = b.c
    ops = ["NonZero", "Unique", "Compress", "TopK", "Range", "Tile", "Expand", "Slice", "Pad",
           "ConstantOfShape", "OneHot", "ReshapeIn"]
    if b.opset >= 17:
        ops += ["HannWindow", "HammingWindow", "BlackmanWindow", "DFT"]
    op = c.choice(ops)
    C = x.dims[1]
    if op == "NonZero":
        m = b.one("Greater", [x.name, b.const(np.array(c.choice([0.0, 0.5, 1.0]), np.float32))])
        v = Val(b.one("NonZero", [m]), T.INT64, [4, None])
    elif op == "Unique":
        r = b.one("Round", [x.name])
        outs = b.node("Unique", [r], n_out=4, sorted=c.choice([0, 1]))
        if c.bool():
            b.outputs.append(Val(outs[1], T.INT64, None))
        v = Val(outs[0], T.FLOAT, [None])
    elif op == "Compress":
        n = c.int(1, C)
        sets = [np.array([c.bool() for _ in range(n)], np.bool_) for _ in range(2)]
        sets[1] = ~sets[0] if (sets[0] == sets[1]).all() else sets[1]
        name = b.fresh("m")
        decl = [n] if b.static or c.bool() else ["Lm"]
        b.inputs.append(h.make_tensor_value_info(name, T.BOOL, decl))
        b.specs.append(InputSpec(name, "bool", decl, sets))
        v = Val(b.one("Compress", [x.name, name], axis=1), T.FLOAT, None)
    elif op == "TopK":
        ksrc = c.choice(["input", "shape"])
        if ksrc == "input":
            k = b.through_chain(b.int_input([[1], [C]] if C > 1 else [[1], [0]], decl=c.choice(["static", "none"])))
        else:
            s = b.one("Shape", [x.name])
            k = b.one("Unsqueeze", [b.one("Gather", [s, b.ints(c.choice([0, 1]))], axis=0), b.ints([0])])
        outs = b.node("TopK", [x.name, k], n_out=2, axis=1, largest=c.choice([0, 1]))
        b.outputs.append(Val(outs[1], T.INT64, None))
        v = Val(outs[0], T.FLOAT, None)
    elif op == "Range":
        lim = b.through_chain(b.int_input([[3], [0]][:: c.choice([1, -1])] + [[5]], decl="static"))
        lim = b.one("Squeeze", [lim, b.ints([0])])
        rng = b.one("Range", [b.ints(0), lim, b.ints(c.choice([1, 2]))])
        v = Val(b.one("Cast", [rng], to=T.FLOAT), T.FLOAT, [None])
    elif op == "Tile":
        reps = b.through_chain(b.int_input([[1, 1, 1, 1], [2, 1, 1, 3], [1, 2, 1, 1]][: c.int(2, 3)], decl="static"))
        v = Val(b.one("Tile", [x.name, reps]), T.FLOAT, None)
    elif op == "Expand":
        if c.bool():
            shp = b.int_input([[1, 1, 1, 1], [1, C, 1, 1], [2, 1, 1, 1]][: c.int(2, 3)])
            v = Val(b.one("Expand", [x.name, b.through_chain(shp)]), T.FLOAT, None)
        else:  # Expand a per-channel constant to Shape(x) * [1,1,1,1] or with int input
            s = b.one("Shape", [x.name])
            if c.bool():
                s = b.one("Mul", [s, b.int_input([[1, 1, 1, 1], [1, 1, 2, 1]], decl="static")])
            v = Val(b.one("Expand", [b.const(b.weights((1, C, 1, 1))), s]), T.FLOAT, None)
    elif op == "Slice":
        starts = b.int_input([[0], [1], [-2]][: c.int(2, 3)], decl=c.choice(["static", "none"]))
        ends = b.int_input([[2], [100], [-1]][: c.int(2, 3)], decl=c.choice(["static", "none"]))
        ins = [x.name, b.through_chain(starts), ends]
        if c.bool():
            ins.append(b.ints([c.choice([1, 2, 3, -1])]))
        v = Val(b.one("Slice", ins), T.FLOAT, None)
    elif op == "Pad":
        pads = b.through_chain(b.int_input([[0] * 8, [0, 1, 0, 2, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]][: c.int(2, 3)],
                                           decl=c.choice(["static", "none"])))
        mode = c.choice(["constant", "constant", "edge", "reflect"])
        v = Val(b.one("Pad", [x.name, pads], mode=mode), T.FLOAT, None)
    elif op == "ConstantOfShape":
        shp = b.through_chain(b.int_input([[2, 3], [1, 0], [4, 1]][: c.int(2, 3)], decl=c.choice(["static", "none"])))
        v = Val(b.one("ConstantOfShape", [shp], value=nh.from_array(np.array([1.5], np.float32))), T.FLOAT, None)
        if c.bool():
            v = Val(b.one("Add", [v.name, b.const(b.weights((1,)))]), T.FLOAT, None)
    elif op == "OneHot":
        depth = b.through_chain(b.int_input([[3], [5], [1]][: c.int(2, 3)], decl="static"))
        idx = b.one("Cast", [b.one("Abs", [b.one("Round", [x.name])])], to=T.INT64)
        v = Val(b.one("OneHot", [idx, depth, b.const(np.array([0.0, 2.0], np.float32))], axis=c.choice([-1, 1])),
                T.FLOAT, None)
    elif op == "ReshapeIn":
        # Reshape(x, Concat(Shape(x)[0], k, [-1])) with k from an int input through an arithmetic chain
        k = b.int_input([[1], [C]] if C > 1 else [[1], [0]], decl=c.choice(["static", "none"]))
        k = b.one("Mul", [b.one("Add", [k, b.ints([0])]), b.ints([1])]) if c.bool() else b.through_chain(k)
        s = b.one("Shape", [x.name])
        n0 = b.one("Unsqueeze", [b.one("Gather", [s, b.ints(0)], axis=0), b.ints([0])])
        v = Val(b.one("Reshape", [x.name, b.one("Concat", [n0, k, b.ints([-1])], axis=0)]), T.FLOAT, None)
    elif op in ("HannWindow", "HammingWindow", "BlackmanWindow"):
        size = b.through_chain(b.int_input([4, 7, 1][: c.int(2, 3)], decl="static"), scalar=True)
        v = Val(b.one(op, [size], periodic=c.choice([0, 1])), T.FLOAT, [None])
    else:  # DFT over axis 1 of [N, C*H*W? ...]: signal [N, L, 1]
        sig = b.one("Reshape", [x.name, b.ints([0, -1, 1])])
        L = b.through_chain(b.int_input([4, 2, 8][: c.int(2, 3)], decl="static"), scalar=True)
        if b.opset >= 20:
            outs = b.one("DFT", [sig, L, b.ints(1)], onesided=c.choice([0, 1]))
        else:
            outs = b.one("DFT", [sig, L], axis=1, onesided=c.choice([0, 1]))
        v = Val(outs, T.FLOAT, None)
    _consume_dynamic(b, v, x)
    return x


def block_if(b: Builder, x: Val) -> Val:
    """If with outer-scope references; branches may produce different shapes."""
    c = b.c
    if c.bool():
        cname = b.fresh("cond")
        decl = []
        b.inputs.append(h.make_tensor_value_info(cname, T.BOOL, decl))
        b.specs.append(InputSpec(cname, "bool", decl, [np.array(True), np.array(False)]))
        cond = cname
    else:
        red = b.one("ReduceSum", [x.name], keepdims=0)
        cond = b.one("Greater", [red, b.const(np.array(0.0, np.float32))])
    tn: list = []
    k = b.fresh("k")
    tn.append(h.make_node("Constant", [], [k], value=nh.from_array(np.array(2.0, np.float32), k + "_v")))
    t1 = b.one("Mul", [x.name, k], nodes=tn)
    t2 = b.one("Identity", [t1], nodes=tn)
    if c.bool():  # duplicate subexpression inside the branch
        d1 = b.one("Relu", [t2], nodes=tn)
        d2 = b.one("Relu", [t2], nodes=tn)
        t2 = b.one("Add", [d1, d2], nodes=tn)
    if c.bool():  # an exporter shape chain inside the branch, on outer-scope x
        sh = b.one("Shape", [x.name], nodes=tn)
        g0 = b.one("Gather", [sh, b.one("Constant", [], nodes=tn, value=nh.from_array(np.array(0, np.int64)))], nodes=tn, axis=0)
        u = b.one("Unsqueeze", [g0, b.one("Constant", [], nodes=tn, value=nh.from_array(np.array([0], np.int64)))], nodes=tn)
        tgt = b.one("Concat", [u, b.one("Constant", [], nodes=tn, value=nh.from_array(np.array([-1], np.int64)))], nodes=tn, axis=0)
        t2 = b.one("Reshape", [b.one("Reshape", [t2, tgt], nodes=tn), sh], nodes=tn)
    en: list = []
    same_shape = c.bool()
    if same_shape:
        e = b.one("Neg", [x.name], nodes=en)
    else:
        e = b.one("ReduceMean", [x.name], nodes=en, axes=[1], keepdims=1) if b.opset < 18 else \
            b.one("ReduceMean", [x.name, b.one("Constant", [], nodes=en, value=nh.from_array(np.array([1], np.int64)))],
                  nodes=en, keepdims=1)
    e = b.one("Dropout", [e], nodes=en) if c.bool() else e
    then_g = h.make_graph(tn, b.fresh("then"), [], [h.make_tensor_value_info(t2, T.FLOAT, None)])
    else_g = h.make_graph(en, b.fresh("else"), [], [h.make_tensor_value_info(e, T.FLOAT, None)])
    out = b.one("If", [cond], then_branch=then_g, else_branch=else_g)
    y = Val(out, T.FLOAT, list(x.dims) if same_shape else None)
    if same_shape and c.bool():
        return y
    _consume_dynamic(b, y, x)
    return x


def block_loop(b: Builder, x: Val) -> Val:
    """Loop with a trip count from an int input; carried value + scan output (data-dependent length)."""
    c = b.c
    M = b.through_chain(b.int_input([2, 0, 3][: c.int(2, 3)], decl=c.choice(["static", "none"])), scalar=True)
    cond0 = b.const(np.array(True))
    i, ci, vi = b.fresh("i"), b.fresh("ci"), b.fresh("vi")
    bn: list = []
    co = b.one("Identity", [ci], nodes=bn)
    kk = b.fresh("kk")
    bn.append(h.make_node("Constant", [], [kk], value=nh.from_array(np.array(0.5, np.float32), kk + "_v")))
    vo = b.one("Add", [b.one("Mul", [vi, kk], nodes=bn), x.name], nodes=bn)
    so = b.one("ReduceSum", [vo], nodes=bn, keepdims=0)
    body = h.make_graph(bn, b.fresh("body"),
                        [h.make_tensor_value_info(i, T.INT64, []), h.make_tensor_value_info(ci, T.BOOL, []),
                         h.make_tensor_value_info(vi, T.FLOAT, None)],
                        [h.make_tensor_value_info(co, T.BOOL, []), h.make_tensor_value_info(vo, T.FLOAT, None),
                         h.make_tensor_value_info(so, T.FLOAT, None)])
    final, scan = b.node("Loop", [M, cond0, x.name], n_out=2, body=body)
    b.outputs.append(Val(scan, T.FLOAT, None))
    _consume_dynamic(b, Val(scan, T.FLOAT, None), x) if c.bool() else None
    return Val(final, T.FLOAT, list(x.dims))


def block_noise(b: Builder, x: Val) -> Val:
    """Exporter leftovers and no-ops on x (value-preserving; shapes preserved)."""
    c = b.c
    v = x.name
    for _ in range(c.int(1, 3)):
        kind = c.choice(["identity", "dropout", "transpose", "reshape", "unsq_sq", "cast", "concat1", "slice_full",
                         "pad0", "expand1", "tile1", "neutral", "dup", "const_chain", "flatten_back"])
        if kind == "identity":
            v = b.one("Identity", [v])
        elif kind == "dropout":
            v = b.one("Dropout", [v]) if c.bool() else b.node("Dropout", [v], n_out=2)[0]
        elif kind == "transpose":
            p = c.choice([[0, 2, 3, 1], [1, 0, 2, 3], [0, 1, 3, 2]])
            inv = list(np.argsort(p))
            v = b.one("Transpose", [b.one("Transpose", [v], perm=p)], perm=inv)
        elif kind == "reshape":
            t = b.one("Reshape", [v, b.ints([0, 0, -1])])
            v = b.one("Reshape", [t, b.one("Shape", [x.name])])
        elif kind == "unsq_sq":
            ax = c.choice([0, 2, 4, -1])
            v = b.one("Squeeze", [b.one("Unsqueeze", [v, b.ints([ax])]), b.ints([ax])])
        elif kind == "cast":
            v = b.one("Cast", [b.one("Cast", [v], to=T.DOUBLE)], to=T.FLOAT)
        elif kind == "concat1":
            v = b.one("Concat", [v], axis=c.choice([0, 1, -1]))
        elif kind == "slice_full":
            v = b.one("Slice", [v, b.ints([0]), b.ints([np.iinfo(np.int64).max]), b.ints([c.choice([1, 3])])])
        elif kind == "pad0":
            v = b.one("Pad", [v, b.ints([0] * 8)])
        elif kind == "expand1":
            v = b.one("Expand", [v, b.ints([1, 1, 1, 1] if c.bool() else [1])])
        elif kind == "tile1":
            v = b.one("Tile", [v, b.ints([1, 1, 1, 1])])
        elif kind == "neutral":
            op, val = c.choice([("Add", 0.0), ("Mul", 1.0), ("Sub", 0.0), ("Div", 1.0)])
            shape = c.choice([(), (1,), (1, 1, 1, 1)])
            v = b.one(op, [v, b.const(np.full(shape, val, np.float32))])
        elif kind == "dup":
            op = c.choice(["Relu", "Sigmoid", "Abs"])
            a1, a2 = b.one(op, [v]), b.one(op, [v])
            v = b.one(c.choice(["Add", "Mul", "Max"]), [a1, a2])
        elif kind == "const_chain":
            w1, w2 = b.const(b.weights((1,))), b.const(b.weights((1,)))
            v = b.one("Add", [b.one("Add", [v, w1]), w2])
        elif kind == "flatten_back":
            t = b.one("Flatten", [v], axis=c.choice([1, 2]))
            v = b.one("Reshape", [t, b.one("Shape", [x.name])])
    return Val(v, T.FLOAT, list(x.dims))


def block_elementwise(b: Builder, x: Val, pool: list[Val]) -> Val:
    c = b.c
    same = [p for p in pool if p.dims == x.dims and p.name != x.name]
    if same and c.bool():
        other = c.choice(same)
        return Val(b.one(c.choice(["Add", "Mul", "Sub", "Max"]), [x.name, other.name]), T.FLOAT, list(x.dims))
    op = c.choice(["Relu", "Tanh", "Sigmoid", "Neg", "Abs", "Erf_gelu", "HardSwish_dec"])
    if op == "Erf_gelu" and b.opset >= 13:
        d = b.one("Div", [x.name, b.const(np.array(1.4142135, np.float32))])
        e = b.one("Add", [b.one("Erf", [d]), b.const(np.array(1.0, np.float32))])
        return Val(b.one("Mul", [b.one("Mul", [x.name, e]), b.const(np.array(0.5, np.float32))]), T.FLOAT, list(x.dims))
    if op == "HardSwish_dec":
        hs = b.one("HardSigmoid", [x.name], alpha=1 / 6, beta=0.5)
        return Val(b.one("Mul", [x.name, hs]), T.FLOAT, list(x.dims))
    return Val(b.one(op, [x.name]), T.FLOAT, list(x.dims))


INT64_MAX = np.iinfo(np.int64).max


def block_traps(b: Builder, x: Val) -> Val:
    """Look-alikes of no-ops and fusable patterns that are NOT what they look like, and
    duplicates that must not be merged (same bytes, other shape/dtype; other subgraph)."""
    c = b.c
    v = x.name
    kind = c.choice(["reshape0", "cast_lossy", "transpose2", "slice_rev", "slice_step", "pad_neg", "expand_rank",
                     "neutral_rank", "neutral_left", "sq_other", "dedup_shape", "dedup_dtype", "cse_if",
                     "dropout_mask", "out_identity", "layernorm", "gelu_off", "concat_empty", "tile_rank_ok",
                     "reshape_chain_neg", "mul0", "cse_attr", "dedup_input", "pad_conv", "resize", "hardswish",
                     "layernorm"])
    dims = list(x.dims)
    if kind == "reshape0":  # Reshape(Reshape(x, a), b): b's 0 copies the *intermediate* dims
        a = c.choice([[0, -1], [0, 0, -1], [-1, 0, 0]])
        bb = c.choice([[-1, 0], [0, 0, 0, -1], [0, -1, 1], [-1, 0, 1]])
        v = b.one("Reshape", [b.one("Reshape", [v, b.ints(a)]), b.ints(bb)])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    if kind == "cast_lossy":
        to = c.choice([T.INT32, T.FLOAT16, T.BOOL, T.INT64, T.UINT8])
        v = b.one("Cast", [b.one("Cast", [v], to=to)], to=T.FLOAT)
    elif kind == "transpose2":
        perms = [[0, 2, 3, 1], [1, 0, 2, 3], [0, 1, 3, 2], [3, 2, 1, 0], [0, 3, 1, 2], [2, 0, 3, 1]]
        p1, p2 = c.choice(perms), c.choice(perms)
        v = b.one("Transpose", [b.one("Transpose", [v], perm=p1)], perm=p2)
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "slice_rev":  # full range but reversed: not a no-op
        v = b.one("Slice", [v, b.ints([-1]), b.ints([-INT64_MAX]), b.ints([c.choice([1, 2, 3])]), b.ints([-1])])
    elif kind == "slice_step":
        v = b.one("Slice", [v, b.ints([0]), b.ints([INT64_MAX]), b.ints([c.choice([1, 2, 3])]), b.ints([2])])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "pad_neg":  # negative pads crop
        v = b.one("Pad", [v, b.ints(c.choice([[0, 0, 0, 0, 0, 0, 0, -1], [0, 0, 0, -1, 0, 0, 0, 1]]))])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "expand_rank":  # Expand by ones of a higher rank adds dims
        v = b.one("Expand", [v, b.ints([1] * c.choice([5, 6]))])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "neutral_rank":  # x + 0 / x * 1 whose constant broadcasts x to more dims
        op, val = c.choice([("Add", 0.0), ("Mul", 1.0), ("Sub", 0.0), ("Div", 1.0)])
        shape = c.choice([(1, 1, 1, 1, 1), (2, 1, 1, 1), (1, 1, 1, 2), (1, 1, 1, 1, 1, 1)])
        v = b.one(op, [v, b.const(np.full(shape, val, np.float32))])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "neutral_left":  # 0 - x, 1 / x, 0 * x: not neutral
        op, val = c.choice([("Sub", 0.0), ("Div", 1.0), ("Mul", 0.0), ("Pow", 1.0)])
        ins = [b.const(np.array(val, np.float32)), v] if op != "Pow" else [v, b.const(np.array(val, np.float32))]
        v = b.one(op, ins)
    elif kind == "sq_other":  # Unsqueeze then Squeeze of another axis
        u = b.one("Unsqueeze", [v, b.ints([c.choice([0, 1])])])
        v = b.one("Squeeze", [u, b.ints([c.choice([0, 1, 2])])])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "dedup_shape":  # identical bytes, different shapes
        val = np.float32(c.choice([0.5, 2.0]))
        a1 = b.one("Mul", [v, b.const(np.array(val))])
        a2 = b.one("Mul", [v, b.const(np.full((1, 1, 1, 1, 1), val))])
        b.outputs.append(Val(a2, T.FLOAT, None))
        v = a1
    elif kind == "dedup_dtype":  # identical bytes, different dtypes
        f = np.array([1.0, 2.0], np.float32)
        i = f.view(np.int32).copy()
        t1 = b.const(f)
        t2 = b.const(i)
        b.outputs.append(Val(b.one("Cast", [t2], to=T.FLOAT), T.FLOAT, [2]))
        b.outputs.append(Val(b.one("Add", [b.one("ReduceSum", [v], keepdims=0), t1]), T.FLOAT, [2]))
    elif kind == "cse_if":  # two If nodes, same condition, different bodies: must not merge
        cond = b.one("Greater", [b.one("ReduceMean", [v], keepdims=0), b.const(np.array(-10.0, np.float32))])
        outs = []
        for k in (2.0, 3.0):
            tn, en = [], []
            t = b.one("Mul", [v, b.one("Constant", [], nodes=tn, value=nh.from_array(np.array(k, np.float32)))], nodes=tn)
            e = b.one("Neg", [v], nodes=en)
            outs.append(b.one("If", [cond], then_branch=h.make_graph(tn, b.fresh("t"), [], [h.make_tensor_value_info(t, T.FLOAT, None)]),
                              else_branch=h.make_graph(en, b.fresh("e"), [], [h.make_tensor_value_info(e, T.FLOAT, None)])))
        v = b.one("Sub", outs)
    elif kind == "dropout_mask":
        ins = [v] if b.opset < 13 or c.bool() else [v, b.const(np.array(0.0, np.float32)), b.const(np.array(False))]
        y, mask = b.node("Dropout", ins, n_out=2)
        b.outputs.append(Val(mask, T.BOOL, None))
        v = y
    elif kind == "out_identity":  # outputs that are Identity of an input / of each other
        i1 = b.one("Identity", ["x"])
        b.outputs.append(Val(i1, T.FLOAT, None))
        b.outputs.append(Val(b.one("Identity", [i1]), T.FLOAT, None))
    elif kind == "layernorm":  # decomposed normalization over axes that may not be a LayerNorm suffix
        axes = c.choice([[-1], [1], [2, 3], [-1]])
        def rmean(t):
            return b.one("ReduceMean", [t], axes=axes, keepdims=1) if b.opset < 18 else \
                b.one("ReduceMean", [t, b.ints(axes)], keepdims=1)
        d = b.one("Sub", [v, rmean(v)])
        var = rmean(b.one("Pow", [d, b.const(np.array(2.0, np.float32))]))
        n = b.one("Div", [d, b.one("Sqrt", [b.one("Add", [var, b.const(np.array(1e-5, np.float32))])])])
        last = dims[-1] if isinstance(dims[-1], int) else 1
        gshape = c.choice([(last,), (1,), ()])
        v = b.one("Add", [b.one("Mul", [n, b.const(b.weights(gshape))]), b.const(b.weights(gshape))])
    elif kind == "gelu_off":  # GELU with a wrong constant (must not become Gelu)
        d = b.one("Div", [v, b.const(np.array(c.choice([1.5, 1.4142135]), np.float32))])
        e = b.one("Add", [b.one("Erf", [d]), b.const(np.array(c.choice([1.0, 0.5]), np.float32))])
        v = b.one("Mul", [b.one("Mul", [v, e]), b.const(np.array(0.5, np.float32))])
    elif kind == "concat_empty":
        v = b.one("Concat", [v, b.const(np.zeros((0,) + tuple(d if isinstance(d, int) else 1 for d in dims[1:]), np.float32))], axis=0)
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "tile_rank_ok":
        v = b.one("Tile", [v, b.ints(c.choice([[1, 1, 1, 2], [2, 1, 1, 1]]))])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "reshape_chain_neg":  # Reshape(x, Shape(y)) where y is transposed x: same size, other dims
        t = b.one("Transpose", [v], perm=[0, 3, 2, 1])
        v = b.one("Reshape", [v, b.one("Shape", [t])])
        b.outputs.append(Val(v, T.FLOAT, None))
        return x
    elif kind == "cse_attr":  # same op and inputs, different attributes / input order
        variants = [
            lambda: b.one("LeakyRelu", [v], alpha=c.choice([0.1, 0.2])),
            lambda: b.one("Transpose", [v], perm=c.choice([[0, 1, 3, 2], [0, 2, 1, 3]])),
            lambda: b.one("ReduceSum", [v], keepdims=c.choice([0, 1])),
            lambda: b.one("Concat", c.choice([[v, "x"], ["x", v]]), axis=c.choice([0, 1])),
            lambda: b.one("Sub", c.choice([[v, "x"], ["x", v]])),
            lambda: b.one("Cast", [b.one("Cast", [v], to=c.choice([T.INT32, T.FLOAT16]))], to=T.FLOAT),
            lambda: b.one("Softmax", [v], axis=c.choice([1, -1])),
        ]
        f = c.choice(variants)
        b.outputs.append(Val(f(), T.FLOAT, None))
        b.outputs.append(Val(f(), T.FLOAT, None))
        return x
    elif kind == "dedup_input":  # an overridable initializer and its same-bytes twin, both used
        arr = b.weights(c.choice([(1,), (dims[1] if isinstance(dims[1], int) else 1, 1, 1)]))
        name = b.fresh("w_in")
        b.inits.append(nh.from_array(arr, name))
        b.inputs.append(h.make_tensor_value_info(name, T.FLOAT, list(arr.shape)))
        twin = b.fresh("w_twin")
        b.inits.append(nh.from_array(arr.copy(), twin))
        b.outputs.append(Val(b.one("Mul", [v, twin]), T.FLOAT, dims))
        v = b.one("Add", [v, name])
    elif kind == "pad_conv":  # Pad then Conv: only zero constant padding of the spatial axes folds
        C = dims[1]
        mode = c.choice(["constant", "constant", "reflect", "edge"])
        pads = c.choice([[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 1]])
        ins = [v, b.ints(pads)]
        if mode == "constant" and c.bool():
            ins.append(b.const(np.array(c.choice([0.0, 0.5]), np.float32)))
        p = b.one("Pad", ins, mode=mode)
        cin = C + pads[1] + pads[5]
        conv = b.one("Conv", [p, b.const(b.weights((2, cin, 3, 3), 0.5))], pads=c.choice([[0, 0, 0, 0], [1, 1, 1, 1]]))
        b.outputs.append(Val(conv, T.FLOAT, None))
        return x
    elif kind == "resize":
        mode = c.choice(["nearest", "linear"])
        if c.bool():
            scales = b.const(np.array(c.choice([[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 0.5]]), np.float32))
            ins = [v, "", scales]
        else:
            ins = [v, "", "", b.one("Shape", [v])]
        r = b.one("Resize", ins, mode=mode, coordinate_transformation_mode=c.choice(["half_pixel", "asymmetric", "align_corners"]))
        b.outputs.append(Val(r, T.FLOAT, None))
        return x
    elif kind == "hardswish":  # x * Clip(x + 3, 0, 6) / 6 and look-alikes
        hi = c.choice([6.0, 6.0, 5.0])
        add = b.one("Add", [v, b.const(np.array(3.0, np.float32))])
        clip = b.one("Clip", [add, b.const(np.array(0.0, np.float32)), b.const(np.array(hi, np.float32))])
        v = b.one("Div", [b.one("Mul", [v, clip]), b.const(np.array(6.0, np.float32))])
        if c.bool():
            v = b.one("Mul", [x.name, b.one("HardSigmoid", [x.name], alpha=c.choice([0.2, 1 / 6]))])
    elif kind == "mul0":
        v = b.one("Mul", [v, b.const(np.zeros((1,), np.float32))])
    return Val(v, T.FLOAT, dims)


# ----------------------------------------------------------------------------- issue 22 ("Graph round 2")
ROUND2_KINDS = ["concat_nest", "slices", "pad_pool", "rnn_zero", "mask_fill", "shape_parts", "repeat", "nhwc", "nhwc",
                "dense_nd"]


def _reduce(b: Builder, op: str, v: str, axes: list, keep: int) -> str:
    if op == "ReduceSum" and b.opset >= 13 or b.opset >= 18:
        return b.one(op, [v, b.ints(axes)], keepdims=keep)
    return b.one(op, [v], axes=axes, keepdims=keep)


def block_round2(b: Builder, x: Val) -> Val:
    """The patterns of issue 22 and their look-alikes: nested Concats (same/other axis), Slice chains
    (shared/disjoint/negative axes, negative and clamped bounds, steps), Pad before MaxPool/AveragePool
    (fills 0/-inf/0.5 after Relu/Tanh/Clip, own pads, ceil_mode, count_include_pad), LSTM/GRU with
    run-time zero (or not) states, neutral and non-neutral mask fills, Concats of Shape slices,
    Unsqueeze+Tile+Reshape repeats, and NHWC-style Transpose sandwiches around elementwise ops,
    Concat, Pad, Resize, Tile, Softmax, Reduce*, Unsqueeze+Reshape."""
    c = b.c
    kind = c.choice(ROUND2_KINDS)
    dims = list(x.dims)
    v = x.name
    if kind == "concat_nest":
        ai = c.choice([1, -3, 2, 3, 0])
        inner = b.one("Concat", [v, b.one("Relu", [v])], axis=ai)
        twin = b.one("Concat", [v, v], axis=ai)
        parts = [inner, twin] if c.bool() else [twin, inner]
        if c.bool(0.3):
            parts.append(inner)  # the inner Concat read twice by the outer one
        outer = b.one("Concat", parts, axis=c.choice([ai, 1, 2, -1]))
        if c.bool(0.2):
            b.outputs.append(Val(inner, T.FLOAT, None))  # the inner one has another user
        b.outputs.append(Val(outer, T.FLOAT, None))
        return x
    if kind == "slices":
        t = v
        for _ in range(c.int(2, 3)):
            n = c.int(1, 2)
            axes = []
            while len(axes) < n:
                a = c.choice([0, 1, 2, 3, -1, -2, -4])
                if a % 4 not in [q % 4 for q in axes]:
                    axes.append(a)
            starts = [c.choice([0, 1, 2, -1, -2, 5, -INT64_MAX]) for _ in axes]
            ends = [c.choice([1, 2, 3, INT64_MAX, -1, -INT64_MAX, 0]) for _ in axes]
            steps = [c.choice([1, 1, 1, 2, -1]) for _ in axes]
            ins = [t, b.ints(starts), b.ints(ends), b.ints(axes)]
            if c.bool(0.7) or any(st != 1 for st in steps):
                ins.append(b.ints(steps))
            t = b.one("Slice", ins)
            if c.bool(0.15):
                b.outputs.append(Val(t, T.FLOAT, None))
        if c.bool(0.4):  # one element taken, its axis squeezed (a Gather), or look-alikes
            a = c.choice([0, 1, 2, 3, -1])
            st = c.choice([0, 1, -1, -2, 3])
            en = c.choice([st + 1, st + 1, INT64_MAX, st + 2, 0])
            t = b.one("Squeeze", [b.one("Slice", [t, b.ints([st]), b.ints([en]), b.ints([a])]), b.ints([c.choice([a, a, a % 4, 0])])])
        b.outputs.append(Val(t, T.FLOAT, None))
        return x
    if kind == "pad_pool":
        src = c.choice(["Relu", "Tanh", "Clip", "Sigmoid", "none", "Relu"])
        if src == "Clip":
            lo = c.choice([0.0, -0.5])
            t = b.one("Clip", [v, b.const(np.array(lo, np.float32)), b.const(np.array(6.0, np.float32))])
        elif src != "none":
            t = b.one(src, [v])
        else:
            t = v
        pads = [0, 0, c.int(0, 2), c.int(0, 1), 0, 0, c.int(0, 1), c.int(0, 2)]
        if c.bool(0.1):
            pads[1] = 1  # a channel pad: never folded
        ins = [t, b.ints(pads)]
        fill = c.choice([None, 0.0, 0.0, -np.inf, 0.5, -1.0])
        if fill is not None:
            ins.append(b.const(np.array(fill, np.float32)))
        p = b.one("Pad", ins)
        op = c.choice(["MaxPool", "AveragePool"])
        k = c.choice([2, 3])
        attrs = {"kernel_shape": [k, k], "strides": [c.choice([1, 2])] * 2}
        if c.bool(0.4):
            attrs["pads"] = [c.int(0, k - 1) for _ in range(4)]
        if c.bool(0.2):
            attrs["ceil_mode"] = 1
        if op == "AveragePool" and c.bool():
            attrs["count_include_pad"] = c.choice([0, 1])
        b.outputs.append(Val(b.one(op, [p], **attrs), T.FLOAT, None))
        return x
    if kind == "rnn_zero":
        op, hidden = c.choice(["LSTM", "GRU"]), c.choice([2, 3])
        gates = {"LSTM": 4, "GRU": 3}[op]
        C = dims[1]
        seq = b.one("Unsqueeze", [_reduce(b, "ReduceMean", v, [2, 3], 0), b.ints([0])])  # [1, N, C]
        w = b.const(b.weights((1, gates * hidden, C), 0.5))
        r = b.const(b.weights((1, gates * hidden, hidden), 0.5))
        fill = np.array([c.choice([0.0, 0.0, 0.0, 0.25])], np.float32)
        batch = b.one("Slice", [b.one("Shape", [v]), b.ints([0]), b.ints([1])])
        form = c.choice(["expand", "cos", "concat"])
        if form == "cos":
            st = b.one("Concat", [b.ints([1]), batch, b.ints([hidden])], axis=0)
            z = b.one("ConstantOfShape", [st], value=nh.from_array(fill))
        elif form == "expand":
            st = b.one("Concat", [batch, b.ints([hidden])], axis=0)
            z = b.one("Unsqueeze", [b.one("Expand", [b.const(fill), st]), b.ints([0])])
        else:
            st = b.one("Concat", [b.ints([1]), batch, b.ints([1])], axis=0)
            z1 = b.one("Expand", [b.const(fill), st])
            z = b.one("Concat", [z1] * hidden, axis=2)
        if c.bool(0.2):
            z = b.one("Cast", [b.one("Cast", [z], to=T.DOUBLE)], to=T.FLOAT)
        states = [z, z] if op == "LSTM" else [z]
        ys, yh = b.node(op, [seq, w, r, "", "", *states], n_out=2, hidden_size=hidden)
        b.outputs.append(Val(ys, T.FLOAT, None))
        b.outputs.append(Val(yh, T.FLOAT, None))
        return x
    if kind == "mask_fill":
        m = b.one("Greater", [v, b.const(np.array(0.0, np.float32))])
        op, fill = c.choice([("And", True), ("Or", False), ("And", False), ("Or", True)])
        if c.bool(0.3):  # an absorbing constant (folds only where the result's dims are static)
            const = b.const(np.full(c.choice([(1,), (1, 1, 1, 1), (dims[3],) if isinstance(dims[3], int) else (1,)]), not (op == "And")))
            a = b.one(op, [m, const] if c.bool() else [const, m])
            b.outputs.append(Val(b.one("Where", [a, v, b.const(np.array(-1.0, np.float32))]), T.FLOAT, None))
            return x
        shape_src = c.choice(["x", "x", "wide", "narrow"])
        if shape_src == "x":
            s = b.one("Shape", [v])
        elif shape_src == "wide":
            s = b.one("Concat", [b.ints([2]), b.one("Shape", [v])], axis=0)
        else:
            s = b.ints([1, 1, 1])
        f = b.one("Expand", [b.const(np.array(fill)), s]) if c.bool(0.7) else \
            b.one("Cast", [b.one("ConstantOfShape", [s], value=nh.from_array(np.array([1.0 if fill else 0.0], np.float32)))], to=T.BOOL)
        a = b.one(op, [f, m] if c.bool() else [m, f])
        b.outputs.append(Val(b.one("Where", [a, v, b.const(np.array(-1.0, np.float32))]), T.FLOAT, None))
        return x
    if kind == "shape_parts":
        src = c.choice([v, b.one("Relu", [v])])
        s = b.one("Shape", [src])
        parts = []
        for _ in range(c.int(2, 4)):
            i = c.int(0, 3)
            form = c.choice(["gather", "gather1", "slice", "shape"] if b.opset >= 15 else ["gather", "gather1", "slice"])
            if form == "gather":
                parts.append(b.one("Unsqueeze", [b.one("Gather", [s, b.ints(c.choice([i, i - 4]))], axis=0), b.ints([0])]))
            elif form == "gather1":
                parts.append(b.one("Gather", [s, b.ints([i])], axis=0))
            elif form == "slice":
                parts.append(b.one("Slice", [s, b.ints([i]), b.ints([c.choice([i + 1, i + 2, INT64_MAX, -1])])]))
            else:
                parts.append(b.one("Shape", [src], start=i, end=c.choice([i + 1, i + 2, 4, -1])))
        if c.bool(0.3):
            parts.append(b.ints([7]))
        target = b.one("Concat", parts, axis=0)
        b.outputs.append(Val(b.one("Cast", [target], to=T.FLOAT), T.FLOAT, None))
        if c.bool(0.3):  # x's dims in order, as a Reshape target
            full = [b.one("Unsqueeze", [b.one("Gather", [s, b.ints(i)], axis=0), b.ints([0])]) for i in range(4)]
            b.outputs.append(Val(b.one("Reshape", [v, b.one("Concat", full, axis=0)]), T.FLOAT, None))
        return x
    if kind == "repeat":
        t, tdims = v, list(dims)
        for _ in range(c.int(1, 2)):
            a = c.choice([1, 2, 3])
            r = c.choice([2, 2, 4, 3])
            reps = [1] * 5
            reps[a + 1] = r
            if c.bool(0.1):
                reps[0] = 2  # also repeats the batch: not an element repeat
            u = b.one("Unsqueeze", [t, b.ints([a + 1])])
            tl = b.one("Tile", [u, b.ints(reps)])
            form = c.choice(["const", "shape", "wrong"])
            if form == "const":
                target = [0] * a + [-1] + [0] * (3 - a)
                if a + 1 <= 3:  # a 0 after the merged axes would copy the Tile's (shifted) dim: spell it out
                    target = [0] * a + [-1] + ([d if isinstance(d, int) else 0 for d in tdims[a + 1:]])
                tg = b.ints(target)
            else:
                sh = b.one("Shape", [t])
                mult = r if form == "shape" else r + 1
                parts = [b.one("Slice", [sh, b.ints([0]), b.ints([a])]),
                         b.one("Mul", [b.one("Slice", [sh, b.ints([a]), b.ints([a + 1])]), b.ints([mult])])]
                if a < 3:
                    parts.append(b.one("Slice", [sh, b.ints([a + 1]), b.ints([4])]))
                tg = b.one("Concat", parts, axis=0)
            t = b.one("Reshape", [tl, tg])
            tdims = [None] * 4
        b.outputs.append(Val(t, T.FLOAT, None))
        return x
    if kind == "dense_nd":  # Keras' Dense on N-D (tf2onnx Tensordot): flatten, MatMul, restore
        last = dims[3] if isinstance(dims[3], int) else None
        t = v if last is not None else b.one("Transpose", [v], perm=[0, 2, 3, 1])  # channels last: static
        k = last if last is not None else dims[1]
        n = c.choice([2, 5])
        flat = b.one("Reshape", [t, b.ints(c.choice([[-1, k], [-1, k], [0, -1]]))])
        mm = b.one("MatMul", [flat, b.const(b.weights((k, n), 0.5))])
        sh = b.one("Shape", [t])
        form = c.choice(["gather", "gather", "const", "wrong"])
        if form == "gather":
            lead = b.one("Gather", [b.one("Cast", [sh], to=T.INT32), b.const(np.array([0, 1, 2], np.int32))], axis=0)
            target = b.one("Cast", [b.one("Concat", [lead, b.const(np.array([n], np.int32))], axis=0)], to=T.INT64)
        elif form == "const":
            target = b.ints([-1, 1, 1, n] if c.bool() else [0, -1, n])
        else:
            target = b.one("Concat", [b.one("Slice", [sh, b.ints([0]), b.ints([2])]), b.ints([-1, n])], axis=0)
        b.outputs.append(Val(b.one("Reshape", [mm, target]), T.FLOAT, None))
        return x
    # nhwc: a Transpose, layout-agnostic ops, a Transpose back (or another permutation)
    perm = c.choice([[0, 2, 3, 1], [0, 2, 3, 1], [0, 3, 1, 2], [0, 1, 3, 2], [3, 2, 1, 0]])
    inv = [perm.index(i) for i in range(4)]
    t = b.one("Transpose", [v], perm=perm)
    td = [dims[p] for p in perm]
    rank = 4
    for _ in range(c.int(1, 3)):
        op = c.choice(["Relu", "Add", "Mul", "Concat", "Pad", "Resize", "Softmax", "Reduce", "Tile", "UnsqReshape", "Where"])
        if op == "Relu":
            t = b.one(c.choice(["Relu", "Sigmoid", "Neg"]), [t])
        elif op in ("Add", "Mul"):
            shapes = [(), (1,), (1, 1, 1, 1)] + [tuple(d if i == k else 1 for i, d in enumerate(td))
                                                 for k in range(rank) if isinstance(td[k], int)]
            if isinstance(td[-1], int):
                shapes.append((td[-1],))
            t = b.one(op, [t, b.const(b.weights(c.choice(shapes)))] if c.bool() else [b.const(b.weights(c.choice(shapes))), t])
        elif op == "Where":
            cond = b.const(b.rng.standard_normal(c.choice([(1,), (1, 1, 1, 1)])) > 0)
            t = b.one("Where", [cond, t, b.const(np.array(0.5, np.float32))])
        elif op == "Concat":
            other = b.one("Transpose", [b.one("Sigmoid", [v])], perm=perm if c.bool(0.8) else inv)
            ax = c.choice(list(range(rank)))
            t = b.one("Concat", [t, other] if c.bool() else [other, t], axis=c.choice([ax, ax - rank]))
            if isinstance(td[ax], int):
                td[ax] = td[ax] * 2
            else:
                td[ax] = None
        elif op == "Pad":
            pads = [c.int(0, 1) for _ in range(2 * rank)]
            t = b.one("Pad", [t, b.ints(pads)] + ([b.const(np.array(0.25, np.float32))] if c.bool() else []))
            td = [None] * rank
        elif op == "Resize":
            scales = np.array([1.0, c.choice([1.0, 2.0]), c.choice([1.0, 2.0, 0.5]), 1.0], np.float32)
            t = b.one("Resize", [t, "", b.const(scales)], mode=c.choice(["nearest", "linear"]))
            td = [None] * rank
        elif op == "Softmax":
            t = b.one(c.choice(["Softmax", "LogSoftmax"]), [t], axis=c.choice([-1, 1, 2]))
        elif op == "Tile":
            t = b.one("Tile", [t, b.ints([1, c.choice([1, 2]), 1, c.choice([1, 2])])])
            td = [None] * rank
        elif op == "Reduce":
            axes = c.choice([[1, 2], [-1], [2], [0, 3]])
            keep = c.choice([0, 1, 1])
            t = _reduce(b, c.choice(["ReduceMean", "ReduceSum", "ReduceMax"]), t, axes, keep)
            if not keep:
                rank -= len(axes)
                b.outputs.append(Val(t, T.FLOAT, None))
                return x
            td = [1 if (i in axes or i - rank in axes) else d for i, d in enumerate(td)]
        else:  # Unsqueeze a 1 at the end, then a Reshape merging it back (a merge, whatever the dims)
            u = b.one("Unsqueeze", [t, b.ints([4])])
            target = [0, 0, 0, -1] if c.bool() else [0, 0, -1, td[3] if isinstance(td[3], int) else 1]
            t = b.one("Reshape", [u, b.ints(target)])
            if target[3] != -1:
                td = [None] * rank
    back = inv if c.bool(0.8) else c.choice([perm, [0, 1, 2, 3], [1, 0, 2, 3]])
    y = b.one("Transpose", [t], perm=back)
    if c.bool(0.2):
        b.outputs.append(Val(t, T.FLOAT, None))  # the NHWC value is an output too
    b.outputs.append(Val(y, T.FLOAT, None))
    return x


BLOCKS = {
    "traps": block_traps, "second_input": block_second_input, "shape_arith": block_shape_arith, "affine": block_affine,
    "shape_chain": block_shape_chain, "reduce_axes": block_reduce_axes,
    "dynamic": block_dynamic, "if": block_if, "loop": block_loop, "noise": block_noise, "round2": block_round2,
}


def build_case(c, only: list[str] | None = None) -> Case:
    """A random case; ``only``: block kinds to draw from (e.g. ``["round2"]`` for a focused run)."""
    opset = c.choice(OPSETS)
    b = Builder(c, opset)
    C = c.choice([1, 2, 3, 4])
    dims: list = []
    syms: list[str] = []
    for nm in ["N", None, "H", "W"]:
        if nm is None:
            dims.append(C)
        elif not b.static and c.bool():
            dims.append(nm)
            syms.append(nm)
        else:
            dims.append(c.choice([1, 2, 3]))
    b.inputs.append(h.make_tensor_value_info("x", T.FLOAT, dims))
    b.specs.append(InputSpec("x", "float", dims))
    x = Val("x", T.FLOAT, dims)
    pool = [x]
    names = []
    for _ in range(c.int(1, 4)):
        kind = c.choice(only or list(BLOCKS) + ["elementwise", "affine", "dynamic", "reduce_axes", "traps", "round2"])
        names.append(kind)
        x = block_elementwise(b, x, pool) if kind == "elementwise" else BLOCKS[kind](b, x)
        pool.append(x)
    b.outputs.append(x)
    if c.bool(0.3) and len(pool) > 2:  # an intermediate as an extra output
        b.outputs.append(c.choice(pool[1:-1]))
    outs = list({o.name: o for o in b.outputs}.values())
    outs = [o for o in outs if o.name != "x"] or [Val(b.one("Identity", ["x"]), T.FLOAT, dims)]
    # unique input names; int inputs declared once
    graph = h.make_graph(b.nodes, "fuzz", b.inputs, [_vi(o) for o in outs], b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=IR_VERSION[opset],
                         producer_name="onnxopt-fuzz")
    sym_all = syms + sorted({d for s in b.specs if s.kind != "float" and s.dims for d in s.dims if isinstance(d, str)})
    case = Case(model, b.specs, sym_all, names)
    _ranks_from_ort(case)
    return case


def _ranks_from_ort(case: Case) -> None:
    """Declare each output's rank (unnamed dims; onnx.checker requires a shape) from an ORT run:
    onnx inference cannot tell it for Loop scans, If, data-dependent Reshape targets."""
    missing = list(case.model.graph.output)
    from tests.fuzz.oracle import points, run_points
    try:
        results = run_points(case.model.SerializeToString(), points(case))
    except Exception:  # noqa: BLE001
        return
    ranks: dict = {}
    for r in results:
        if isinstance(r, Exception):
            continue
        for o, a in zip(case.model.graph.output, r):
            ranks.setdefault(o.name, np.asarray(a).ndim)
    for o in missing:
        if o.name in ranks:
            shape = o.type.tensor_type.shape
            shape.SetInParent()
            for _ in range(ranks[o.name]):
                shape.dim.add()


def check_valid(case: Case) -> str | None:
    """None when onnx.checker (full) and an ORT CPU session accept the model, else the reason."""
    try:
        onnx.checker.check_model(case.model, full_check=True)
    except Exception as e:  # noqa: BLE001
        return f"checker: {str(e).splitlines()[0][:200]}"
    try:
        from tests.fuzz.oracle import session
        session(case.model.SerializeToString())
    except Exception as e:  # noqa: BLE001
        return f"ort: {str(e).splitlines()[0][:200]}"
    return None


def random_case(seed: int, only: list[str] | None = None) -> Case:
    return build_case(RandomChooser(seed), only)


def graphs(only: list[str] | None = None):
    """Hypothesis strategy of ``Case``s (valid ones only); ``only`` as for build_case."""
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def _cases(draw):
        case = build_case(HypothesisChooser(draw), only)
        assume(check_valid(case) is None)
        return case

    return _cases()

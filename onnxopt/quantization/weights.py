"""Weight quantization for transformer-style models (quantize ``--mode dynamic``, ``--weights int4``,
embeddings): the passes the quantize command applies on a prepared float model.

- ``QuantizeDynamic``: MatMul by a constant [K, N] float weight -> DynamicQuantizeLinear (activation
  quantized at run time to uint8, one per activation however many MatMuls read it) + MatMulInteger
  by int8 weights (symmetric, per output column) + Cast + Mul by ``x_scale * w_scale``, the form ORT
  fuses into ``DynamicQuantizeMatMul`` (MLAS u8s8 kernels) on the CPU EP; a fused com.microsoft
  ``Attention`` (``fuse-transformer``) -> DynamicQuantizeLinear + ``QAttention``.
- ``QuantizeInt4``: MatMul by a constant [K, N] float weight -> block-wise 4-bit weights (blocks of
  ``block_size`` along K, asymmetric uint4 with a zero point per block): com.microsoft
  ``MatMulNBits`` (``format="nbits"``, CPU EP) or int4 ``DequantizeLinear`` with ``block_size``
  (``format="qdq"``, needs opset 21) + MatMul.  Rounding is to nearest unless pre-rounded weights
  are given (``gptq``).
- ``QuantizeEmbeddings``: Gather on a constant float table [V, D] (axis 0) -> Gather on an int8 table
  + DequantizeLinear (per column of D, axis -1; standard ops, every EP), or with ``bits=4`` on the
  CPU EP com.microsoft ``GatherBlockQuantized`` (uint4 blocks along D with zero points).  A table
  tied to a dynamic-int8 weight (:func:`tied_tables`: the LM head reads ``W.T``) shares that int8
  copy: stored once as [V, D] int8 with a scale per row, the Gather reads it (+ Cast, Mul by the
  gathered row scales) and the head's MatMulInteger reads ``Transpose`` of it (ORT folds that
  Transpose at session start; the file holds one table).

Contract of the quantizing passes: only main-graph nodes in the standard domain whose weight is a
float32 initializer no user can override are touched (If/Loop bodies, custom-domain ops, fp16
weights are left alone, with a reason); graph outputs keep their names, types and shapes; a weight
shared by several nodes is quantized once; nodes named in ``exclude`` stay float.  Outputs change
by the rounding of the weights (and, dynamic, of the activations).  Cost: O(nodes + weights).
"""

from __future__ import annotations

import collections
import contextlib
import typing

import numpy as np
import onnx_ir as ir

from onnxopt.base import (
    NO_MATCH,
    FreshNames,
    Match,
    OptPass,
    constant,
    float_initializer,
    is_standard,
    name_of,
    new_initializer,
    node_name,
    node_output,
    replace_node,
    tensor_of,
)

FLOAT = ir.DataType.FLOAT
BLOCK_SIZES = (32, 64, 128)
#: int4 block ranges tried (fractions of [min, max]); 1.0 alone is plain min/max round-to-nearest
GRID_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
#: Gather tables smaller than this many elements stay float (position tables of tiny test models
#: still count; shape-index Gathers are integer and never match)
MIN_EMBEDDING = 1024
#: MatMulNBits' ``accuracy_level``: 4 = A quantized to int8 blockwise inside the kernel (the fast
#: CPU path), 0 = float A
NBITS_ACCURACY_LEVEL = 0


def weight_matmul(node: ir.Node) -> Match:
    """Match.ok((K, N)) for a main-graph MatMul ``x @ W`` with W a float32 [K, N] initializer and x
    a float activation."""
    if node.op_type != "MatMul" or not is_standard(node) or len(node.inputs) != 2:
        return NO_MATCH
    x, w = node.inputs
    if not float_initializer(w):
        return Match.fail("weight is not a float32 initializer")
    if len(tensor_of(w).shape) != 2:
        return Match.fail("weight is not 2-D")
    if x is None or x.const_value is not None or (x.dtype is not None and x.dtype != FLOAT):
        return Match.fail("activation input is constant or not float32")
    k, n = tensor_of(w).shape.numpy()
    return Match.ok((int(k), int(n)))


def weight_matmuls(model: ir.Model, exclude=frozenset()) -> dict[str, tuple[int, int]]:
    """Name -> (K, N) of every MatMul the quantizers reach (main graph, named nodes)."""
    return {node_name(n): typing.cast(tuple[int, int], m.value) for n in model.graph
            if n.name not in exclude and (m := weight_matmul(n)).succeeded}


# ---------------------------------------------------------------- weight rounding helpers

#: bytes of float64 one step of :func:`int8_columns` works on (a 151,936-row LM head is 1.1 GB in float64)
CHUNK_BYTES = 32 << 20


def int8_columns(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (q int8 [K, N], scale float32 [N]).
    Computed in float64 over column chunks of CHUNK_BYTES: the same codes as over the whole weight,
    without a float64 copy of it and its temporaries (any float dtype in; a memory-mapped weight is
    read chunk by chunk)."""
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    scale = np.empty(n, np.float32)
    step = max(1, CHUNK_BYTES // (8 * max(k, 1)))
    for c in range(0, n, step):
        part = np.asarray(w[:, c:c + step], np.float64)
        s = (np.abs(part).max(axis=0) / qmax).astype(np.float32) if k else np.ones(part.shape[1], np.float32)
        s[s == 0] = 1.0
        q[:, c:c + step] = np.clip(np.round(part / s), -qmax, qmax).astype(np.int8)
        scale[c:c + step] = s
    return q, scale


def release(value: ir.Value | None) -> None:
    """Unmap a weight read from an external-data file once it is quantized (read again, lazily, if a
    later build needs it): a pass over every weight keeps none of their pages resident."""
    tensor = value.const_value if value is not None else None
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a numpy view of the map is alive elsewhere
            tensor.release()


def block_grid(w: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric ``bits``-bit grid per block of ``block`` rows (K) and column of a [K, N] weight:
    (scale float32 [K/block, N], zero point uint8 in [0, 2^bits - 1] [K/block, N]).  Each block's range
    [min, max] (widened to include 0) is shrunk by the factor in GRID_SHRINK that gives the least
    squared rounding error of that block (a clipped range rounds the bulk of a Gaussian-like
    block more finely than its two extremes cost)."""
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    lo0 = np.minimum(blocks.min(axis=1), 0.0)
    hi0 = np.maximum(blocks.max(axis=1), 0.0)
    best = (np.full(lo0.shape, np.inf), np.ones(lo0.shape, np.float32), np.zeros(lo0.shape, np.uint8))
    top = 2 ** bits - 1
    for f in GRID_SHRINK:
        scale = ((hi0 - lo0) * f / top).astype(np.float32)
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-lo0 * f / scale), 0, top).astype(np.uint8)
        q = np.clip(np.round(blocks / scale[:, None]) + zero[:, None], 0, top)
        err = (((q - zero[:, None]) * scale[:, None] - blocks) ** 2).sum(axis=1)
        better = err < best[0]
        best = (np.where(better, err, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2]))
    return best[1].astype(np.float32), best[2].astype(np.uint8)


def block_round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, block: int, bits: int = 4) -> np.ndarray:
    """Round-to-nearest codes (uint8 in [0, 2^bits - 1], [K, N]) of ``w`` on the grid of :func:`block_grid`."""
    s = np.repeat(scale, block, axis=0)
    z = np.repeat(zero, block, axis=0).astype(np.float64)
    return np.clip(np.round(w / s) + z, 0, 2 ** bits - 1).astype(np.uint8)


def block_dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block: int) -> np.ndarray:
    return (q.astype(np.float64) - np.repeat(zero, block, axis=0)) * np.repeat(scale, block, axis=0)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes in [0, 15] along the last axis (even length) -> bytes, first code in the low nibble."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def check_block_size(block: int, shapes: dict[str, tuple[int, int]]) -> tuple[str | None, dict[str, tuple[int, int]]]:
    """(None, or one line saying why ``block`` cannot quantize any of these [K, N] weights; the weights
    whose K it does not divide, which stay float while the others are quantized)."""
    if block not in BLOCK_SIZES:
        return f"--block-size {block}: choose 32, 64 or 128", {}
    bad = {name: kn for name, kn in shapes.items() if kn[0] % block}
    if bad and len(bad) == len(shapes):
        name, (k, n) = next(iter(bad.items()))
        return (f"--block-size {block} divides the K of no weight MatMul (e.g. K={k} of '{name}', weight [{k}, {n}]); "
                f"choose a block size dividing K"), bad
    return None, bad


# ---------------------------------------------------------------- dynamic int8

#: Attention attributes QAttention has too (qkv_hidden_sizes, rotary_embedding_dim... it has not)
QATTENTION_ATTRIBUTES = frozenset({"num_heads", "unidirectional", "do_rotary", "mask_filter_value", "scale",
                                   "past_present_share_buffer"})


def fused_attention(node: ir.Node) -> Match:
    """Match.ok() for a com.microsoft Attention (from ``fuse-transformer``) that QAttention can
    take: constant float [hidden, 3 * hidden] weights and bias, an int32 mask or none, no
    attention_bias / past_sequence_length inputs, no attribute QAttention lacks."""
    if node.op_type != "Attention" or node.domain != "com.microsoft" or len(node.inputs) < 3:
        return NO_MATCH
    w, bias = node.inputs[1], node.inputs[2]
    if not float_initializer(w) or len(tensor_of(w).shape) != 2 or not float_initializer(bias):
        return Match.fail("weights or bias not float32 initializers")
    if any(v is not None for v in node.inputs[5:]):
        return Match.fail("attention_bias / past_sequence_length inputs (QAttention has none)")
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.dtype != ir.DataType.INT32:
        return Match.fail("mask is not int32 (QAttention's mask_index)")
    extra = set(node.attributes) - QATTENTION_ATTRIBUTES
    if extra:
        return Match.fail(f"attribute {sorted(extra)[0]} (QAttention has none)")
    return Match.ok()

class QuantizeDynamic(OptPass):
    """Weight MatMuls -> DynamicQuantizeLinear + MatMulInteger (int8 weights per column) + scale Mul.

    See the module docstring for the contract.  ``qmax``: 127, or 63 where MLAS's u8s8 kernel adds
    products in int16 (``quantize_qdq.weight_qmax``)."""

    name = "quantize-dynamic"

    def __init__(self, qmax: int = 127, exclude=frozenset()):
        super().__init__()
        self.qmax, self.exclude = qmax, frozenset(exclude)
        #: after a call: float weight name -> its (int8 [K, N], scale [N], zero point [N]) initializers
        self.weights: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        weights: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        activations: dict[str, list[ir.Value]] = {}
        graph = model.graph
        for node in list(graph):
            if node.name in self.exclude:
                continue
            if node.op_type == "Attention" and node.domain == "com.microsoft":
                match = fused_attention(node)
                if match.succeeded:
                    match = self._attention(graph, node, names, activations)
                match.tally(changed, skipped, "Attention -> QAttention", "Attention")
                continue
            match = weight_matmul(node)
            if match.succeeded:
                weight = node.inputs[1]
                match = self._rewrite(graph, node, names, weights, activations)
                release(weight)
            match.tally(changed, skipped, "MatMul -> MatMulInteger", "MatMul")
        changed["int8 weights"] = len(weights)
        changed["activations quantized at run time"] = len(activations)
        self.weights = weights
        return self.result(model, changed, skipped)

    def _quantized_input(self, x: ir.Value, names: FreshNames, activations) -> list[ir.Node]:
        """DynamicQuantizeLinear of ``x`` (once per activation); returns the node to insert, if new."""
        if x.name in activations:
            return []
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=names.node(f"{x.name}_DynamicQuantizeLinear"))
        for o, suffix, dt in zip(dql.outputs, ("quantized", "scale", "zero_point"), (ir.DataType.UINT8, FLOAT, ir.DataType.UINT8)):
            o.name, o.type = names.value(f"{x.name}_{suffix}"), ir.TensorType(dt)
        dql.outputs[0].shape = x.shape
        activations[x.name] = list(dql.outputs)
        return [dql]

    def _attention(self, graph, node, names, activations) -> Match:
        """com.microsoft Attention -> DynamicQuantizeLinear + QAttention (int8 weights per column)."""
        x, w, bias = node.inputs[0], node.inputs[1], node.inputs[2]
        q, s = int8_columns(constant(w), self.qmax)
        new = self._quantized_input(x, names, activations)
        xq, xs, xz = activations[x.name]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        past = node.inputs[4] if len(node.inputs) > 4 else None
        inputs = [xq, new_initializer(graph, names, f"{w.name}_int8", q), bias, xs,
                  new_initializer(graph, names, f"{w.name}_scale", s), mask, xz,
                  new_initializer(graph, names, f"{w.name}_zero_point", np.zeros(s.shape, np.int8)), past]
        while inputs[-1] is None:
            inputs.pop()
        attrs = {k: a.value for k, a in node.attributes.items() if k in QATTENTION_ATTRIBUTES}
        qa = ir.node("QAttention", inputs, attributes=attrs, num_outputs=len(node.outputs), domain="com.microsoft",
                     name=names.node(f"{node.name}_QAttention"))
        graph.insert_before(node, [*new, qa])
        for old, out in zip(node.outputs, qa.outputs):
            out.name, out.type, out.shape = names.value(f"{old.name}_q"), old.type, old.shape
        if any(o.is_graph_output() for o in node.outputs):
            graph.remove([qa, *new], safe=True)
            if new:
                del activations[x.name]
            return Match.fail("an output is a graph output")
        for old, out in zip(node.outputs, qa.outputs):
            old.replace_all_uses_with(out)
        graph.remove(node, safe=True)
        return Match.ok()

    def _rewrite(self, graph, node, names, weights, activations) -> Match:
        x, w = node.inputs
        if w.name not in weights:
            q, s = int8_columns(constant(w), self.qmax)
            weights[w.name] = (new_initializer(graph, names, f"{w.name}_int8", q), new_initializer(graph, names, f"{w.name}_scale", s),
                               new_initializer(graph, names, f"{w.name}_zero_point", np.zeros(s.shape, np.int8)))
        wq, ws, wz = weights[w.name]
        new: list[ir.Node] = self._quantized_input(x, names, activations)
        xq, xs, xz = activations[x.name]
        mmi = ir.node("MatMulInteger", [xq, wq, xz, wz], name=names.node(f"{node.name}_MatMulInteger"))
        cast = ir.node("Cast", [node_output(mmi, names, f"{node.name}_int32", ir.DataType.INT32)], {"to": FLOAT},
                       name=names.node(f"{node.name}_Cast"))
        scale = ir.node("Mul", [xs, ws], name=names.node(f"{node.name}_scale_Mul"))
        mul = ir.node("Mul", [node_output(cast, names, f"{node.name}_float", FLOAT),
                              node_output(scale, names, f"{node.name}_scale", FLOAT)],
                      name=names.node(f"{node.name}_Mul"))
        new += [mmi, cast, scale, mul]
        reason = replace_node(graph, node, new, node_output(mul, names, f"{node.name}_output", FLOAT))
        if reason is not None and new[0].op_type == "DynamicQuantizeLinear":
            del activations[x.name]
        return Match.ok() if reason is None else Match.fail(reason)


# ---------------------------------------------------------------- int4 weight-only

#: ops an output head's result may pass through to a graph output (bias, layout)
HEAD_PASSTHROUGH = frozenset({"Add", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"})


def output_heads(model: ir.Model, matmuls) -> set[str]:
    """Names of the weight MatMuls (of ``matmuls``) whose result reaches a graph output through
    bias/layout ops only (HEAD_PASSTHROUGH): the LM head or classifier, whose rounding error no
    later layer averages out."""
    heads: set[str] = set()
    for out in model.graph.outputs:
        node = out.producer()
        while node is not None and node.name not in matmuls and node.op_type in HEAD_PASSTHROUGH and node.inputs:
            node = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None), None)
        if node is not None and node.name in matmuls:
            heads.add(node_name(node))
    return heads


class QuantizeInt4(OptPass):
    """Weight MatMuls -> 4-bit block-wise weights: MatMulNBits (``format="nbits"``) or int4
    DequantizeLinear + MatMul (``format="qdq"``, the model's opset must be >= 21).

    ``rounded``: optional codes by weight name ((uint8 codes [K, N], scale, zero point) from
    calibration-aware rounding); others round to nearest, and their codes are added to it (a caller
    building many candidates passes the same dict: each weight's grid is searched once).  ``bits``: node name -> 8 for the nodes
    kept at 8 bits (block-wise too; e.g. the output head, see :func:`output_heads`), 4 otherwise.  A K that ``block_size`` does not divide
    is declined with the reason (the command refuses such a block size up front).  See the module
    docstring for the contract."""

    name = "quantize-int4"

    def __init__(self, block_size: int = 32, fmt: str = "nbits", exclude=frozenset(),
                 rounded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                 bits: dict[str, int] | None = None):
        super().__init__()
        # the caller's dict itself, even empty: codes rounded to nearest are kept there for its next build
        self.block, self.fmt, self.exclude = block_size, fmt, frozenset(exclude)
        self.rounded = rounded if rounded is not None else {}
        self.bits = bits or {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        done: dict[str, tuple[ir.Value, ...]] = {}
        if self.fmt == "nbits":
            model.opset_imports.setdefault("com.microsoft", 1)
        for node in list(model.graph):
            match = weight_matmul(node) if node.name not in self.exclude else NO_MATCH
            if match.succeeded and typing.cast(tuple[int, int], match.value)[0] % self.block:
                match = Match.fail(f"block size {self.block} does not divide K")
            if match.succeeded:
                weight = node.inputs[1]
                match = self._rewrite(model.graph, node, names, done)
                release(weight)
            match.tally(changed, skipped, f"MatMul -> {'MatMulNBits' if self.fmt == 'nbits' else 'int4 DQ + MatMul'}",
                        "MatMul")
        changed["int4 weights"] = sum(1 for key in done if key[1] == 4)
        changed["8-bit weights"] = sum(1 for key in done if key[1] == 8)
        return self.result(model, changed, skipped)

    def codes(self, w: ir.Value, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = f"{w.name}/{bits}"
        if key not in self.rounded:  # the grid search is most of a build: once per weight and width
            arr = constant(w).astype(np.float64)
            scale, zero = block_grid(arr, self.block, bits)
            self.rounded[key] = block_round(arr, scale, zero, self.block, bits), scale, zero
        return self.rounded[key]

    def _rewrite(self, graph, node, names, done) -> Match:
        x, w = node.inputs
        k, n = w.const_value.shape
        bits = self.bits.get(node.name, 4)
        key = (w.name, bits)
        if key not in done:
            q, scale, zero = self.codes(w, bits)
            done[key] = self._weights(graph, names, w.name, q, scale, zero, k, n, bits)
        if self.fmt == "nbits":
            b, s, z = done[key]
            mm = ir.node("MatMulNBits", [x, b, s, z], {"K": k, "N": n, "bits": bits, "block_size": self.block,
                                                       "accuracy_level": NBITS_ACCURACY_LEVEL},
                         domain="com.microsoft", name=names.node(f"{node.name}_MatMulNBits"))
            new = [mm]
        else:
            dq = ir.node("DequantizeLinear", list(done[key]), {"axis": 0, "block_size": self.block},
                         name=names.node(f"{w.name}_DequantizeLinear"))
            dq.outputs[0].shape = ir.Shape([k, n])
            mm = ir.node("MatMul", [x, node_output(dq, names, f"{w.name}_dequantized", FLOAT)], name=names.node(f"{node.name}_int4"))
            new = [dq, mm]
        reason = replace_node(graph, node, new, node_output(mm, names, f"{node.name}_output", FLOAT))
        return Match.ok() if reason is None else Match.fail(reason)

    def _weights(self, graph, names, name, q, scale, zero, k, n, bits) -> tuple[ir.Value, ...]:
        blocks = k // self.block
        if bits == 8:  # one byte per code and per zero point
            if self.fmt == "nbits":
                return (new_initializer(graph, names, f"{name}_nbits8", np.ascontiguousarray(q.T.reshape(n, blocks, self.block))),
                        new_initializer(graph, names, f"{name}_scales", np.ascontiguousarray(scale.T).reshape(-1)),
                        new_initializer(graph, names, f"{name}_zero_points", np.ascontiguousarray(zero.T).reshape(-1)))
            return (new_initializer(graph, names, f"{name}_uint8", q), new_initializer(graph, names, f"{name}_scale", scale),
                    new_initializer(graph, names, f"{name}_zero_point", zero))
        if self.fmt == "nbits":  # B [N, blocks, block/2] uint8, scales [N * blocks], zero points [N, ceil(blocks/2)]
            packed = pack_nibbles(q.T.reshape(n, blocks, self.block))
            zeros = zero.T
            if blocks % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
            return (new_initializer(graph, names, f"{name}_nbits", packed),
                    new_initializer(graph, names, f"{name}_scales", np.ascontiguousarray(scale.T).reshape(-1)),
                    new_initializer(graph, names, f"{name}_zero_points", pack_nibbles(zeros).reshape(-1)))
        return (_uint4_initializer(graph, names, f"{name}_uint4", q), new_initializer(graph, names, f"{name}_scale", scale),
                _uint4_initializer(graph, names, f"{name}_zero_point", zero))


def _uint4_initializer(graph: ir.Graph, names: FreshNames, name: str, codes: np.ndarray) -> ir.Value:
    value = new_initializer(graph, names, name, codes.astype(np.uint8))
    tensor = ir.Tensor(codes.astype(np.uint8), dtype=ir.DataType.UINT4, name=value.name)
    value.const_value, value.type = tensor, ir.TensorType(ir.DataType.UINT4)
    return value


# ---------------------------------------------------------------- embeddings

def embedding_gather(node: ir.Node, exclude=frozenset()) -> Match:
    """Match.ok((V, D)) for a main-graph Gather (axis 0) on a float32 [V, D] initializer table."""
    if node.op_type != "Gather" or not is_standard(node) or node.name in exclude:
        return NO_MATCH
    table = node.inputs[0]
    if not float_initializer(table) or len(tensor_of(table).shape) != 2:
        return NO_MATCH
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    if axis != 0:
        return Match.fail("Gather axis is not 0")
    v, d = (int(x) for x in tensor_of(table).shape.numpy())
    if v * d < MIN_EMBEDDING:
        return Match.fail(f"table smaller than {MIN_EMBEDDING} elements")
    return Match.ok((v, d))


class QuantizeEmbeddings(OptPass):
    """Gather tables weight-only: int8 table + DequantizeLinear after the Gather (scale per column
    of D; standard ops), or ``bits=4``: com.microsoft GatherBlockQuantized (uint4, blocks of
    ``block_size`` along D with zero points; CPU EP), falling back to int8 where ``block_size``
    does not divide D.  Only the rows gathered are dequantized.  See the module docstring."""

    name = "quantize-embeddings"

    def __init__(self, bits: int = 8, block_size: int = 32, exclude=frozenset(),
                 shared: dict[str, tuple[ir.Value, ir.Value, ir.Value]] | None = None, memo: dict | None = None):
        super().__init__()
        self.bits, self.block, self.exclude = bits, block_size, frozenset(exclude)
        #: table name -> the int8 weight of a MatMul by its transpose (:func:`tied_tables`), used instead of a copy
        self.shared = shared or {}
        #: int8 tables already computed, by table name (a caller building many candidates of one
        #: model passes the same dict so each table is quantized once)
        self.memo = {} if memo is None else memo

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        names = FreshNames(model)
        tables: dict[str, tuple[ir.Value, ...]] = {}
        for node in list(model.graph):
            match = embedding_gather(node, self.exclude)
            if match.succeeded:
                four = self.bits == 4 and typing.cast(tuple[int, int], match.value)[1] % self.block == 0
                if name_of(node.inputs[0]) in self.shared:
                    match = self._tied(model.graph, node, names, tables)
                    match.tally(changed, skipped, "Gather -> Gather int8 shared with a tied MatMul")
                    continue
                if four:
                    model.opset_imports.setdefault("com.microsoft", 1)
                table = node.inputs[0]
                match = (self._int4 if four else self._int8)(model.graph, node, names, tables)
                release(table)
                match.tally(changed, skipped, f"Gather -> {'GatherBlockQuantized (uint4)' if four else 'Gather int8 + DQ'}")
            else:
                match.tally(changed, skipped, "", "Gather")
        return self.result(model, changed, skipped)

    def _int8(self, graph, node, names, tables) -> Match:
        table = node.inputs[0]
        key = f"{table.name}/8"
        if key not in tables:
            if table.name not in self.memo:
                self.memo[table.name] = int8_columns(constant(table), 127)
            q, s = self.memo[table.name]
            tables[key] = (new_initializer(graph, names, f"{table.name}_int8", q), new_initializer(graph, names, f"{table.name}_scale", s),
                           new_initializer(graph, names, f"{table.name}_zero_point", np.zeros(s.shape, np.int8)))
        q, s, z = tables[key]
        gather = ir.node("Gather", [q, node.inputs[1]], {"axis": 0}, name=names.node(f"{node.name}_int8"))
        dq = ir.node("DequantizeLinear", [node_output(gather, names, f"{node.name}_int8", ir.DataType.INT8), s, z], {"axis": -1},
                     name=names.node(f"{node.name}_DequantizeLinear"))
        reason = replace_node(graph, node, [gather, dq], node_output(dq, names, f"{node.name}_dequantized", FLOAT))
        return Match.ok() if reason is None else Match.fail(reason)

    def _tied(self, graph, node, names, tables) -> Match:
        """Gather on a table whose transpose a MatMulInteger reads as int8 [D, V] with scales [V]:
        the table is stored once, [V, D], read by this Gather and (through a Transpose) by the head."""
        table = node.inputs[0]
        key = f"{table.name}/tied"
        if key not in tables:
            wq, ws, _ = self.shared[table.name]
            rows = new_initializer(graph, names, f"{table.name}_int8", np.ascontiguousarray(constant(wq).T))
            tr = ir.node("Transpose", [rows], {"perm": [1, 0]}, name=names.node(f"{table.name}_int8_Transpose"))
            tr.outputs[0].shape = wq.shape
            graph.insert_before(next(iter(graph)), [tr])
            wq.replace_all_uses_with(node_output(tr, names, f"{wq.name}_transposed", ir.DataType.INT8))
            tables[key] = (rows, ws, new_initializer(graph, names, f"{table.name}_axes", np.array([-1], np.int64)))
        rows, scale, axes = tables[key]
        gather = ir.node("Gather", [rows, node.inputs[1]], {"axis": 0}, name=names.node(f"{node.name}_int8"))
        cast = ir.node("Cast", [node_output(gather, names, f"{node.name}_int8", ir.DataType.INT8)], {"to": FLOAT},
                       name=names.node(f"{node.name}_Cast"))
        gs = ir.node("Gather", [scale, node.inputs[1]], {"axis": 0}, name=names.node(f"{node.name}_scale_Gather"))
        unsq = ir.node("Unsqueeze", [node_output(gs, names, f"{node.name}_row_scale", FLOAT), axes],
                       name=names.node(f"{node.name}_scale_Unsqueeze"))
        mul = ir.node("Mul", [node_output(cast, names, f"{node.name}_float", FLOAT),
                              node_output(unsq, names, f"{node.name}_row_scales", FLOAT)],
                      name=names.node(f"{node.name}_dequantize_Mul"))
        reason = replace_node(graph, node, [gather, cast, gs, unsq, mul], node_output(mul, names, f"{node.name}_dequantized", FLOAT))
        return Match.ok() if reason is None else Match.fail(reason)

    def _int4(self, graph, node, names, tables) -> Match:
        table = node.inputs[0]
        key = f"{table.name}/4"
        if key not in tables:
            arr = constant(table).astype(np.float64)  # [V, D]: blocks along D = block_grid on the transpose
            scale, zero = block_grid(arr.T, self.block)
            codes = block_round(arr.T, scale, zero, self.block).T
            zeros = zero.T
            if zeros.shape[1] % 2:
                zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), np.uint8)], axis=1)
            tables[key] = (new_initializer(graph, names, f"{table.name}_uint4", pack_nibbles(codes)),
                           new_initializer(graph, names, f"{table.name}_scales", np.ascontiguousarray(scale.T)),
                           new_initializer(graph, names, f"{table.name}_zero_points", pack_nibbles(zeros)))
        data, scales, zeros = tables[key]
        gbq = ir.node("GatherBlockQuantized", [data, node.inputs[1], scales, zeros],
                      {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block, "bits": 4},
                      domain="com.microsoft", name=names.node(f"{node.name}_GatherBlockQuantized"))
        reason = replace_node(graph, node, [gbq], node_output(gbq, names, f"{node.name}_dequantized", FLOAT))
        return Match.ok() if reason is None else Match.fail(reason)


def tied_tables(model: ir.Model, quantized: dict[str, tuple[ir.Value, ir.Value, ir.Value]],
                exclude=frozenset()) -> dict[str, tuple[ir.Value, ir.Value, ir.Value]]:
    """Embedding tables (Gather, :func:`embedding_gather`) equal to the transpose of a float weight
    that dynamic int8 quantized (``quantized``: :attr:`QuantizeDynamic.weights`): a tied LM head
    (``MatMul(x, W.T)``, its transposed copy made by ``gemm-to-matmul``, or a TorchScript export's
    second copy).  Table name -> that weight's int8 initializers.  Compared by value, O(tables x
    same-shape weights x V*D)."""
    tables = {name_of(n.inputs[0]): n.inputs[0] for n in model.graph if embedding_gather(n, exclude).succeeded}
    out: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for name, table in tables.items():
        rows = constant(table)
        for wname, q in quantized.items():
            w = model.graph.initializers.get(wname)
            if w is not None and w.const_value is not None and tuple(w.const_value.shape) == rows.shape[::-1] \
                    and np.array_equal(constant(w).T, rows):
                out[name] = q
                break
    return out

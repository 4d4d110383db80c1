"""Our passes vs their onnxscript twins, pass by pass, on the same models (issue item 4: "write down,
or reuse, the twins").

    pip install "onnxscript>=0.5"          # in the `models` extra
    python tests/benchmarks/compare_rewriter.py [--twin simplify ...] [--case NAME ...] [--json out.json]

Twins (each side run alone on a fresh copy of the same model):

    ours               onnxscript counterpart
    simplify           RewritePass(no-op rules + basic_optimization_rules + collapse_slices +
                       materialize_reshape_shape + fuse_pad_into_conv + matmul_add_to_gemm)
    fuse-affine        RewritePass(fuse_batchnorm rules (Conv, ConvTranspose, Gemm) +
                       affine_conv / conv_affine fusion rules)
    fuse-conv-bn       RewritePass(fuse_batchnorm_into_conv + fuse_batchnorm_into_conv_transpose)
    fuse-activations   RewritePass(LayerNorm fusion rules + HardSwish rules + ORT erf-GELU rules:
                       onnxscript has no ai.onnx Gelu fusion; its GELU rules write com.microsoft.Gelu)
    fold-shapes        optimizer.fold_constants (FoldConstantsPass, onnx shape inference on, default
                       size limits) + materialize_reshape_shape

    pipeline           (not a twin) our default pipeline vs onnxscript.optimizer.optimize

Both results then go through onnx-ir's RemoveUnusedNodesPass (onnxscript's ``rewriter.rewrite``
does the same), so node counts compare live nodes; Identity nodes (onnxscript's no-op rules
rewrite to Identity and leave their removal to later passes) are not counted, and shown apart.  Per model, twin and side: node count, op
histogram delta, pass time (best of ``--repeat``), ORT load error, and correctness on ORT CPU
(1 thread) against the original at two points: every symbolic dim at 1 with seed-0 values, and
every symbolic dim at 3 with seed-1 values (integers in [0, 4), "*mask*" inputs as padding masks).
Float outputs: ``|got-ref| <= 1e-5 + 1e-4*|ref|`` (fp16 outputs 1e-3 + 1e-2*|ref|, the project's
fp16 tolerance); integers/bools exact; shapes and dtypes must match.  A point the original cannot
run is reported as skipped.  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as onh

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from onnxopt import pipeline
from onnxopt.base import count_nodes, op_histogram

ort.set_default_logger_severity(3)

# ------------------------------------------------------------------ the twins


def _rewrite(*rule_sets) -> Callable[[ir.Model], None]:
    """One onnxscript RewritePass per rule set (a list of rules or a RewriteRuleSet), in order."""
    from onnxscript import rewriter

    def apply(model: ir.Model) -> None:
        for rules in rule_sets:
            rewriter.RewritePass(rules if isinstance(rules, rewriter.RewriteRuleSet) else list(rules))(model)
    return apply


def theirs_simplify() -> Callable[[ir.Model], None]:
    from onnxscript.rewriter.rules.common import (
        _basic_rules,
        _collapse_slices,
        _fuse_pad_into_conv,
        _materialize_reshape_shape,
        _no_op,
        matmul_add_to_gemm_rule,
    )
    return _rewrite([*_no_op.rules, *_basic_rules.basic_optimization_rules(), *_collapse_slices.rules,
                     *_materialize_reshape_shape.rules, *_fuse_pad_into_conv.rules, matmul_add_to_gemm_rule])


def theirs_fuse_affine() -> Callable[[ir.Model], None]:
    from onnxscript.rewriter.rules.common import _fuse_batchnorm, affine_conv_fusion_rule, conv_affine_fusion_rule
    return _rewrite([*_fuse_batchnorm.rules, affine_conv_fusion_rule, conv_affine_fusion_rule])


def theirs_fuse_conv_bn() -> Callable[[ir.Model], None]:
    from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule
    return _rewrite([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule])


def theirs_fuse_activations() -> Callable[[ir.Model], None]:
    from onnxscript.rewriter.ort_fusions import erfgelu, gelu
    from onnxscript.rewriter.rules.common import fuse_hardswish_rules
    from onnxscript.rewriter.rules.fusion import _layer_norm
    return _rewrite(_layer_norm.layer_normalization_ruleset, fuse_hardswish_rules(), erfgelu.rules, gelu.gelu_rules)


def theirs_fold_shapes() -> Callable[[ir.Model], None]:
    from onnxscript import optimizer
    from onnxscript.rewriter.rules.common import _materialize_reshape_shape
    materialize = _rewrite(_materialize_reshape_shape.rules)

    def apply(model: ir.Model) -> None:
        optimizer.fold_constants(model)
        materialize(model)
    return apply


def theirs_pipeline() -> Callable[[ir.Model], None]:
    from onnxscript import optimizer

    def apply(model: ir.Model) -> None:
        optimizer.optimize(model)
    return apply


TWINS: dict[str, Callable[[], Callable[[ir.Model], None]]] = {
    "simplify": theirs_simplify,
    "fuse-affine": theirs_fuse_affine,
    "fuse-conv-bn": theirs_fuse_conv_bn,
    "fuse-activations": theirs_fuse_activations,
    "fold-shapes": theirs_fold_shapes,
    # not a twin: the whole default pipeline vs onnxscript.optimizer.optimize (folding + default rules)
    "pipeline": theirs_pipeline,
}


def ours(name: str) -> Callable[[ir.Model], ir.Model]:
    specs = pipeline.parse(pipeline.DEFAULT_PIPELINE if name == "pipeline" else name)

    def apply(model: ir.Model) -> ir.Model:
        return pipeline.run(model, specs).model
    return apply


# ------------------------------------------------------------------ hand-built graphs

F, F16, I64, I32, D = TP.FLOAT, TP.FLOAT16, TP.INT64, TP.INT32, TP.DOUBLE
RNG = np.random.default_rng(7)


def _init(name: str, arr) -> onnx.TensorProto:
    return onh.from_array(np.asarray(arr), name)


def _model(name, nodes, inputs, outputs, inits=(), opset=18, value_info=(), extra_opsets=()):
    graph = oh.make_graph(nodes, name, inputs, outputs, initializer=list(inits), value_info=list(value_info))
    opsets = [oh.make_opsetid("", opset), *[oh.make_opsetid(d, v) for d, v in extra_opsets]]
    m = oh.make_model(graph, opset_imports=opsets, producer_name="compare_rewriter")
    m.ir_version = 8
    return m


def vi(name, dtype, dims):
    return oh.make_tensor_value_info(name, dtype, dims)


def case_neutral_broadcast():
    """x[N,3] + zeros(1,1,1), x * ones(1,1,1): the neutral element broadcasts to rank 3;
    c[N,1] + zeros(1,4): it broadcasts a size-1 dim to 4."""
    return _model("neutral_broadcast", [
        oh.make_node("Add", ["x", "z"], ["a"]),
        oh.make_node("Relu", ["a"], ["y"]),
        oh.make_node("Mul", ["x", "o"], ["m"]),
        oh.make_node("Sigmoid", ["m"], ["y2"]),
        oh.make_node("Add", ["c", "zrow"], ["r"]),  # c[N,1] + zeros(1,4) -> [N,4]
        oh.make_node("Tanh", ["r"], ["y3"]),
    ], [vi("x", F, ["N", 3]), vi("c", F, ["N", 1])], [vi("y", F, None), vi("y2", F, None), vi("y3", F, None)],
        [_init("z", np.zeros((1, 1, 1), np.float32)), _init("o", np.ones((1, 1, 1), np.float32)),
         _init("zrow", np.zeros((1, 4), np.float32))])


def case_neutral_plain():
    """x+0, 0+x, x*1, x-0, x/1 with scalar constants, x+zeros([1]), x*ones(1,5) (x is [N,5]): removable."""
    return _model("neutral_plain", [
        oh.make_node("Add", ["x", "z"], ["a"]), oh.make_node("Add", ["z", "a"], ["b"]),
        oh.make_node("Mul", ["b", "o"], ["c"]), oh.make_node("Sub", ["c", "z"], ["d"]),
        oh.make_node("Div", ["d", "o"], ["e"]), oh.make_node("Add", ["e", "z1"], ["f"]),
        oh.make_node("Mul", ["f", "o15"], ["g"]), oh.make_node("Relu", ["g"], ["y"]),
    ], [vi("x", F, ["N", 5])], [vi("y", F, None)],
        [_init("z", np.array(0, np.float32)), _init("o", np.array(1, np.float32)),
         _init("z1", np.zeros(1, np.float32)), _init("o15", np.ones((1, 5), np.float32))])


def case_transpose_pairs():
    """Transpose pairs: inverse (-> nothing), composable (-> one), identity perm."""
    return _model("transpose_pairs", [
        oh.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
        oh.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
        oh.make_node("Transpose", ["t2"], ["t3"], perm=[1, 0, 2]),
        oh.make_node("Transpose", ["t3"], ["t4"], perm=[2, 0, 1]),
        oh.make_node("Transpose", ["t4"], ["t5"], perm=[0, 1, 2]),
        oh.make_node("Relu", ["t5"], ["y"]),
    ], [vi("x", F, ["N", 4, 6])], [vi("y", F, None)])


def case_reshape_chains(opset=18):
    """Reshape chains: static (3 -> 1), with 0-copy and -1 under a symbolic batch, Flatten->Reshape."""
    return _model(f"reshape_chains_op{opset}", [
        oh.make_node("Reshape", ["s", "sh1"], ["s1"]), oh.make_node("Reshape", ["s1", "sh2"], ["s2"]),
        oh.make_node("Reshape", ["s2", "sh3"], ["s3"]), oh.make_node("Relu", ["s3"], ["y"]),
        oh.make_node("Reshape", ["x", "c1"], ["x1"]), oh.make_node("Reshape", ["x1", "c2"], ["x2"]),
        oh.make_node("Relu", ["x2"], ["y2"]),
        oh.make_node("Flatten", ["x"], ["f1"], axis=1), oh.make_node("Reshape", ["f1", "c3"], ["f2"]),
        oh.make_node("Relu", ["f2"], ["y3"]),
    ], [vi("s", F, [2, 4, 6]), vi("x", F, ["N", 4, 6])],
        [vi("y", F, None), vi("y2", F, None), vi("y3", F, None)],
        [_init("sh1", np.array([8, 6], np.int64)), _init("sh2", np.array([48], np.int64)),
         _init("sh3", np.array([6, 8], np.int64)), _init("c1", np.array([0, -1], np.int64)),
         _init("c2", np.array([0, 6, 4], np.int64)), _init("c3", np.array([-1, 2, 12], np.int64))], opset=opset)


def case_cast_round_trips():
    """Cast round trips: lossless f16->f32->f16, f32->f64->f32; lossy f32->f16->f32, f32->i32->f32,
    i64->i32->i64 (values above 2^31 in a constant path), f32->bf16... and Cast to own type."""
    return _model("cast_round_trips", [
        oh.make_node("Cast", ["h"], ["h1"], to=F), oh.make_node("Cast", ["h1"], ["yh"], to=F16),
        oh.make_node("Cast", ["x"], ["d1"], to=D), oh.make_node("Cast", ["d1"], ["yd"], to=F),
        oh.make_node("Cast", ["x"], ["l1"], to=F16), oh.make_node("Cast", ["l1"], ["yl"], to=F),
        oh.make_node("Cast", ["x"], ["i1"], to=I32), oh.make_node("Cast", ["i1"], ["yi"], to=F),
        oh.make_node("Mul", ["k", "big"], ["kb"]),
        oh.make_node("Cast", ["kb"], ["k1"], to=I32), oh.make_node("Cast", ["k1"], ["yk"], to=I64),
        oh.make_node("Cast", ["x"], ["same"], to=F), oh.make_node("Relu", ["same"], ["ys"]),
    ], [vi("h", F16, ["N", 4]), vi("x", F, ["N", 4]), vi("k", I64, ["N", 4])],
        [vi(n, t, None) for n, t in (("yh", F16), ("yd", F), ("yl", F), ("yi", F), ("yk", I64), ("ys", F))],
        [_init("big", np.array(3_000_000_000, np.int64))])


def _bn_inits(prefix, c):
    return [_init(f"{prefix}_s", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            _init(f"{prefix}_b", RNG.standard_normal(c).astype(np.float32)),
            _init(f"{prefix}_m", RNG.standard_normal(c).astype(np.float32)),
            _init(f"{prefix}_v", RNG.uniform(0.5, 2.0, c).astype(np.float32))]


def _bn(x, y, prefix):
    return oh.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y])


def case_conv_bn():
    """Conv+BN, ConvTranspose+BN, Conv(no bias)+BN, dynamic batch and spatial dims."""
    return _model("conv_bn", [
        oh.make_node("Conv", ["x", "w", "wb"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "b1", "bn1"),
        oh.make_node("Relu", ["b1"], ["r"]),
        oh.make_node("ConvTranspose", ["r", "wt"], ["ct"], strides=[2, 2]), _bn("ct", "b2", "bn2"),
        oh.make_node("Conv", ["b2", "w2"], ["c2"]), _bn("c2", "y", "bn3"),
    ], [vi("x", F, ["N", 3, "H", "W"])], [vi("y", F, None)],
        [_init("w", RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)),
         _init("wb", RNG.standard_normal(8).astype(np.float32)),
         _init("wt", RNG.standard_normal((8, 4, 2, 2)).astype(np.float32)),
         _init("w2", RNG.standard_normal((5, 4, 1, 1)).astype(np.float32)),
         *_bn_inits("bn1", 8), *_bn_inits("bn2", 4), *_bn_inits("bn3", 5)])


def case_gemm_bn():
    """Gemm+BN on a [N,C] activation; Gemm with transB."""
    return _model("gemm_bn", [
        oh.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), _bn("g", "y", "bn"),
    ], [vi("x", F, ["N", 8])], [vi("y", F, None)],
        [_init("w", RNG.standard_normal((6, 8)).astype(np.float32)), _init("b", RNG.standard_normal(6).astype(np.float32)),
         *_bn_inits("bn", 6)])


def case_affine_rank_growth():
    """MatMul/Gemm followed by Mul/Add by a size-1 constant of shape (1,1,1): the output is rank 2,
    the constant makes it rank 3 (must not be folded into the weights); plus a legit per-channel Mul."""
    return _model("affine_rank_growth", [
        oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Mul", ["m", "s111"], ["y"]),
        oh.make_node("Gemm", ["x", "w2", "b2"], ["g"]), oh.make_node("Add", ["g", "t111"], ["y2"]),
        oh.make_node("MatMul", ["x", "w3"], ["m3"]), oh.make_node("Mul", ["m3", "s4"], ["y3"]),
        oh.make_node("Conv", ["img", "cw"], ["cv"]), oh.make_node("Mul", ["cv", "s1111"], ["y4"]),
    ], [vi("x", F, ["N", 8]), vi("img", F, ["N", 2, 5, 5])],
        [vi("y", F, None), vi("y2", F, None), vi("y3", F, None), vi("y4", F, None)],
        [_init("w", RNG.standard_normal((8, 4)).astype(np.float32)), _init("s111", np.full((1, 1, 1), 2.5, np.float32)),
         _init("w2", RNG.standard_normal((8, 4)).astype(np.float32)), _init("b2", RNG.standard_normal(4).astype(np.float32)),
         _init("t111", np.full((1, 1, 1), 0.5, np.float32)),
         _init("w3", RNG.standard_normal((8, 4)).astype(np.float32)),
         _init("s4", RNG.uniform(0.5, 2, 4).astype(np.float32)),
         _init("cw", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)),
         _init("s1111", np.full((1, 1, 1, 1, 1), 1.5, np.float32))])


def case_gelu_layernorm(opset=20):
    """Decomposed GELU (erf; two spellings) and LayerNorm (Pow 2 + Div, with gamma/beta), HardSwish."""
    sqrt2, inv = float(np.sqrt(2.0)), float(1 / np.sqrt(2.0))
    def c(n, v):
        return _init(n, np.array(v, np.float32))
    return _model(f"gelu_layernorm_op{opset}", [
        oh.make_node("Div", ["x", "sqrt2"], ["g1"]), oh.make_node("Erf", ["g1"], ["g2"]),
        oh.make_node("Add", ["g2", "one"], ["g3"]), oh.make_node("Mul", ["x", "g3"], ["g4"]),
        oh.make_node("Mul", ["g4", "half"], ["gelu1"]),
        oh.make_node("Mul", ["gelu1", "inv"], ["h1"]), oh.make_node("Erf", ["h1"], ["h2"]),
        oh.make_node("Add", ["h2", "one"], ["h3"]), oh.make_node("Mul", ["half", "h3"], ["h4"]),
        oh.make_node("Mul", ["gelu1", "h4"], ["gelu2"]),
        oh.make_node("ReduceMean", ["gelu2", "axm1"], ["mu"]),
        oh.make_node("Sub", ["gelu2", "mu"], ["d"]), oh.make_node("Pow", ["d", "two"], ["d2"]),
        oh.make_node("ReduceMean", ["d2", "axm1"], ["var"]), oh.make_node("Add", ["var", "eps"], ["ve"]),
        oh.make_node("Sqrt", ["ve"], ["sd"]), oh.make_node("Div", ["d", "sd"], ["nrm"]),
        oh.make_node("Mul", ["nrm", "gamma"], ["ng"]), oh.make_node("Add", ["ng", "beta"], ["ln"]),
        oh.make_node("HardSigmoid", ["ln"], ["hs"], alpha=1 / 6, beta=0.5), oh.make_node("Mul", ["ln", "hs"], ["y"]),
    ], [vi("x", F, ["B", "S", 16])], [vi("y", F, None)],
        [c("sqrt2", sqrt2), c("inv", inv), c("one", 1.0), c("half", 0.5), c("two", 2.0), c("eps", 1e-5),
         _init("axm1", np.array([-1], np.int64)),
         _init("gamma", RNG.uniform(0.5, 1.5, 16).astype(np.float32)), _init("beta", RNG.standard_normal(16).astype(np.float32))],
        opset=opset)


def case_shape_chain(opset=18):
    """Shape->Gather->Unsqueeze->Concat->Reshape with symbolic dims (batch, seq), plus a fully static
    Shape->Slice->Concat->Reshape and Shape->Gather feeding arithmetic (seq*2)."""
    return _model(f"shape_chain_op{opset}", [
        oh.make_node("Shape", ["x"], ["sx"]),
        oh.make_node("Gather", ["sx", "i0"], ["b"], axis=0), oh.make_node("Gather", ["sx", "i1"], ["s"], axis=0),
        oh.make_node("Unsqueeze", ["b", "ax0"], ["bu"]), oh.make_node("Unsqueeze", ["s", "ax0"], ["su"]),
        oh.make_node("Concat", ["bu", "su", "tail"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["y"]),
        oh.make_node("Mul", ["s", "two"], ["s2"]), oh.make_node("Unsqueeze", ["s2", "ax0"], ["s2u"]),
        oh.make_node("Concat", ["bu", "s2u", "four"], ["t2"], axis=0),
        oh.make_node("Reshape", ["x", "t2"], ["y2"]),
        oh.make_node("Shape", ["w"], ["sw"]), oh.make_node("Slice", ["sw", "st", "en"], ["swl"]),
        oh.make_node("Concat", ["swl", "minus1"], ["t3"], axis=0), oh.make_node("Reshape", ["w", "t3"], ["y3"]),
    ], [vi("x", F, ["batch", "seq", 8]), vi("w", F, [2, 3, 4, 5])],
        [vi("y", F, None), vi("y2", F, None), vi("y3", F, None)],
        [_init("i0", np.array(0, np.int64)), _init("i1", np.array(1, np.int64)), _init("ax0", np.array([0], np.int64)),
         _init("tail", np.array([2, 4], np.int64)), _init("two", np.array(2, np.int64)),
         _init("four", np.array([4], np.int64)), _init("st", np.array([0], np.int64)), _init("en", np.array([2], np.int64)),
         _init("minus1", np.array([-1], np.int64))], opset=opset)


def case_wrong_value_info():
    """Declared intermediate shapes that differ from the true ones, each feeding a rule that reads
    shapes: Reshape(x, Shape(r)) with r declared [6,4] (true [2,3,4]); Expand(q, [3,4]) with q declared
    [3,4] (true [3,1]); Add(p, zeros(1,3,4)) with p declared [1,3,4] (true [3,4]); a Reshape chain
    whose output is declared [4,6] (true [2,12])."""
    return _model("wrong_value_info", [
        oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Shape", ["r"], ["sr"]),
        oh.make_node("Reshape", ["x", "sr"], ["rs"]), oh.make_node("Sigmoid", ["rs"], ["y"]),
        oh.make_node("ReduceSum", ["x", "ax02"], ["q"], keepdims=0),  # [3]
        oh.make_node("Reshape", ["q", "sh31"], ["q2"]),  # [3,1], declared [3,4]
        oh.make_node("Expand", ["q2", "sh34"], ["e"]), oh.make_node("Relu", ["e"], ["y2"]),
        oh.make_node("ReduceSum", ["x", "ax0"], ["p"], keepdims=0),  # [3,4], declared [1,3,4]
        oh.make_node("Add", ["p", "z134"], ["pa"]), oh.make_node("Relu", ["pa"], ["y3"]),
        oh.make_node("Reshape", ["x", "sh_m1"], ["c1"]), oh.make_node("Reshape", ["c1", "sh_0m1"], ["c2"]),
        oh.make_node("Relu", ["c2"], ["y4"]),
    ], [vi("x", F, [2, 3, 4])], [vi(n, F, None) for n in ("y", "y2", "y3", "y4")],
        [_init("ax02", np.array([0, 2], np.int64)), _init("ax0", np.array([0], np.int64)),
         _init("sh31", np.array([-1, 1], np.int64)), _init("sh34", np.array([3, 4], np.int64)),
         _init("z134", np.zeros((1, 3, 4), np.float32)), _init("sh_m1", np.array([-1], np.int64)),
         _init("sh_0m1", np.array([2, -1], np.int64))],
        value_info=[vi("r", F, [6, 4]), vi("q2", F, [3, 4]), vi("p", F, [1, 3, 4]), vi("c2", F, [4, 6])])


def case_dynamic_batch():
    """Dynamic batch everywhere: 3-D MatMul+Add (not a Gemm), Flatten->Gemm, Reshape with batch -1."""
    return _model("dynamic_batch", [
        oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Add", ["m", "b"], ["y"]),
        oh.make_node("Flatten", ["x"], ["f"], axis=1), oh.make_node("MatMul", ["f", "w2"], ["m2"]),
        oh.make_node("Add", ["m2", "b2"], ["y2"]),
        oh.make_node("Reshape", ["x", "sh"], ["r"]), oh.make_node("Reshape", ["r", "sh2"], ["y3"]),
    ], [vi("x", F, ["B", 3, 8])], [vi("y", F, None), vi("y2", F, None), vi("y3", F, None)],
        [_init("w", RNG.standard_normal((8, 4)).astype(np.float32)), _init("b", RNG.standard_normal(4).astype(np.float32)),
         _init("w2", RNG.standard_normal((24, 4)).astype(np.float32)), _init("b2", RNG.standard_normal(4).astype(np.float32)),
         _init("sh", np.array([-1, 24], np.int64)), _init("sh2", np.array([-1, 3, 8], np.int64))])


def case_opset12_exporter():
    """Opset-12 exporter-style graph: Shape->Gather->Unsqueeze(axes attr)->Concat->Reshape with a
    symbolic batch (the Reshape's output declared, correctly, as [N, 48]), a Reshape chain and Conv+BN
    (a rule writing Reshape's opset-14 ``allowzero`` attribute breaks it)."""
    return _model("opset12_exporter", [
        oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "b", "bn"),
        oh.make_node("Shape", ["b"], ["sb"]), oh.make_node("Gather", ["sb", "i0"], ["n"], axis=0),
        oh.make_node("Unsqueeze", ["n"], ["nu"], axes=[0]),
        oh.make_node("Concat", ["nu", "minus1"], ["t"], axis=0),
        oh.make_node("Reshape", ["b", "t"], ["flat"]),
        oh.make_node("Reshape", ["flat", "sh"], ["r2"]), oh.make_node("Reshape", ["r2", "sh2"], ["y"]),
    ], [vi("x", F, ["N", 2, 4, 4])], [vi("y", F, None)],
        [_init("w", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)), *_bn_inits("bn", 3),
         _init("i0", np.array(0, np.int64)), _init("minus1", np.array([-1], np.int64)),
         _init("sh", np.array([0, 3, 16], np.int64)), _init("sh2", np.array([0, 48], np.int64))], opset=12,
        value_info=[vi("flat", F, ["N", 48])])  # correct, as exporters write it


def case_layernorm_explicit(opset=18):
    """LayerNorm as exporters write it with keepdims=1 explicit (Pow 2, Div, Mul gamma, Add beta) and
    GELU as ``(x * (Erf(x / sqrt2) + 1)) * 0.5`` (opset 18: ai.onnx Gelu does not exist yet)."""
    def c(n, v):
        return _init(n, np.array(v, np.float32))
    return _model(f"layernorm_explicit_op{opset}", [
        oh.make_node("ReduceMean", ["x", "axm1"], ["mu"], keepdims=1),
        oh.make_node("Sub", ["x", "mu"], ["d"]), oh.make_node("Pow", ["d", "two"], ["d2"]),
        oh.make_node("ReduceMean", ["d2", "axm1"], ["var"], keepdims=1), oh.make_node("Add", ["var", "eps"], ["ve"]),
        oh.make_node("Sqrt", ["ve"], ["sd"]), oh.make_node("Div", ["d", "sd"], ["nrm"]),
        oh.make_node("Mul", ["nrm", "gamma"], ["ng"]), oh.make_node("Add", ["ng", "beta"], ["ln"]),
        oh.make_node("Div", ["ln", "sqrt2"], ["g1"]), oh.make_node("Erf", ["g1"], ["g2"]),
        oh.make_node("Add", ["g2", "one"], ["g3"]), oh.make_node("Mul", ["ln", "g3"], ["g4"]),
        oh.make_node("Mul", ["g4", "half"], ["y"]),
    ], [vi("x", F, ["B", "S", 16])], [vi("y", F, None)],
        [c("sqrt2", float(np.sqrt(2.0))), c("one", 1.0), c("half", 0.5), c("two", 2.0), c("eps", 1e-5),
         _init("axm1", np.array([-1], np.int64)),
         _init("gamma", RNG.uniform(0.5, 1.5, 16).astype(np.float32)), _init("beta", RNG.standard_normal(16).astype(np.float32))],
        opset=opset)


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "neutral_broadcast": case_neutral_broadcast,
    "neutral_plain": case_neutral_plain,
    "transpose_pairs": case_transpose_pairs,
    "reshape_chains": case_reshape_chains,
    "reshape_chains_op12": lambda: case_reshape_chains(12),
    "cast_round_trips": case_cast_round_trips,
    "conv_bn": case_conv_bn,
    "gemm_bn": case_gemm_bn,
    "affine_rank_growth": case_affine_rank_growth,
    "gelu_layernorm": case_gelu_layernorm,
    "layernorm_explicit": case_layernorm_explicit,
    "shape_chain": case_shape_chain,
    "wrong_value_info": case_wrong_value_info,
    "dynamic_batch": case_dynamic_batch,
    "opset12_exporter": case_opset12_exporter,
}

# ------------------------------------------------------------------ running and comparing

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
       "tensor(bool)": np.bool_, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16}


def session(data: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def feeds_for(sess: ort.InferenceSession, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for inp in sess.get_inputs():
        shape = tuple(d if isinstance(d, int) and d >= 0 else dim for d in (inp.shape or ()))
        dtype = _NP[inp.type]
        if "mask" in inp.name.lower() and len(shape) >= 1:
            keep = rng.integers(1, shape[-1] + 1, size=int(np.prod(shape[:-1])))
            value = (np.arange(shape[-1])[None, :] < keep[:, None]).reshape(shape)
        elif dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(0, 4, size=shape)
        else:
            value = rng.standard_normal(shape)
        out[inp.name] = np.asarray(value).astype(dtype)
    return out


POINTS = ((1, 0), (3, 1))  # (symbolic dim value, seed)


def compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> tuple[bool, str, float]:
    """(all outputs within tolerance, what differs in each failing output, worst abs diff)."""
    worst, problems = 0.0, []
    for name, a, b in zip(names, ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            problems.append(f"{name}: shape {list(a.shape)} -> {list(b.shape)}")
            continue
        if a.dtype != b.dtype:
            problems.append(f"{name}: dtype {a.dtype} -> {b.dtype}")
            continue
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                problems.append(f"{name}: integer values differ")
            continue
        rtol, atol = (1e-2, 1e-3) if a.dtype == np.float16 else (1e-4, 1e-5)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if not np.array_equal(np.isnan(a64), np.isnan(b64)):
            problems.append(f"{name}: NaN positions differ")
            continue
        fin = np.isfinite(a64) & np.isfinite(b64)
        if not np.array_equal(a64[~fin], b64[~fin]):
            problems.append(f"{name}: Inf positions differ")
            continue
        if a.size:
            diff = np.abs(a64[fin] - b64[fin])
            worst = max(worst, float(diff.max(initial=0.0)))
            if np.any(diff > atol + rtol * np.abs(a64[fin])):
                problems.append(f"{name}: max abs diff {float(diff.max()):.3g}")
    return not problems, ", ".join(problems), worst


def reference(proto: onnx.ModelProto) -> dict:
    """The original's outputs at each point (None where the original itself cannot run)."""
    sess = session(proto.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    points = []
    for dim, seed in POINTS:
        feeds = feeds_for(sess, dim, seed)
        try:
            points.append((feeds, sess.run(None, feeds)))
        except Exception as e:  # noqa: BLE001
            points.append((feeds, None, f"{type(e).__name__}: {str(e)[:120]}"))
    return {"names": names, "points": points}


def run_side(proto: onnx.ModelProto, apply: Callable, ref: dict, repeat: int) -> dict:
    entry: dict = {}
    best = float("inf")
    model = None
    try:
        for _ in range(repeat):
            model = ir.serde.deserialize_model(proto)
            t0 = time.perf_counter()
            result = apply(model)
            best = min(best, time.perf_counter() - t0)
            if isinstance(result, ir.Model):
                model = result
    except Exception as e:  # noqa: BLE001 - a crash is a result
        return {"status": "crashed", "error": f"{type(e).__name__}: {str(e)[:240]}",
                "trace": traceback.format_exc(limit=3)[-600:]}
    entry["seconds"] = best
    common_passes.RemoveUnusedNodesPass()(model)
    entry["ops"] = dict(op_histogram(model))
    entry["identity"] = entry["ops"].get("Identity", 0)
    entry["nodes"] = count_nodes(model) - entry["identity"]  # onnxscript's no-op rules leave Identity nodes
    try:
        data = ir.serde.serialize_model(model).SerializeToString()
        sess = session(data)
    except Exception as e:  # noqa: BLE001
        entry.update(status="ORT load failure", error=" ".join(str(e).split())[:300])
        return entry
    entry["points"] = []
    ok_all = True
    for point in ref["points"]:
        feeds, out = point[0], point[1]
        if out is None:
            entry["points"].append({"status": "skipped (original cannot run)"})
            continue
        try:
            got = sess.run(ref["names"], feeds)
        except Exception as e:  # noqa: BLE001
            ok_all = False
            entry["points"].append({"status": "run failure", "error": " ".join(str(e).split())[:240]})
            continue
        ok, why, worst = compare(out, got, ref["names"])
        ok_all &= ok
        entry["points"].append({"status": "ok" if ok else "mismatch", "why": why, "max_abs": worst})
    entry["status"] = "ok" if ok_all else "WRONG"
    if not ok_all:
        entry["error"] = "; ".join(dict.fromkeys(p.get("why") or p.get("error", "") for p in entry["points"]
                                                 if p["status"] not in ("ok", "skipped (original cannot run)")))
    return entry


def hist_delta(before: collections.Counter, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    parts = [f"{k}{after.get(k, 0) - before.get(k, 0):+d}" for k in keys if after.get(k, 0) != before.get(k, 0)]
    return " ".join(parts) or "="


def load_inputs(args) -> list[tuple[str, onnx.ModelProto]]:
    items = []
    for path in sorted((ROOT / "models").glob("*.onnx")):
        if not args.case or path.stem in args.case:
            items.append((path.stem, onnx.load(str(path))))
    for name, build in CASES.items():
        if not args.case or name in args.case:
            proto = build()
            items.append((f"[{name}]", proto))
    return items


def cell(e: dict) -> str:
    if e.get("status") == "crashed":
        return "CRASH"
    if e.get("status") == "ORT load failure":
        return f"{e['nodes']} LOAD-FAIL"
    flag = "" if e["status"] == "ok" else " WRONG"
    ident = f"+{e['identity']}I" if e["identity"] else ""
    return f"{e['nodes']}{ident}{flag} {e['seconds'] * 1e3:.0f}ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the full results here")
    ap.add_argument("--twin", action="append", choices=list(TWINS), help="only these twins (repeatable)")
    ap.add_argument("--case", action="append", help="only these models/cases, by stem (repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="pass timings: best of N (default 3)")
    args = ap.parse_args(argv)
    import onnxscript
    twins = args.twin or list(TWINS)
    results = {"versions": {"onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__,
                            "onnxruntime": ort.__version__, "onnx": onnx.__version__},
               "tolerance": {"rtol": 1e-4, "atol": 1e-5, "fp16": [1e-2, 1e-3]},
               "points": [{"symbolic_dims": d, "seed": s} for d, s in POINTS], "rows": []}
    theirs = {t: TWINS[t]() for t in twins}
    print(f"onnxscript {onnxscript.__version__}, onnx-ir {ir.__version__}, onnxruntime {ort.__version__}")
    print(f"cell: nodes after, Identity nodes not counted (+kI: k Identity left) [WRONG|LOAD-FAIL] "
          f"pass-time (best of {args.repeat}); ours | onnxscript")
    header = f"{'model':28s} {'nodes':>5s} " + " ".join(f"{t:>36s}" for t in twins)
    print(header)
    for label, proto in load_inputs(args):
        before_model = ir.serde.deserialize_model(proto)
        before_hist = op_histogram(before_model)
        row = {"model": label, "opset": before_model.opset_imports.get("", None), "nodes": count_nodes(before_model),
               "twins": {}}
        try:
            ref = reference(proto)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"original does not run: {e}"
            results["rows"].append(row)
            print(f"{label:28s} original does not load on ORT")
            continue
        row["reference_points"] = ["ok" if p[1] is not None else p[2] for p in ref["points"]]
        cells = []
        for t in twins:
            o = run_side(proto, ours(t), ref, args.repeat)
            s = run_side(proto, theirs[t], ref, args.repeat)
            for e in (o, s):
                if "ops" in e:
                    e["ops_delta"] = hist_delta(before_hist, e["ops"])
            row["twins"][t] = {"ours": o, "onnxscript": s}
            cells.append(f"{cell(o):>17s} | {cell(s):<16s}")
        results["rows"].append(row)
        print(f"{label:28s} {row['nodes']:5d} " + " ".join(cells), flush=True)
    # details: everything that is not a plain "ok"
    print("\nFindings (status other than ok, or node counts that differ):")
    for row in results["rows"]:
        for t, sides in row.get("twins", {}).items():
            o, s = sides["ours"], sides["onnxscript"]
            if o.get("status") == s.get("status") == "ok" and o["nodes"] == s["nodes"]:
                continue
            for side, e in (("ours", o), ("onnxscript", s)):
                extra = f" -- {e['error']}" if e.get("error") else ""
                print(f"  {row['model']:26s} {t:17s} {side:10s} {e.get('status')}: nodes {e.get('nodes')}, "
                      f"ops {e.get('ops_delta', '-')}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

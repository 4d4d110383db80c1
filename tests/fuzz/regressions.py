"""Minimal reproducers of the bugs the differential fuzzer found, one builder per bug.

Each builder returns a ``Case`` (model + how to feed it) and ``REGRESSIONS`` maps a name to
``(builder, configs, description, open)``: the pass labels (``oracle.configs()`` labels) that
must hold on it, what went wrong, and whether the bug is still open (tests/test_fuzz.py marks
open ones ``xfail(strict=True)``; the owner flips ``open`` to False when fixing).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tests.fuzz.strategies import Case, InputSpec


def _model(nodes, inputs, outputs, inits=(), opset=18):
    g = h.make_graph(nodes, "repro", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8 if opset <= 18 else 9)


def fold_shapes_reduce_axes_input_static() -> Case:
    """Shape(ReduceL2(x, axes, keepdims=0)) with axes a graph input, x fully static.

    Bug (fixed in 4477d40): fold-shapes folded the Shape to the dims measured on one ORT probe
    run (onnxopt/shapes.py ort_shapes). At axes=[1]: expected y=[2,4,5], got the probe's dims."""
    nodes = [h.make_node("ReduceL2", ["x", "axes"], ["r"], keepdims=0),
             h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Cast", ["s"], ["y"], to=T.FLOAT)]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4, 5]),
                       h.make_tensor_value_info("axes", T.INT64, [1])],
               [h.make_tensor_value_info("y", T.FLOAT, [None])])
    return Case(m, [InputSpec("x", "float", [2, 3, 4, 5]),
                    InputSpec("axes", "int", [1], [np.array([1]), np.array([3])])], [], ["repro"])


def fuse_affine_size1_const_higher_rank() -> Case:
    """MatMul output (2,4) times a (1,1,1) constant: the result is (1,2,4).

    Bug (fixed in 1e7abbe): fuse-affine treated the (1,1,1) constant as a scalar and folded it
    into the weight: expected shape (1,2,4), got (2,4)."""
    w = nh.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    s = nh.from_array(np.full((1, 1, 1), 1.5, np.float32), "s")
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Mul", ["m", "s"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
               [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 4])], [w, s])
    return Case(m, [InputSpec("x", "float", [2, 3])], [], ["repro"])


def simplify_not_idempotent_matmul_add_zero() -> Case:
    """MatMul -> Add(bias) -> Add(zeros (1,2)), all static.

    Bug (fixed): simplify is not idempotent. Its first run rewrites MatMul+Add into Gemm but leaves
    ``Add(gemm_out, zeros)``; the second run removes that Add (3 -> 2 nodes).  Expected: the first
    run reaches the fixed point (DESIGN: every pass is idempotent; pipeline.run relies on it and
    skips a pass that already ran on the current version, so the default pipeline can stop with
    the neutral Add in place)."""
    inits = [nh.from_array(np.ones((2, 2), np.float32), "w"), nh.from_array(np.ones((1, 2), np.float32), "b"),
             nh.from_array(np.zeros((1, 2), np.float32), "z")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["a"]),
             h.make_node("Add", ["a", "z"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [3, 2])],
               [h.make_tensor_value_info("y", T.FLOAT, [3, 2])], inits)
    return Case(m, [InputSpec("x", "float", [3, 2])], [], ["repro"])


def fuse_activations_duplicate_node_names() -> Case:
    """Two decomposed erf-GELUs in a row (opset 20), static shapes.

    Bug (fixed): fuse-activations names every fused node ``Gelu_fused``; with two fusions the
    result has two nodes with the same name and ONNX Runtime refuses to load it ("This is an
    invalid model. Error: two nodes with same node name (Gelu_fused)").  Expected: unique node
    names (and a model ORT loads, equal to the original)."""
    nodes, inits = [], []

    def gelu(x, p):
        inits.extend([nh.from_array(np.array(1.4142135, np.float32), p + "s"),
                      nh.from_array(np.array(1.0, np.float32), p + "one"),
                      nh.from_array(np.array(0.5, np.float32), p + "half")])
        nodes.extend([h.make_node("Div", [x, p + "s"], [p + "d"]), h.make_node("Erf", [p + "d"], [p + "e"]),
                      h.make_node("Add", [p + "e", p + "one"], [p + "a"]), h.make_node("Mul", [x, p + "a"], [p + "m"]),
                      h.make_node("Mul", [p + "m", p + "half"], [p + "y"])])
        return p + "y"

    y = gelu(gelu("x", "g1_"), "g2_")
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3])], [h.make_tensor_value_info(y, T.FLOAT, [2, 3])],
               inits, opset=20)
    return Case(m, [InputSpec("x", "float", [2, 3])], [], ["repro"])


def fold_shapes_not_idempotent_topk_k_from_shape() -> Case:
    """x static [2,3,1,3]; k = Unsqueeze(Gather(Shape(x), 1)); v = TopK(x, k, axis=1); y = Cast(Shape(v));
    plus an unrelated int input n of unknown length (so the model is not fully static).

    Bug (fixed): fold-shapes is not idempotent.  Its first run makes k the constant [3] but keeps
    Shape(v) (v's dims were unknown when its shape table was built); the second run folds
    Shape(v) to [2,3,1,3] (5 -> 4 nodes).  Expected: the first run reaches the fixed point (the
    result itself is correct)."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "one"], ["g"], axis=0),
             h.make_node("Unsqueeze", ["g", "zero"], ["k"]),
             h.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
             h.make_node("Shape", ["v"], ["sv"]), h.make_node("Cast", ["sv"], ["y"], to=T.FLOAT),
             h.make_node("Identity", ["n"], ["n_out"])]
    inits = [nh.from_array(np.array(1, np.int64), "one"), nh.from_array(np.array([0], np.int64), "zero")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 1, 3]), h.make_tensor_value_info("n", T.INT64, [None])],
               [h.make_tensor_value_info("y", T.FLOAT, [4]), h.make_tensor_value_info("n_out", T.INT64, [None])], inits)
    return Case(m, [InputSpec("x", "float", [2, 3, 1, 3]),
                    InputSpec("n", "int", [None], [np.array([1]), np.array([2, 3])])], [], ["repro"])


def simplify_duplicate_node_names_gemm() -> Case:
    """Two MatMul+Add (bias) in a row, static 2-D shapes.

    Bug (fixed): simplify names every Gemm it creates ``gemm_gemm``; with two rewrites the result
    has two nodes with the same name and ONNX Runtime refuses to load it ("This is an invalid
    model. Error: two nodes with same node name (gemm_gemm)"): the default pipeline's result, and
    simplify run twice (its first run rewrites only the first MatMul+Add, so it is not idempotent
    either).  Expected: both pairs rewritten in one run, unique node names."""
    inits = [nh.from_array(np.full((2, 2), 0.5, np.float32), "w1"), nh.from_array(np.ones((2,), np.float32), "b1"),
             nh.from_array(np.full((2, 2), 0.25, np.float32), "w2"), nh.from_array(np.ones((2,), np.float32), "b2")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["m1"]), h.make_node("Add", ["m1", "b1"], ["a1"]),
             h.make_node("MatMul", ["a1", "w2"], ["m2"]), h.make_node("Add", ["m2", "b2"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [3, 2])],
               [h.make_tensor_value_info("y", T.FLOAT, [3, 2])], inits)
    return Case(m, [InputSpec("x", "float", [3, 2])], [], ["repro"])


def fuse_activations_rematches_dead_leftovers() -> Case:
    """A decomposed LayerNorm over the last axis (ReduceMean, Sub, Pow 2, ReduceMean, Add eps,
    Sqrt, Div, Mul gamma, Add beta), opset 18.

    Bug (fixed): fuse-activations is not idempotent.  Its first run replaces the final Add by
    LayerNormalization but leaves the now-dead ``Mul(div, gamma)`` and its inputs in the graph;
    the second run matches that dead chain again and adds a second LayerNormalization (with
    zero beta) named ``LayerNormalization_fused`` like the first, so the result also has duplicate
    node names and ORT refuses to load it.  Expected: the second run changes nothing."""
    inits = [nh.from_array(np.array(2.0, np.float32), "two"), nh.from_array(np.array(1e-5, np.float32), "eps"),
             nh.from_array(np.array([0.5, 1.0, 2.0], np.float32), "gamma"),
             nh.from_array(np.array([0.1, 0.2, 0.3], np.float32), "beta"), nh.from_array(np.array([-1], np.int64), "ax")]
    nodes = [h.make_node("ReduceMean", ["x", "ax"], ["mu"], keepdims=1), h.make_node("Sub", ["x", "mu"], ["d"]),
             h.make_node("Pow", ["d", "two"], ["d2"]), h.make_node("ReduceMean", ["d2", "ax"], ["var"], keepdims=1),
             h.make_node("Add", ["var", "eps"], ["ve"]), h.make_node("Sqrt", ["ve"], ["sd"]),
             h.make_node("Div", ["d", "sd"], ["n"]), h.make_node("Mul", ["n", "gamma"], ["g"]),
             h.make_node("Add", ["g", "beta"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
               [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], inits)
    return Case(m, [InputSpec("x", "float", [2, 3])], [], ["repro"])


def fold_shapes_crash_on_empty_shape_vector() -> Case:
    """e = Slice(Shape(x), [2], [INT64_MAX]) (empty for rank-2 x); y = Identity(Add(e, [1])).

    Bug (fixed): fold-shapes crashes (IndexError: tuple index out of range in fold_shapes._evaluate,
    the binary-op broadcast indexes element 0 of an empty vector); through the pipeline this is
    InternalError (exit 4).  Expected: y = [] (int64, shape (0,)) folded or the node left alone."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Slice", ["s", "two", "big"], ["e"]),
             h.make_node("Add", ["e", "one"], ["a"]), h.make_node("Identity", ["a"], ["y"])]
    inits = [nh.from_array(np.array([2], np.int64), "two"), nh.from_array(np.array([2**63 - 1], np.int64), "big"),
             nh.from_array(np.array([1], np.int64), "one")]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 2])], [h.make_tensor_value_info("y", T.INT64, [0])], inits)
    return Case(m, [InputSpec("x", "float", ["N", 2])], ["N"], ["repro"])


def fold_shapes_leaves_dead_failing_nodes() -> Case:
    """p = Pad(x[N,1], pads (int input), mode=reflect); y = Squeeze(Shape(Shape(p))) (the rank).

    Bug (fixed, was low severity): fold-shapes folds Shape(Shape(p)) to [2] but leaves the now-dead
    Shape(p) and Pad in the graph, and ORT executes dead nodes.  At pads=[0,1,0,1] (reflect on a
    length-1 axis, which ORT rejects) the original runs (ORT folds the rank itself and never runs
    the Pad) and returns y=2; the optimized model fails ("Pad reflect requires axis length >= 2").
    Expected: nodes whose outputs nobody reads are removed by the pass that orphaned them (or
    the optimized model runs wherever the original does)."""
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"), h.make_node("Shape", ["p"], ["s"]),
             h.make_node("Shape", ["s"], ["r"]), h.make_node("Squeeze", ["r"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 1]), h.make_tensor_value_info("pads", T.INT64, [4])],
               [h.make_tensor_value_info("y", T.INT64, [])])
    return Case(m, [InputSpec("x", "float", ["N", 1]),
                    InputSpec("pads", "int", [4], [np.array([0, 0, 0, 0]), np.array([0, 1, 0, 1])])], ["N"], ["repro"])


def simplify_slice_steps_from_constant_node() -> Case:
    """Slice(x, [0], [INT64_MAX], [3], steps) with ``steps`` = [2] made by a Constant *node* (not an
    initializer), found by the soak (seed 10000001495).

    Bug (fixed): simplify's no-op Slice rule read a non-constant ``steps`` as absent (all 1) and
    removed the Slice: expected shape (1, 2, 2, 2), got (1, 2, 2, 3)."""
    nodes = [h.make_node("Constant", [], ["steps"], value=nh.from_array(np.array([2], np.int64))),
             h.make_node("Relu", ["x"], ["r"]), h.make_node("Slice", ["r", "starts", "ends", "axes", "steps"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 2, 3])],
               [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 2, 2])],
               [nh.from_array(np.array([0], np.int64), "starts"),
                nh.from_array(np.array([2**63 - 1], np.int64), "ends"), nh.from_array(np.array([3], np.int64), "axes")],
               opset=13)
    return Case(m, [InputSpec("x", "float", [1, 2, 2, 3])], [], ["repro"])


def simplify_stale_dims_after_reshape_roundtrip() -> Case:
    """Two Reshape round trips in a row: Reshape(x,[0,0,-1]) -> Relu -> Reshape(x's shape) = r, then
    y = Reshape(r, [2,-1,6]) (a graph output) -> Relu -> Reshape back, found by the soak (seed
    50000000303).

    Bug (fixed): removing the first round trip gave the Relu x's shape, but simplify's shape table
    still held its old (2,4,6) dims for the rest of the round, so the no-op Reshape rule thought
    ``Reshape(r, [2,-1,6])`` kept its input's shape and removed it: expected y (2,4,6), got
    (2,4,3,2)."""
    nodes = [h.make_node("Reshape", ["x", "flat"], ["r10"]), h.make_node("Relu", ["r10"], ["relu12"]),
             h.make_node("Reshape", ["relu12", "xshape"], ["r13"]), h.make_node("Reshape", ["r13", "t31"], ["y"]),
             h.make_node("Relu", ["y"], ["relu32"]), h.make_node("Reshape", ["relu32", "xshape"], ["z"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 4, 3, 2])],
               [h.make_tensor_value_info("y", T.FLOAT, [None, None, None]),
                h.make_tensor_value_info("z", T.FLOAT, [None, None, None, None])],
               [nh.from_array(np.array([0, 0, -1], np.int64), "flat"), nh.from_array(np.array([2, 4, 3, 2], np.int64), "xshape"),
                nh.from_array(np.array([2, -1, 6], np.int64), "t31")], opset=14)
    return Case(m, [InputSpec("x", "float", [2, 4, 3, 2])], [], ["repro"])


def simplify_noop_slice_after_backward_slice_to_int_max() -> Case:
    """Slice(Slice(x, [-INT64_MAX], [INT64_MAX], [0], [-1]), [0], [0], [0]) on x [1, 3].

    Bug (fixed: an inferred empty axis is no longer a fact for the no-op rule; found by the issue-22
    soak, seed 22030001359 with ``--blocks round2``): onnx shape
    inference and ORT disagree on the inner Slice (a negative step with end INT64_MAX): onnx infers
    0 rows (the spec's clamping), ORT returns 1 row.  simplify's no-op Slice rule believes the
    inferred 0 and drops the outer ``[0:0]`` Slice: expected shape (0, 3) on ORT, got (1, 3).
    Which side is right per the spec does not matter here: a rule may only use dims that ORT
    agrees with (shapes after a negative-step Slice with out-of-range bounds are not facts)."""
    big = 2**63 - 1
    inits = [nh.from_array(np.array([v], np.int64), n) for n, v in
             (("s1", -big), ("e1", big), ("a", 0), ("st", -1), ("s2", 0), ("e2", 0))]
    nodes = [h.make_node("Slice", ["x", "s1", "e1", "a", "st"], ["t"]), h.make_node("Slice", ["t", "s2", "e2", "a"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3])], [h.make_tensor_value_info("y", T.FLOAT, [None, None])],
               inits, opset=17)
    return Case(m, [InputSpec("x", "float", [1, 3])], [], ["repro"])


def cleanup_unit_division_raises_rank() -> Case:
    """y = Mul(Div(c, Relu(x)), [1]) with c = [[[[[1]]]]] an initializer-backed input and x 4-D:
    the result is 5-D (found by the issue-22 soak, seed 22020003350).

    Bug (fixed: rewrites.ort_hazards): cleanup made c a plain constant, and ORT's DivMulFusion
    (basic level) then fused ``Div(1, x) * y`` into ``Div(y, x)``, dropping c's rank: expected
    shape (1, 1, 1, 2, 2) on ORT, got (1, 1, 2, 2).  The graph was right; ORT's optimizer is not,
    and users run ORT with its optimizer on."""
    c = nh.from_array(np.ones((1, 1, 1, 1, 1), np.float32), "c")
    one = nh.from_array(np.ones((1,), np.float32), "one")
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Div", ["c", "r"], ["d"]),
             h.make_node("Mul", ["d", "one"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, 2, 2]),
                       h.make_tensor_value_info("c", T.FLOAT, [1, 1, 1, 1, 1])],
               [h.make_tensor_value_info("y", T.FLOAT, [None] * 5)], [c, one], opset=13)
    return Case(m, [InputSpec("x", "float", ["N", 1, 2, 2])], ["N"], ["repro"])


def fold_constants_unit_division_unknown_rank() -> Case:
    """y = Mul(Div(ConstantOfShape([1, 1, 1], 1.0), x), x) with x = Reshape(a, s) of unknown rank
    (s a graph input), fed 2-D.

    The folded numerator is a [1, 1, 1] constant of ones; ORT's DivMulFusion would drop its rank
    (expected (1, 2, 3), got (2, 3)).  x's rank is unknown here, so the rewrite multiplies the
    reciprocal by the constant instead of unsqueezing it."""
    shape = nh.from_array(np.array([1, 1, 1], np.int64), "shape")
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["ones"], value=nh.from_array(np.ones(1, np.float32))),
             h.make_node("Reshape", ["a", "s"], ["x"]),
             h.make_node("Div", ["ones", "x"], ["d"]), h.make_node("Mul", ["d", "x"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("a", T.FLOAT, [6]), h.make_tensor_value_info("s", T.INT64, ["K"])],
               [h.make_tensor_value_info("y", T.FLOAT, [None] * 3)], [shape], opset=17)
    return Case(m, [InputSpec("a", "float", [6]),
                    InputSpec("s", "int", ["K"], [np.array([2, 3]), np.array([3, 2])])], [], ["repro"])


# name -> (builder, config labels under test, open?)
REGRESSIONS: dict[str, tuple] = {
    "cleanup_unit_division_raises_rank": (cleanup_unit_division_raises_rank, ["cleanup", "default"], False),
    "fold_constants_unit_division_unknown_rank": (fold_constants_unit_division_unknown_rank,
                                                  ["fold-constants", "default"], False),
    "simplify_stale_dims_after_reshape_roundtrip": (simplify_stale_dims_after_reshape_roundtrip,
                                                    ["simplify", "default"], False),
    "simplify_slice_steps_from_constant_node": (simplify_slice_steps_from_constant_node, ["simplify"], False),
    "fold_shapes_reduce_axes_input_static": (fold_shapes_reduce_axes_input_static, ["fold-shapes", "default"], False),
    "fuse_affine_size1_const_higher_rank": (fuse_affine_size1_const_higher_rank, ["fuse-affine", "default"], False),
    "simplify_not_idempotent_matmul_add_zero": (simplify_not_idempotent_matmul_add_zero, ["simplify"], False),
    "fuse_activations_duplicate_node_names": (fuse_activations_duplicate_node_names,
                                              ["fuse-activations", "default"], False),
    "simplify_duplicate_node_names_gemm": (simplify_duplicate_node_names_gemm, ["simplify", "default"], False),
    "fuse_activations_rematches_dead_leftovers": (fuse_activations_rematches_dead_leftovers, ["fuse-activations"], False),
    "fold_shapes_crash_on_empty_shape_vector": (fold_shapes_crash_on_empty_shape_vector, ["fold-shapes"], False),
    "fold_shapes_leaves_dead_failing_nodes": (fold_shapes_leaves_dead_failing_nodes, ["fold-shapes"], False),
    "fold_shapes_not_idempotent_topk_k_from_shape": (fold_shapes_not_idempotent_topk_k_from_shape, ["fold-shapes"], False),
    "simplify_noop_slice_after_backward_slice_to_int_max": (simplify_noop_slice_after_backward_slice_to_int_max,
                                                            ["simplify", "default"], False),
}


def save_all(folder) -> None:
    """Write every reproducer as <name>.onnx (for the CLI / other tools)."""
    from pathlib import Path
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, (builder, _, _) in REGRESSIONS.items():
        onnx.save(builder().model, str(Path(folder) / f"{name}.onnx"))

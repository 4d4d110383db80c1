"""Each pass's contract on tiny graphs: op types after, outputs equal on ORT, what it must not touch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt.passes.cleanup import Cleanup
from onnxopt.passes.dedup import Deduplicate
from onnxopt.passes.fold_constants import FoldConstants
from tests.helpers import ort_run

X = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.5


def make(nodes, inits=(), opset=17, ir_version=None, inputs=None, outputs=("y",), domains=()):
    inputs = inputs or [h.make_tensor_value_info("x", T.FLOAT, [2, 4])]
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info(o, T.FLOAT, None) for o in outputs], list(inits))
    kw = {"ir_version": ir_version} if ir_version else {}
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains], **kw)


def apply(pass_, proto):
    """Run a pass on a copy; return (result, new proto) and check outputs are identical on ORT."""
    model = ir.serde.deserialize_model(proto)
    result = pass_(model)
    new = ir.to_proto(result.model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError:
        pass  # hand-made graphs with untyped outputs: ORT is the judge below
    else:
        onnx.checker.check_model(new)
    feeds = {"x": X} if any(i.name == "x" for i in proto.graph.input) else {}
    if feeds:
        for a, b in zip(ort_run(proto, feeds), ort_run(new, feeds)):
            np.testing.assert_array_equal(a, b)  # these passes are exact: rtol 0, atol 0
    return result, new


def ops(proto):
    return [n.op_type for n in proto.graph.node]


# ------------------------------------------------------------------ cleanup

def test_cleanup_removes_leftovers_and_lifts_constants():
    nodes = [
        h.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        h.make_node("Identity", ["x"], ["xi"]),
        h.make_node("Dropout", ["xi"], ["xd"]),
        h.make_node("Add", ["xd", "c"], ["a"]),
        h.make_node("Neg", ["a"], ["dead"]),
        h.make_node("Identity", ["a"], ["y"]),
    ]
    proto = make(nodes, [nh.from_array(np.ones(3, np.float32), "unused")])
    result, new = apply(Cleanup(), proto)
    assert ops(new) == ["Add"]
    assert new.graph.node[0].output[0] == "y"  # producer renamed to the graph output
    assert [t.name for t in new.graph.initializer] == ["c"]
    assert result.changed == {"constants lifted": 1, "Identity removed": 2, "Dropout removed": 1,
                              "dead nodes removed": 1, "unused initializers removed": 1}
    again, _ = apply(Cleanup(), new)
    assert not again.modified


def test_cleanup_keeps_what_would_change_the_interface():
    nodes = [
        h.make_node("Identity", ["x"], ["y"]),  # graph input straight to graph output
        h.make_node("Dropout", ["x"], ["d", "mask"]),  # mask is used
        h.make_node("Cast", ["mask"], ["mf"], to=T.FLOAT),
        h.make_node("Add", ["d", "mf"], ["z"]),
    ]
    proto = make(nodes, outputs=("y", "z"))
    result, new = apply(Cleanup(), proto)
    assert ops(new) == ["Identity", "Dropout", "Cast", "Add"]
    assert result.skipped == {"Identity kept: graph output fed directly by a graph input, initializer or outer-scope value": 1,
                              "Dropout kept: its mask output is used": 1}
    assert not result.modified


def test_cleanup_training_dropout_is_kept():
    nodes = [h.make_node("Dropout", ["x", "r", "t"], ["y"])]
    inits = [nh.from_array(np.array(0.5, np.float32), "r"), nh.from_array(np.array(True), "t")]
    model = ir.serde.deserialize_model(make(nodes, inits))
    result = Cleanup()(model)
    assert [n.op_type for n in result.model.graph] == ["Dropout"]
    assert "Dropout kept: training_mode is not a constant false" in result.skipped


def test_cleanup_initializer_inputs_ir3_raised_to_ir4():
    w = nh.from_array(np.ones((2, 4), np.float32), "w")
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 4]), h.make_tensor_value_info("w", T.FLOAT, [2, 4])]
    proto = make([h.make_node("Add", ["x", "w"], ["y"])], [w], inputs=inputs, ir_version=7)
    _, new = apply(Cleanup(), proto)
    assert [i.name for i in new.graph.input] == ["x"]
    old = make([h.make_node("Add", ["x", "w"], ["y"])], [w], inputs=inputs, ir_version=3, opset=8)
    result = Cleanup()(ir.serde.deserialize_model(old))
    assert result.model.ir_version == 4 and [i.name for i in result.model.graph.inputs] == ["x"]
    kept = Cleanup(remove_initializer_inputs=False)(ir.serde.deserialize_model(old))
    assert kept.model.ir_version == 3 and [i.name for i in kept.model.graph.inputs] == ["x", "w"]


def test_cleanup_recurses_into_subgraphs():
    then_g = h.make_graph([h.make_node("Constant", [], ["k"], value_float=2.0),
                           h.make_node("Mul", ["x", "k"], ["m"]), h.make_node("Identity", ["m"], ["t_out"])],
                          "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["e_out"])], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    nodes = [h.make_node("ReduceSum", ["x"], ["s"], keepdims=0), h.make_node("Constant", [], ["z"], value_float=0.0),
             h.make_node("Greater", ["s", "z"], ["c"]),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    result, new = apply(Cleanup(), make(nodes))
    branches = {a.name: a.g for a in new.graph.node[-1].attribute}
    # the then branch's Identity is gone: its Mul writes the branch output itself
    assert [(n.op_type, list(n.input), list(n.output)) for n in branches["then_branch"].node] == \
        [("Mul", ["x", "k"], ["t_out"])]
    assert [o.name for o in branches["then_branch"].output] == ["t_out"]
    assert [t.name for t in branches["then_branch"].initializer] == ["k"]
    # the else branch returns the outer value through Identity: kept (renaming an outer value is unsafe)
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    # apply() compared outputs on X, whose sum is 0 (else branch); run each branch on the result
    (then_y,) = ort_run(new, {"x": X + 1})  # sum > 0: then branch, x * 2
    (else_y,) = ort_run(new, {"x": X - 1})  # sum < 0: else branch, x
    np.testing.assert_array_equal(then_y, (X + 1) * 2)
    np.testing.assert_array_equal(else_y, X - 1)


# ------------------------------------------------------------------ fold-constants

def test_fold_constants_folds_chains():
    a = nh.from_array(np.array([1, 2, 3, 4], np.float32), "a")
    b = nh.from_array(np.array([2, 2, 2, 2], np.float32), "b")
    nodes = [h.make_node("Mul", ["a", "b"], ["ab"]), h.make_node("Sqrt", ["ab"], ["r"]),
             h.make_node("Add", ["x", "r"], ["y"])]
    result, new = apply(FoldConstants(), make(nodes, [a, b]))
    assert ops(new) == ["Add"]
    assert result.changed == {"folded Mul": 1, "folded Sqrt": 1}
    folded = {t.name: nh.to_array(t) for t in new.graph.initializer}
    np.testing.assert_allclose(folded["r"], np.sqrt([2, 4, 6, 8]), rtol=1e-7)


@pytest.mark.parametrize("node, reason", [
    (h.make_node("QuantizeLinear", ["a", "s"], ["q"]), "QuantizeLinear is never folded"),
    (h.make_node("RandomUniformLike", ["a"], ["q"]), "RandomUniformLike is never folded"),
    (h.make_node("MyOp", ["a"], ["q"], domain="my.domain"), "custom-domain op"),
])
def test_fold_constants_never_folds(node, reason):
    a = nh.from_array(np.array([1, 2, 3, 4], np.float32), "a")
    s = nh.from_array(np.array(0.5, np.float32), "s")
    tail = h.make_node("Cast", ["q"], ["qf"], to=T.FLOAT)
    model = ir.serde.deserialize_model(make([node, tail, h.make_node("Add", ["x", "qf"], ["y"])], [a, s],
                                            domains=("my.domain",)))
    result = FoldConstants()(model)
    assert result.skipped == {reason: 1}
    assert [n.op_type for n in model.graph][0] == node.op_type


def test_fold_constants_folds_chains_through_large_intermediates():
    """A 256 KB intermediate that only feeds a reduction costs nothing: the chain folds to a scalar."""
    shape = nh.from_array(np.array([256, 256], np.int64), "shape")
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.array([1.0], np.float32))),
             h.make_node("ReduceSum", ["big"], ["s"], keepdims=0), h.make_node("Add", ["x", "s"], ["y"])]
    result, new = apply(FoldConstants(), make(nodes, [shape]))
    assert ops(new) == ["Add"]
    assert {t.name: nh.to_array(t).tolist() for t in new.graph.initializer}["s"] == 65536.0


def test_fold_constants_size_guard_keeps_large_frontier():
    shape = nh.from_array(np.array([64, 2, 4], np.int64), "shape")
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.array([1.0], np.float32))),
             h.make_node("Add", ["x", "big"], ["y"])]
    proto = make(nodes, [shape])
    result, new = apply(FoldConstants(), proto)  # 2 KB result from a 24-byte input: over the 1 KB limit
    assert ops(new) == ["ConstantOfShape", "Add"]
    assert result.skipped == {"result over the size budget (size-limit and bytes already saved)": 1}
    result, new = apply(FoldConstants(size_limit=4096), proto)
    assert ops(new) == ["Add"]


def test_fold_constants_skips_overridable_initializers_and_graph_outputs():
    a = nh.from_array(np.array([1, 2, 3, 4], np.float32), "a")
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 4]), h.make_tensor_value_info("a", T.FLOAT, [4])]
    nodes = [h.make_node("Neg", ["a"], ["na"]), h.make_node("Add", ["x", "na"], ["y"])]
    model = ir.serde.deserialize_model(make(nodes, [a], inputs=inputs))
    assert not FoldConstants()(model).modified
    c = nh.from_array(np.array([1, 2, 3, 4], np.float32), "c")
    model = ir.serde.deserialize_model(make([h.make_node("Neg", ["c"], ["y"])], [c]))
    assert FoldConstants()(model).skipped == {"output is a graph output": 1}


def test_fold_constants_in_loop_body_with_outer_constant():
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                         h.make_node("Mul", ["k", "k"], ["kk"]),  # outer-scope initializer
                         h.make_node("Add", ["acc_in", "kk"], ["acc_out"])], "body",
                        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                         h.make_tensor_value_info("acc_in", T.FLOAT, None)],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, None)])
    inits = [nh.from_array(np.array([3.0], np.float32), "k"), nh.from_array(np.array(2, np.int64), "n"),
             nh.from_array(np.array(True), "t")]
    result, new = apply(FoldConstants(), make([h.make_node("Loop", ["n", "t", "x"], ["y"], body=body)], inits))
    assert result.changed == {"folded Mul": 1}
    assert [n.op_type for n in new.graph.node[0].attribute[0].g.node] == ["Identity", "Add"]


# ------------------------------------------------------------------ dedup

def test_dedup_merges_identical_and_keeps_inputs():
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    inits = [nh.from_array(w, "w1"), nh.from_array(w.copy(), "w2"), nh.from_array(w + 1, "w3"),
             nh.from_array(w.copy(), "w4")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("MatMul", ["a", "w2"], ["b"]),
             h.make_node("MatMul", ["b", "w3"], ["c"]), h.make_node("MatMul", ["c", "w4"], ["y"])]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 4]), h.make_tensor_value_info("w4", T.FLOAT, [4, 4])]
    result, new = apply(Deduplicate(), make(nodes, inits, inputs=inputs))
    assert sorted(t.name for t in new.graph.initializer) == ["w1", "w3", "w4"]
    assert [n.input[1] for n in new.graph.node] == ["w1", "w1", "w3", "w4"]
    assert result.changed == {"initializers merged": 1, "bytes saved": 64}
    assert result.skipped == {"initializer is a graph input or output": 1}
    assert not Deduplicate()(ir.serde.deserialize_model(new)).modified


def test_dedup_does_not_merge_same_bytes_different_dtype():
    a = nh.from_array(np.zeros(4, np.float32), "a")
    b = nh.from_array(np.zeros(4, np.int32), "b")
    nodes = [h.make_node("Cast", ["b"], ["bf"], to=T.FLOAT), h.make_node("Add", ["x", "a"], ["xa"]),
             h.make_node("Add", ["xa", "bf"], ["y"])]
    model = ir.serde.deserialize_model(make(nodes, [a, b]))
    assert not Deduplicate()(model).modified


# ------------------------------------------------------------------ fuse-conv-bn

def _conv_bn(op="Conv", bn_output="y", extra_nodes=(), bias=True, training=None, w_shape=(4, 3, 3, 3)):
    rng = np.random.default_rng(3)
    channels = w_shape[0] if op == "Conv" else w_shape[1]
    inits = [nh.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
             nh.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "scale"),
             nh.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
             nh.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
             nh.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "var")]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(nh.from_array(rng.standard_normal(channels).astype(np.float32), "b"))
        conv_inputs.append("b")
    bn_kw = {"epsilon": 1e-3} if training is None else {"epsilon": 1e-3, "training_mode": training}
    nodes = [h.make_node(op, conv_inputs, ["c"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], [bn_output], **bn_kw),
             *extra_nodes]
    in_ch = w_shape[1] if op == "Conv" else w_shape[0]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, in_ch, 6, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 15)])


def _fuse_and_compare(proto, in_ch=3):
    from onnxopt.passes.fuse_conv_bn import FuseConvBatchNorm
    x = np.random.default_rng(4).standard_normal((1, in_ch, 6, 6)).astype(np.float32)
    model = ir.serde.deserialize_model(proto)
    result = FuseConvBatchNorm()(model)
    new = ir.to_proto(model)
    np.testing.assert_allclose(ort_run(new, {"x": x})[0], ort_run(proto, {"x": x})[0], rtol=1e-4, atol=1e-5)
    return result, new


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_conv_bn_graph_output(bias):
    result, new = _fuse_and_compare(_conv_bn(bias=bias))
    assert ops(new) == ["Conv"] and new.graph.node[0].output[0] == "y"
    assert result.changed == {"BatchNormalization fused into Conv": 1}
    assert len(new.graph.node[0].input) == 3


def test_fuse_conv_transpose_bn_followed_by_relu():
    proto = _conv_bn("ConvTranspose", bn_output="bn", extra_nodes=[h.make_node("Relu", ["bn"], ["y"])],
                     w_shape=(3, 5, 3, 3))
    result, new = _fuse_and_compare(proto)
    assert ops(new) == ["ConvTranspose", "Relu"]


def test_fuse_conv_bn_declines_with_reasons():
    from onnxopt.passes.fuse_conv_bn import FuseConvBatchNorm
    shared = _conv_bn(bn_output="bn", extra_nodes=[h.make_node("Add", ["bn", "c"], ["y"])])
    result = FuseConvBatchNorm()(ir.serde.deserialize_model(shared))
    assert result.skipped == {"conv output has other users": 1} and not result.modified
    training = _conv_bn(training=1)
    result = FuseConvBatchNorm()(ir.serde.deserialize_model(training))
    assert result.skipped == {"BN in training mode": 1}

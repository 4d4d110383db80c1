"""The onnx wheel's backend test models through onnxopt: optimize succeeds (validation on), the
optimized model still reproduces the shipped reference outputs, and it has no more nodes than the
original.  The loader and comparison live in tests/benchmarks/backend_suite.py (which also
compares with onnxslim; onnxslim is not needed here).  Plus the regression tests for what the
suite found: the writer dropping the type of initializer-backed inputs, and IR 3 weights that
could never fold.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import api, io
from onnxopt.base import count_nodes
from passes.cleanup import Cleanup
from passes.fold_constants import FoldConstants
from tests.benchmarks import backend_suite as suite
from tests.helpers import ort_run

# light_* models that take more than a few seconds here (optimize + validation + reference runs,
# one ORT thread; measured 2026-11: vgg19 14 s, alexnet 7 s, zfnet512 5 s; the other six 1-7 s,
# 25 s together with the rest of the suite).  Run them with --run-slow.
SLOW = {
    "light_vgg19": "~14 s: 20 GFLOP per run at 224x224",
    "light_bvlc_alexnet": "~7 s: its 4096x9216 Gemm runs on ORT several times",
    "light_zfnet512": "~5 s: as alexnet",
}


def _params():
    params = []
    for kind, path in suite.case_paths():
        name = path.stem if kind == "light" else path.name
        marks = [pytest.mark.slow(reason=SLOW[name])] if kind == "light" and name in SLOW else []
        params.append(pytest.param(kind, path, id=f"{kind}/{name}", marks=marks))
    return params


@pytest.mark.parametrize(("kind", "path"), _params())
def test_backend_model(kind, path, tmp_path):
    case = suite.load_case(kind, path)
    try:
        original = suite.ort_outputs(case.model, case)
    except Exception as e:  # noqa: BLE001 - the suite's own skip rule: ORT 1.32 CPU cannot run it
        pytest.skip(f"ORT cannot run the original: {suite._line(e)}")
    original_ref = suite.compare_all(original, case)
    out = tmp_path / "opt.onnx"
    report = api.optimize(case.model, out, data=suite._validation_data(case, tmp_path), latency_runs=0)
    assert report["written"]
    ok, why = suite.judge(case, out, original, original_ref)
    assert ok, why
    assert report["output"]["nodes"] <= report["input"]["nodes"]


# ---------------------------------------------------------------- writer: initializer-backed inputs

def _ir3_with_unused_initializer_input() -> onnx.ModelProto:
    """IR 3 (initializers must be inputs) with one initializer input no node reads - the shape of
    light_resnet50's ``gpu_0/imagenet1k_blobs_queue_*`` input."""
    w = nh.from_array(np.full((2, 3), 0.5, np.float32), "w")
    unused = nh.from_array(np.zeros((1, 1), np.float32), "unused")
    graph = h.make_graph(
        [h.make_node("Add", ["x", "w"], ["y"])], "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 3]), h.make_tensor_value_info("w", T.FLOAT, [2, 3]),
         h.make_tensor_value_info("unused", T.FLOAT, [1, 1])],
        [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], [w, unused])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 8)], ir_version=3)


def test_save_keeps_types_of_initializer_backed_inputs(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(_ir3_with_unused_initializer_input(), src)
    dest = tmp_path / "out.onnx"
    io.save(io.load(src), dest)
    written = onnx.load(dest)
    assert {i.name: i.type.tensor_type.elem_type for i in written.graph.input} == \
        {"x": T.FLOAT, "w": T.FLOAT, "unused": T.FLOAT}
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(ort_run(dest, {"x": x})[0], x + 0.5)  # ORT used to refuse: "Missing: unused"


def test_optimize_keeping_initializer_inputs_writes_a_loadable_ir3_model(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(_ir3_with_unused_initializer_input(), src)
    dest = tmp_path / "out.onnx"
    report = api.optimize(src, dest, pipeline_text="cleanup{remove-initializer-inputs=false},fold-constants,dedup",
                          latency_runs=0)
    assert report["written"] and report["validation"]["ok"]
    assert onnx.load(dest).ir_version == 3


# ---------------------------------------------------------------- IR 3 weights become foldable

def test_cleanup_raises_ir3_to_ir4_so_weights_fold(tmp_path):
    """light_*: every weight is ConstantOfShape(shape initializer), and in IR 3 every initializer is
    a graph input, so nothing could fold; from IR 4 the inputs go and the small fills fold."""
    shape = nh.from_array(np.array([3], np.int64), "s")
    graph = h.make_graph(
        [h.make_node("ConstantOfShape", ["s"], ["c"], value=nh.from_array(np.array([2.0], np.float32))),
         h.make_node("Unsqueeze", ["c"], ["u"], axes=[0]),
         h.make_node("Mul", ["x", "u"], ["y"])], "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 3]), h.make_tensor_value_info("s", T.INT64, [1])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 3])], [shape])
    model = ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 9)], ir_version=3))
    result = Cleanup()(model)
    assert model.ir_version == 4 and [v.name for v in model.graph.inputs] == ["x"]
    assert "IR version 3 -> 4 (initializers need not be inputs)" in result.changed
    FoldConstants()(model)
    assert [n.op_type for n in model.graph] == ["Mul"]
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), np.full((1, 3), 2.0, np.float32))


def test_fold_constants_size_guard_keeps_a_large_fill():
    """A fill larger than the budget stays a ConstantOfShape node (the bytes guard holds)."""
    shape = ir.Value(name="s", const_value=ir.tensor(np.array([64, 64], np.int64)))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([64, 64]))
    fill = ir.node("ConstantOfShape", [shape], attributes={"value": ir.tensor(np.array([1.0], np.float32))})
    add = ir.node("Add", [x, fill.outputs[0]])
    add.outputs[0].name = "y"
    graph = ir.Graph([x], [add.outputs[0]], nodes=[fill, add], initializers=[shape], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    result = FoldConstants(size_limit=1024)(model)
    assert [n.op_type for n in model.graph] == ["ConstantOfShape", "Add"]
    assert count_nodes(model) == 2 and not result.modified

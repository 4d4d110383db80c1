"""Model I/O: every bad input is one line and exit 2, input never modified, writes are atomic."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt import io
from onnxopt.errors import BadInputError
from tests.helpers import ROOT, ort_run, sha256
from tests.helpers import unwritable_dir as helpers_unwritable_dir


def _external_model(tmp_path, name="ext.onnx"):
    """y = x @ W1 @ W2 with W1/W2 (and an identical copy of W2) in an external data file."""
    rng = np.random.default_rng(0)
    w1 = nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = rng.standard_normal((64, 64)).astype(np.float32)
    inits = [w1, nh.from_array(w2, "w2"), nh.from_array(w2.copy(), "w2_copy")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("MatMul", ["a", "w2"], ["b"]),
             h.make_node("Add", ["b", "w2_copy"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [64, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, [64, 64])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path), save_as_external_data=True, location=name + ".data", size_threshold=0)
    return path


def test_load_is_lazy_and_external_data_round_trips(tmp_path, cli):
    path = _external_model(tmp_path)
    model = io.load(path)
    tensors = [t for _, t in io.external_tensors(model)]
    assert len(tensors) == 3 and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    ref = ort_run(path, {"x": x})[0]
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result = cli("optimize", path, "-o", out, "--external-data")
    assert result.exit_code == 0, result.output
    assert (out.parent / "o.onnx.data").exists()
    assert np.array_equal(ort_run(out, {"x": x})[0], ref)
    # dedup merged the copy: the data file holds two tensors, not three
    assert (out.parent / "o.onnx.data").stat().st_size == 2 * 64 * 64 * 4
    # small model without --external-data: one self-contained file
    single = tmp_path / "single.onnx"
    assert cli("optimize", path, "-o", single).exit_code == 0
    assert not (tmp_path / "single.onnx.data").exists()
    assert np.array_equal(ort_run(single, {"x": x})[0], ref)


def test_missing_and_truncated_external_data(tmp_path, cli):
    path = _external_model(tmp_path)
    data = tmp_path / "ext.onnx.data"
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    result = cli("optimize", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "is truncated" in result.stderr
    data.unlink()
    result = cli("optimize", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2
    assert "external data file 'ext.onnx.data' not found" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("content, message", [
    (b"this is not a model at all", "not"),
    (b"", "not an ONNX model"),
])
def test_not_a_protobuf(tmp_path, cli, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    result = cli("optimize", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_truncated_file_at_any_point(tmp_path, cli):
    src = (tmp_path / "x").parent
    model = io.load(_external_model(src, "t.onnx"))
    full = tmp_path / "full.onnx"
    io.save(model, full, external_data=False)
    blob = full.read_bytes()
    for cut in (1, 7, len(blob) // 3, len(blob) // 2, len(blob) - 3):
        path = tmp_path / "trunc.onnx"
        path.write_bytes(blob[:cut])
        result = cli("inspect", path)
        assert result.exit_code == 2, (cut, result.output)
        assert "bad.onnx" not in result.stderr and "trunc.onnx" in result.stderr


def test_missing_file_and_directory(tmp_path, cli):
    result = cli("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "no such file" in result.stderr
    result = cli("inspect", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_unsupported_ir_version(tmp_path, cli):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    result = cli("optimize", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "unsupported IR version 99" in result.stderr


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory where creating a file really fails (a chmod-ed one, or sysfs/procfs for root)."""
    found = helpers_unwritable_dir(tmp_path)
    if found is None:
        (tmp_path / "ro").chmod(0o700)
        pytest.skip("no unwritable directory on this machine")
    yield found
    (tmp_path / "ro").chmod(0o700)


def test_unwritable_output_dir(cli, model_copy, unwritable_dir, tmp_path):
    model = model_copy("control_flow.onnx")
    result = cli("optimize", model, "-o", unwritable_dir / "o.onnx")
    assert result.exit_code == 2 and "is not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 + result.stderr.count("warning")
    # an unwritable report is refused before the model is written
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "--report", unwritable_dir / "r.json")
    assert result.exit_code == 2 and "--report" in result.stderr and not out.exists()


def test_unwritable_output(tmp_path, cli, model_copy):
    model = model_copy("control_flow.onnx")
    result = cli("optimize", model, "-o", tmp_path / "no" / "such" / "dir" / "o.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("optimize", model, "-o", blocker / "o.onnx")  # parent is a file
    assert result.exit_code == 2
    result = cli("optimize", model, "-o", tmp_path)  # output is a directory
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_failed_write_leaves_destination_untouched(tmp_path, model_copy, monkeypatch):
    model = io.load(model_copy("control_flow.onnx"))
    dest = tmp_path / "dest.onnx"
    dest.write_bytes(b"previous content")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(BadInputError, match="No space left on device"):
        io.save(model, dest)
    assert dest.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control_flow.onnx", "dest.onnx"]


def test_refused_result_is_not_written_and_staging_removed(tmp_path, model_copy):
    src = model_copy("control_flow.onnx")
    before = sha256(src)
    model = io.load(src)
    dest = tmp_path / "o.onnx"
    with io.StagedModel(model, dest) as staged:
        assert staged.path.exists() and not dest.exists()
    assert not dest.exists() and not list(tmp_path.glob(".onnxopt-*"))
    assert sha256(src) == before  # the input is never modified


def test_lossy_commands_run_a_model_with_external_data_from_another_folder(cli, tmp_path, monkeypatch):
    """quantize and convert hand ORT serialized candidates: a model whose weights are external data
    beside it works from any working directory (ORT resolves relative data paths of bytes against
    the working directory, so the weights are read into memory first)."""
    import onnx


    folder, run = tmp_path / "m", tmp_path / "run"
    folder.mkdir()
    run.mkdir()
    onnx.save(onnx.load(str(ROOT / "models" / "vit_ts.onnx")), str(folder / "vit.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="vit.onnx.data", size_threshold=0)
    monkeypatch.chdir(run)
    for args in (("quantize", "--mode", "dynamic"), ("convert", "--fp16")):
        r = cli(args[0], folder / "vit.onnx", "-o", run / f"{args[0]}.onnx", *args[1:])
        assert r.exit_code == 0, r.output
        assert (run / f"{args[0]}.onnx").exists()
    assert (folder / "vit.onnx.data").stat().st_size > 300_000  # the input is never modified


def test_light_proto_leaves_out_on_disk_weights_and_keeps_the_model_as_it_was(tmp_path):
    """A model whose weights stay in their external-data file, one of them replaced by an in-memory copy
    (as a quantize build does): the weightless proto hands over every used on-disk weight, omits the
    unused one (a file reference ORT would resolve against the working folder), and the model's
    initializers keep their order (part of what it writes)."""
    from onnxopt import base

    proto = onnx.load(str(ROOT / "models" / "llama_ts.onnx"))
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=1024)
    model = io.load(tmp_path / "m.onnx")
    victim = next(v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor) and v.uses())
    copy = ir.Value(name=f"{victim.name}_copy", type=victim.type, shape=victim.shape,
                    const_value=ir.tensor(victim.const_value.numpy().copy()))
    model.graph.register_initializer(copy)
    for use in list(victim.uses()):
        use.node.replace_input_with(use.idx, copy)
    order = list(model.graph.initializers)
    light, left = base.light_proto(model)
    on_disk = {v.name for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    assert victim.name not in {t.name for t in light.graph.initializer} and victim.name not in left
    assert on_disk - {victim.name} <= set(left)
    assert list(model.graph.initializers) == order and model.graph.initializers[victim.name] is victim


def test_optimize_frees_its_weights_before_the_staged_check(cli, tmp_path, monkeypatch):
    """A result written with external data is validated from the staged file while the optimized model's
    own arrays are freed (its initializers now read the staged file lazily): the swap happens, and the
    written model is the validated one (outputs equal the original's to 1e-5)."""
    from onnxopt import io as oio

    monkeypatch.setattr(oio, "EXTERNAL_DATA_THRESHOLD", 0)  # every output gets an external-data file
    swapped, point_at = [], oio.point_at
    monkeypatch.setattr(oio, "point_at", lambda m, w: swapped.append(point_at(m, w)) or swapped[-1])
    src = tmp_path / "bert.onnx"
    onnx.save(onnx.load(str(ROOT / "models" / "bert_ts.onnx")), str(src))
    out = tmp_path / "o.onnx"
    r = cli("optimize", src, "-o", out)
    assert r.exit_code == 0, r.output
    assert swapped and swapped[0] > 10 and (tmp_path / "o.onnx.data").exists()
    import onnxruntime as ort

    from onnxopt import runtime
    ref = runtime.session(src)
    feeds = runtime.synthesize_runnable(ref)
    want = ref.run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, atol=1e-5)

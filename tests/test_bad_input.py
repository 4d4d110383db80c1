"""Bad input, closed: every case is ONE stderr line, the documented exit code, no traceback, no
death by signal, the inputs unchanged, and no ``.onnxopt-*`` entry left beside the output.

One table (CASES) drives the real CLI: in-process through click's CliRunner where that is the
same code path, as a subprocess (``python -m onnxopt.cli``) where the process matters (crashes:
the fork isolation only runs with real file descriptors).  Crashes are provoked with a test-only
wrapper script that replaces a library function by one that kills its own process with SIGSEGV
(no ORT 1.32 model that segfaults was found; see test_crash_isolation_api for the Python-level hook).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tests.helpers import ROOT, unwritable_dir

OPSET = [h.make_opsetid("", 17)]


def _matmul(x_shape=(4, 4), name="x"):
    w = nh.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "w")
    g = h.make_graph([h.make_node("MatMul", [name, "w"], ["y"])], "g",
                     [h.make_tensor_value_info(name, T.FLOAT, list(x_shape))],
                     [h.make_tensor_value_info("y", T.FLOAT, [x_shape[0], 4])], [w])
    return h.make_model(g, opset_imports=OPSET)


def _with_location(proto: onnx.ModelProto, location: str) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for entry in copy.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    return copy.SerializeToString()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad input, in ``<base>/in`` (models, data, metric modules); ``<base>/secret.bin`` lies
    outside the models' folder for the external-data escapes."""
    base = tmp_path_factory.mktemp("bad")
    d = base / "in"
    d.mkdir()
    (base / "secret.bin").write_bytes(b"\0" * 256)
    onnx.save(_matmul(), str(d / "good.onnx"))
    # external data: a good one, then truncated, missing, and escaping ones
    onnx.save(_matmul(), str(d / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    ext = onnx.load(str(d / "ext.onnx"), load_external_data=False)
    (d / "trunc.data").write_bytes((d / "ext.onnx.data").read_bytes()[:10])
    (d / "ext_trunc.onnx").write_bytes(_with_location(ext, "trunc.data"))
    (d / "ext_missing.onnx").write_bytes(_with_location(ext, "missing.data"))
    (d / "dotdot.onnx").write_bytes(_with_location(ext, "../secret.bin"))
    (d / "dotdot_missing.onnx").write_bytes(_with_location(ext, "../no_such_secret.bin"))
    (d / "absolute.onnx").write_bytes(_with_location(ext, str(base / "secret.bin")))
    (d / "link.data").symlink_to(base / "secret.bin")
    (d / "symlink.onnx").write_bytes(_with_location(ext, "link.data"))
    # broken files
    good = (d / "good.onnx").read_bytes()
    (d / "garbage.onnx").write_bytes(b"this is not a model at all")
    (d / "empty.onnx").write_bytes(b"")
    (d / "truncated.onnx").write_bytes(good[: len(good) // 2])
    future = _matmul()
    future.ir_version = 99
    (d / "future.onnx").write_bytes(future.SerializeToString())
    (d / "folder.onnx").mkdir()
    # broken graphs
    g = h.make_graph([h.make_node("Add", ["x", "nope"], ["y"], name="add0")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    onnx.save(h.make_model(g, opset_imports=OPSET), str(d / "undefined.onnx"))
    g = h.make_graph([h.make_node("MyOp", ["x"], ["y"], domain="my.custom")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    onnx.save(h.make_model(g, opset_imports=OPSET + [h.make_opsetid("my.custom", 1)]), str(d / "unknown_op.onnx"))
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1_000_000_000, 1000])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1_000_000_000, 1000])])
    onnx.save(h.make_model(g, opset_imports=OPSET), str(d / "huge_input.onnx"))
    shutil.copy(ROOT / "models" / "qdq_conv.onnx", d / "quantized.onnx")
    shutil.copy(ROOT / "models" / "digits_cnn.onnx", d / "digits.onnx")
    # data
    x = np.ones((4, 4), np.float32)
    np.savez(d / "wrong_name.npz", z=x)
    np.savez(d / "wrong_dtype.npz", x=x.astype(np.float64))
    np.savez(d / "wrong_rank.npz", x=x[0])
    np.savez(d / "wrong_dim.npz", x=np.ones((4, 5), np.float32))
    np.savez(d / "nan.npz", x=np.full((4, 4), np.nan, np.float32))
    np.savez(d / "digits_nan.npz", image=np.full((2, 1, 8, 8), np.nan, np.float32))
    (d / "corrupt.npz").write_bytes(b"PK\3\4 not really a zip")
    (d / "empty_dir").mkdir()
    (d / "empty_npy").mkdir()
    (d / "empty_npy" / "b.npy").write_bytes(b"")
    (d / "images").mkdir()
    (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (d / "data.txt").write_text("1 2 3")
    # metric modules
    (d / "metric_syntax.py").write_text("def score(sess:\n")
    (d / "metric_raises.py").write_text("raise RuntimeError('no GPU here')\n")
    (d / "metric_ok.py").write_text("threshold = 0.5\ndef score(sess):\n    return 1.0\n")
    (d / "bad_metric_mod_syntax.py").write_text("def score(sess:\n")
    return base


@dataclass
class Case:
    id: str
    args: list[str]  # {in} and {out} are replaced by the inputs folder and this case's output folder
    phrase: str
    code: int = 2
    crash: str | None = None  # run as a subprocess with this library function replaced by a crasher
    needs: str | None = None  # "unwritable": skip when the machine has no unwritable folder
    extra: dict = field(default_factory=dict)


OPT = ["optimize"]
CASES = [
    # ---- the file itself
    Case("missing-file", OPT + ["{in}/nope.onnx", "-o", "{out}/o.onnx"], "no such file"),
    Case("missing-file-validate", ["validate", "{in}/nope.onnx", "{in}/good.onnx"], "no such file"),
    Case("missing-file-bench", ["bench", "{in}/nope.onnx", "--runs", "1", "--warmup", "0"], "no such file"),
    Case("missing-file-quantize", ["quantize", "{in}/nope.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz"],
         "no such file"),
    Case("directory-as-model", ["inspect", "{in}/folder.onnx"], "is a directory"),
    Case("garbage-file", OPT + ["{in}/garbage.onnx", "-o", "{out}/o.onnx"], "garbage.onnx: not"),
    Case("garbage-file-quantize", ["quantize", "{in}/garbage.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz"],
         "garbage.onnx: not"),
    Case("empty-file", OPT + ["{in}/empty.onnx", "-o", "{out}/o.onnx"], "not an ONNX model"),
    Case("truncated-file", OPT + ["{in}/truncated.onnx", "-o", "{out}/o.onnx"], "truncated.onnx"),
    Case("truncated-file-bench", ["bench", "{in}/truncated.onnx", "--runs", "1", "--warmup", "0"], "truncated.onnx"),
    Case("future-ir-version", OPT + ["{in}/future.onnx", "-o", "{out}/o.onnx"], "unsupported IR version 99"),
    # ---- external data
    Case("external-data-missing", OPT + ["{in}/ext_missing.onnx", "-o", "{out}/o.onnx"], "'missing.data' not found"),
    Case("external-data-truncated", OPT + ["{in}/ext_trunc.onnx", "-o", "{out}/o.onnx"], "is truncated"),
    Case("external-data-dotdot", OPT + ["{in}/dotdot.onnx", "-o", "{out}/o.onnx"], "points outside the model's folder"),
    Case("external-data-dotdot-no-validate", OPT + ["{in}/dotdot.onnx", "-o", "{out}/o.onnx", "--no-validate"],
         "points outside the model's folder"),
    Case("external-data-dotdot-missing", OPT + ["{in}/dotdot_missing.onnx", "-o", "{out}/o.onnx", "--no-validate"],
         "points outside the model's folder"),
    Case("external-data-absolute", OPT + ["{in}/absolute.onnx", "-o", "{out}/o.onnx"], "points outside the model's folder"),
    Case("external-data-symlink", OPT + ["{in}/symlink.onnx", "-o", "{out}/o.onnx"], "points outside the model's folder"),
    Case("external-data-dotdot-inspect", ["inspect", "{in}/dotdot.onnx"], "points outside the model's folder"),
    Case("external-data-dotdot-validate", ["validate", "{in}/ext.onnx", "{in}/dotdot.onnx"], "points outside"),
    Case("external-data-dotdot-bench", ["bench", "{in}/dotdot.onnx", "--runs", "1", "--warmup", "0"], "points outside"),
    # ---- the graph
    Case("undefined-tensor", OPT + ["{in}/undefined.onnx", "-o", "{out}/o.onnx"], "reads 'nope'"),
    Case("undefined-tensor-no-validate", OPT + ["{in}/undefined.onnx", "-o", "{out}/o.onnx", "--no-validate"], "reads 'nope'"),
    Case("undefined-tensor-validate", ["validate", "{in}/good.onnx", "{in}/undefined.onnx"], "reads 'nope'"),
    Case("unknown-op", OPT + ["{in}/unknown_op.onnx", "-o", "{out}/o.onnx"], "ONNX Runtime cannot load it"),
    Case("unknown-op-bench", ["bench", "{in}/unknown_op.onnx", "--runs", "1", "--warmup", "0"], "ONNX Runtime cannot load it"),
    Case("already-quantized", ["quantize", "{in}/quantized.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz"],
         "already quantized"),
    # ---- synthesized inputs
    Case("huge-input", OPT + ["{in}/huge_input.onnx", "-o", "{out}/o.onnx"], "input 'x' [1000000000, 1000]"),
    Case("huge-input-validate", ["validate", "{in}/huge_input.onnx", "{in}/huge_input.onnx"], "limit 1 GiB"),
    Case("huge-input-bench", ["bench", "{in}/huge_input.onnx", "--runs", "1", "--warmup", "0"], "--data"),
    Case("shape-rank", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--shape", "x:4x4x4"], "rank 3 given"),
    Case("shape-unknown-input", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--shape", "z:4x4"], "unknown input"),
    # ---- --data
    Case("data-wrong-name", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/wrong_name.npz"],
         "do not match model inputs"),
    Case("data-wrong-dtype", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/wrong_dtype.npz"], "dtype float64"),
    Case("data-wrong-rank", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/wrong_rank.npz"], "expects rank 2"),
    Case("data-wrong-dim", ["validate", "{in}/good.onnx", "{in}/good.onnx", "--data", "{in}/wrong_dim.npz"], "model expects"),
    Case("data-nan", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/nan.npz"], "NaN or Inf"),
    Case("data-nan-bench", ["bench", "{in}/good.onnx", "--data", "{in}/nan.npz", "--runs", "1", "--warmup", "0"], "NaN or Inf"),
    Case("data-nan-quantize", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz"],
         "NaN or Inf"),
    Case("data-empty-dir", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/empty_dir"], "no data found"),
    Case("data-missing", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/nope.npz"], "no such data file"),
    Case("data-empty-npy", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/empty_npy"], "not a readable .npy"),
    Case("data-broken-image", ["validate", "{in}/digits.onnx", "{in}/digits.onnx", "--data", "{in}/images",
                               "--preprocess", "resize=8x8,channels=1"], "cannot read image"),
    Case("data-corrupt", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/corrupt.npz"], "not a readable .npz"),
    Case("data-not-npz", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--data", "{in}/data.txt"], "must be .npz"),
    # ---- output
    Case("output-dir-missing", OPT + ["{in}/good.onnx", "-o", "{out}/no/such/dir/o.onnx"], "does not exist"),
    Case("output-is-directory", OPT + ["{in}/good.onnx", "-o", "{out}"], "is a directory"),
    Case("output-parent-is-file", OPT + ["{in}/good.onnx", "-o", "{in}/good.onnx/o.onnx"], "is not a directory"),
    Case("output-unwritable", OPT + ["{in}/good.onnx", "-o", "{unwritable}/o.onnx"], "is not writable", needs="unwritable"),
    Case("output-unwritable-quantize", ["quantize", "{in}/digits.onnx", "-o", "{unwritable}/q.onnx", "--data",
                                        "{in}/digits_nan.npz"], "is not writable", needs="unwritable"),
    # ---- --metric (quantize); the metric is loaded before the model or the data are read
    Case("metric-syntax-error-path", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                      "--metric", "{in}/metric_syntax.py:score"], "syntax error"),
    Case("metric-syntax-error-module", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                        "--metric", "bad_metric_mod_syntax:score"], "syntax error",
         extra={"syspath": True}),
    Case("metric-raises-at-import", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                     "--metric", "{in}/metric_raises.py:score"], "RuntimeError: no GPU here"),
    Case("metric-module-not-found", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                     "--metric", "no_such_module_for_onnxopt:score"], "no module named"),
    Case("metric-file-not-found", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                   "--metric", "{in}/nope.py:score"], "no such file"),
    Case("metric-attribute-missing", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                      "--metric", "{in}/metric_ok.py:nope"], "has no attribute 'nope'"),
    Case("metric-not-callable", ["quantize", "{in}/digits.onnx", "-o", "{out}/q.onnx", "--data", "{in}/digits_nan.npz",
                                 "--metric", "{in}/metric_ok.py:threshold"], "is not callable"),
    # ---- native crashes (subprocess: the fork isolation needs real file descriptors)
    Case("crash-in-ort-optimize", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx"], "crashed (SIGSEGV) on",
         crash="onnxopt.runtime:session"),
    Case("crash-while-writing", OPT + ["{in}/good.onnx", "-o", "{out}/o.onnx", "--no-validate"], "nothing written",
         crash="onnx_ir:save"),
    Case("crash-in-ort-bench", ["bench", "{in}/good.onnx", "--runs", "1", "--warmup", "0"], "crashed (SIGSEGV) on",
         crash="onnxopt.runtime:session"),
]

# Test-only wrapper: replace MODULE.ATTR by a function that (for a write: after starting the
# staged file) kills its own process with SIGSEGV, as a segfaulting ORT would; then run the CLI.
CRASHER = textwrap.dedent("""
    import importlib, os, signal, sys
    module, attr = sys.argv[1].split(":")
    def crash(*args, **kwargs):
        if len(args) > 1 and isinstance(args[1], (str, os.PathLike)) and attr == "save":
            open(args[1], "wb").write(b"partial")
        os.kill(os.getpid(), signal.SIGSEGV)
    setattr(importlib.import_module(module), attr, crash)
    from onnxopt.cli import main
    main(sys.argv[2:], prog_name="onnxopt")
""")


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _leftovers(*folders: Path) -> list[str]:
    return [str(p) for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(".onnxopt-")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, inputs, tmp_path, cli, monkeypatch):
    d = inputs / "in"
    out = tmp_path / "out"
    out.mkdir()
    unwritable = unwritable_dir(tmp_path) if case.needs == "unwritable" else None
    if case.needs == "unwritable" and unwritable is None:
        pytest.skip("no unwritable directory on this machine")
    args = [a.format(**{"in": d, "out": out, "unwritable": unwritable}) for a in case.args]
    before = _tree_hashes(inputs)
    if case.extra.get("syspath"):
        monkeypatch.syspath_prepend(str(d))  # the module form finds modules on sys.path (and the cwd)
    try:
        if case.crash:
            proc = subprocess.run([sys.executable, "-c", CRASHER, case.crash, *args], check=False, capture_output=True,
                                  text=True, timeout=120, cwd=tmp_path)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        else:
            result = cli(*args)
            code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    finally:
        if unwritable is not None and unwritable.name == "ro":
            unwritable.chmod(0o700)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == case.code, (code, stdout, stderr)  # a negative code would be a death by signal
    assert len(lines) == 1, stderr
    assert "Traceback" not in stdout + stderr
    assert lines[0].startswith("onnxopt: error: ") and case.phrase in lines[0], lines[0]
    assert _tree_hashes(inputs) == before, "an input file changed"
    assert not _leftovers(out, d, out.parent), "temporary entries left behind"
    assert not any(out.iterdir()) or case.id == "output-dir-missing", "something was written"


def test_external_data_escape_message_does_not_tell_whether_the_file_exists(inputs, cli):
    d = inputs / "in"
    existing = cli("inspect", d / "dotdot.onnx").stderr.replace("dotdot.onnx", "M").replace("../secret.bin", "L")
    missing = cli("inspect", d / "dotdot_missing.onnx").stderr.replace("dotdot_missing.onnx", "M").replace(
        "../no_such_secret.bin", "L")
    assert existing == missing


def test_crash_isolation_api(tmp_path):
    """The documented hook: run_isolated with a function that kills its process by SIGSEGV."""
    from onnxopt.cli import run_isolated
    from onnxopt.errors import BadInputError, Terminated

    assert run_isolated(lambda: None, "m.onnx") == 0
    assert run_isolated(lambda: 1 / 0, "m.onnx") == 4  # an unexpected error: one line, exit 4
    staged = tmp_path / "out"
    staged.mkdir()

    def crash_while_staging():
        import faulthandler

        from onnxopt import io

        faulthandler.disable()  # pytest's dump of the "crash" is noise here
        (staged / (io.staging_prefix() + "abc")).mkdir()
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(BadInputError, match=r"crashed \(SIGSEGV\) on m.onnx; nothing written"):
        run_isolated(crash_while_staging, "m.onnx", staged / "o.onnx")
    assert not list(staged.iterdir()), "the crashed child's staging folder was not removed"
    with pytest.raises(Terminated, match=r"killed \(SIGTERM\)") as killed:
        run_isolated(lambda: os.kill(os.getpid(), signal.SIGTERM), "m.onnx")
    assert killed.value.exit_code == 128 + signal.SIGTERM


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import onnx_ir
    def slow_save(model, path, **kwargs):
        open(path, "wb").write(b"partial")
        print("writing", flush=True)
        time.sleep(60)
    onnx_ir.save = slow_save
    from onnxopt.cli import main
    main(sys.argv[1:], prog_name="onnxopt")
""")


def test_sigkill_mid_write_leaves_nothing_the_next_run_keeps(inputs, tmp_path, cli):
    """SIGKILL of onnxopt while it writes: the child dies with it, and the staging folder it leaves
    (named after its pid) is removed by the next run writing to the same folder."""
    from onnxopt import io

    out = tmp_path / "out"
    out.mkdir()
    model = inputs / "in" / "good.onnx"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "optimize", str(model), "-o", str(out / "o.onnx"),
                             "--no-validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        left = _leftovers(out)
        assert len(left) == 1 and Path(left[0]).is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    child = int(Path(left[0]).name.split("-")[1])
    deadline = time.monotonic() + 20
    while not _dead(child) and time.monotonic() < deadline:  # the child dies with its parent
        time.sleep(0.05)
    assert _dead(child), "the writer outlived the killed onnxopt process"
    assert _leftovers(out) == left  # nobody could clean up: SIGKILL
    old = time.time() - io.STALE_AFTER_SECONDS - 1
    os.utime(left[0], (old, old))
    result = cli("optimize", model, "-o", out / "again.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["again.onnx"]


def test_stale_staging_of_live_or_recent_processes_is_kept(tmp_path):
    from onnxopt import io

    mine = tmp_path / (io.staging_prefix() + "x")
    alive = tmp_path / (io.staging_prefix(os.getppid()) + "y")
    other_host = tmp_path / ".onnxopt-999999999-zzzzzz-q"
    dead_recent = tmp_path / (io.staging_prefix(_dead_pid()) + "z")
    for p in (mine, alive, other_host, dead_recent):
        p.mkdir()
    assert io.remove_stale_staging(tmp_path) == []  # own, alive, foreign host, and too recent
    old = time.time() - io.STALE_AFTER_SECONDS - 1
    os.utime(dead_recent, (old, old))
    assert io.remove_stale_staging(tmp_path) == [dead_recent]


def _dead(pid: int) -> bool:
    from onnxopt import io

    return not io._pid_alive(pid)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigint_from_outside_the_terminal_stops_the_isolated_command():
    """`kill -INT` (or a CI runner cancelling a job) reaches only the parent: it must be forwarded
    to the forked child, which stops with exit 130 instead of running to the end."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "onnxopt.cli", "bench", str(ROOT / "models" / "digits_cnn.onnx"),
                          "--runs", "2000000", "--warmup", "1"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    try:
        p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("SIGINT was not forwarded: the benchmark kept running") from None
    assert p.returncode == 130


def test_sys_exit_inside_the_isolated_command_keeps_its_code():
    import sys

    from onnxopt import cli
    assert [cli.run_isolated(lambda c=c: sys.exit(c), "m") for c in (None, 0, 3)] == [0, 0, 3]


def test_a_staging_folder_whose_lock_is_held_is_never_removed(tmp_path):
    """A pid that looks dead here may belong to a live writer in another PID namespace: the lock it
    holds on its staging folder keeps the folder, whatever the pid says."""
    import os
    import time

    import onnx_ir as ir

    from onnxopt import io
    model = io.load(ROOT / "models" / "digits_cnn.onnx")
    with io.StagedModel(model, tmp_path / "out.onnx") as staged:
        folder = staged.path.parent
        dead = folder.with_name(folder.name.replace(f"-{os.getpid()}-", "-999999-", 1))
        os.rename(folder, dead)  # the same folder (and its held lock) under a dead process's name
        old = time.time() - 3600
        os.utime(dead, (old, old))
        assert io.remove_stale_staging(tmp_path) == [] and dead.exists()
        os.rename(dead, folder)
    assert not folder.exists()
    assert isinstance(model, ir.Model)

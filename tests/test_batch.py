"""onnxopt batch: one process per model, failure isolation, resumability, summary JSON/HTML, Ray."""

from __future__ import annotations

import html.parser
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from onnxopt import __version__, api
from onnxopt.commands import batch
from tests.helpers import ROOT

SMALL = ("fp16_mlp.onnx", "integer_ops.onnx", "qdq_conv.onnx", "control_flow.onnx")


def _copy(names, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        shutil.copy(ROOT / "models" / n, folder / n)
        out.append(folder / n)
    return out


def _zoo_inputs(folder: Path) -> list[str]:
    """4 good models (a folder), a corrupt file, a model that crashes ONNX Runtime, and a manifest
    with a model over --max-rss and one past its timeout."""
    models = folder / "models"
    _copy(SMALL, models)
    (folder / "corrupt.onnx").write_bytes(b"this is not a protobuf")
    # ORT 1.32's CPU EP segfaults creating a session of the fp16 crnn (its classifier's Transpose)
    api.convert(ROOT / "models" / "crnn.onnx", folder / "crnn_fp16.onnx", validate_result=False)
    _copy(("cnn_bn_depthwise.onnx", "exporter_opset11.onnx"), folder / "limits")
    (folder / "limits.json").write_text(json.dumps([
        {"path": "limits/cnn_bn_depthwise.onnx", "options": {"max_rss_mb": 1}},
        {"path": "limits/exporter_opset11.onnx", "options": {"timeout": 0.5}},
    ]))
    return [str(models), str(folder / "corrupt.onnx"), str(folder / "crnn_fp16.onnx"), str(folder / "limits.json")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    inputs = _zoo_inputs(folder)
    ticks = []
    summary = api.batch(inputs, folder / "out", workers=2, progress=ticks.append)
    return folder, inputs, summary, ticks


def _by_name(summary: dict) -> dict[str, dict]:
    return {e["name"]: e for e in summary["models"]}


def _no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".onnxopt-*")]


def test_failures_are_isolated_and_carry_reasons(zoo):
    from onnxopt.precision import convert

    folder, _, summary, ticks = zoo
    m = _by_name(summary)
    assert sum(ticks) == len(m) == 8
    crash = m["crnn_fp16"]
    if convert.crashes_default_session(folder / "crnn_fp16.onnx"):  # this ORT still has the bug
        assert crash["status"] == "failed" and "crashed (SIGSEGV)" in crash["reason"], crash
        assert not (folder / "out" / "crnn_fp16" / "crnn_fp16.onnx").exists()
    else:
        assert crash["status"] == "ok", crash
    for n in SMALL:
        e = m[Path(n).stem]
        assert e["status"] == "ok", e
        assert e["exit_code"] == 0
        assert (folder / "out" / e["name"] / f"{e['name']}.onnx").is_file()
        assert (folder / "out" / e["name"] / "report.json").is_file()
    bad = m["corrupt"]
    assert bad["status"] == "failed" and bad["exit_code"] == 2
    assert bad["reason"].startswith("bad input: ") and "protobuf" in bad["reason"]
    rss = m["cnn_bn_depthwise"]
    assert rss["status"] == "failed" and rss["reason"].startswith("memory: ") and "--max-rss 1 MB" in rss["reason"]
    slow = m["exporter_opset11"]
    assert slow["status"] == "failed" and slow["reason"].startswith("timeout: ") and "0.5 s" in slow["reason"]
    assert slow["seconds"] < 5
    for e in (rss, slow):
        assert not (folder / "out" / e["name"] / f"{e['name']}.onnx").exists()
    assert summary["totals"] == {**summary["totals"], "models": 8, "ok": 4 + (crash["status"] == "ok"),
                                 "failed": 3 + (crash["status"] == "failed")}
    assert _no_temp_files(folder / "out") == []


def test_summary_fields(zoo):
    folder, _, summary, _ = zoo
    assert summary["command"] == "batch" and summary["batch_command"] == "optimize"
    on_disk = json.loads((folder / "out" / "summary.json").read_text())
    assert [e["name"] for e in on_disk["models"]] == [e["name"] for e in summary["models"]]
    e = _by_name(summary)["fp16_mlp"]
    for key in ("status", "reason", "exit_code", "seconds", "nodes_before", "nodes_after", "size_before", "size_after",
                "validation", "latency_ratio", "input_sha256", "options", "onnxopt_version", "runs", "finished_at"):
        assert key in e, key
    assert e["nodes_after"] < e["nodes_before"]
    assert e["size_before"] == (ROOT / "models" / "fp16_mlp.onnx").stat().st_size
    assert e["validation"]["status"] == "ok" and e["validation"]["max_abs"] is not None
    assert set(e["latency_ratio"]) == {"cpu"} and e["latency_ratio"]["cpu"] > 0
    assert e["onnxopt_version"] == __version__ and e["runs"] == 1
    assert e["input_sha256"] == batch.input_sha256(ROOT / "models" / "fp16_mlp.onnx")[0]
    assert _by_name(summary)["exporter_opset11"]["options"] == {"timeout": 0.5}


class _Rows(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.svgs, self.scripts, self._row = [], 0, 0, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def test_summary_html(zoo):
    folder, _, summary, _ = zoo
    page = (folder / "out" / "summary.html").read_text()
    parser = _Rows()
    parser.feed(page)
    parser.close()
    names = {r[0] for r in parser.rows[1:]}
    assert names == {e["name"] for e in summary["models"]}
    assert parser.svgs == 2 and parser.scripts == 1
    assert "Size after / before" in page and "Speed-up" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_resume_skips_finished_and_reruns_changed(tmp_path, cli):
    inputs = [str(p) for p in _copy(SMALL[:3], tmp_path / "in")]
    out = tmp_path / "out"
    first = _by_name(api.batch(inputs, out, workers=2))
    assert {e["status"] for e in first.values()} == {"ok"}

    r = cli("batch", *inputs, "-o", out)  # the CLI: nothing to do, one line per model and the totals
    assert r.exit_code == 0, r.output
    assert "3 skipped" in r.output and r.output.count("skipped: unchanged") == 3
    second = _by_name(json.loads((out / "summary.json").read_text()))
    assert all(e["status"] == "skipped" and e["finished_status"] == "ok" and e["runs"] == 1 for e in second.values())

    changed = tmp_path / "in" / "integer_ops.onnx"
    proto = onnx.load(changed)
    proto.doc_string = "changed"
    onnx.save(proto, changed)
    third = _by_name(api.batch(inputs, out, workers=2))
    assert {n: (e["status"], e["runs"]) for n, e in third.items()} == {
        "fp16_mlp": ("skipped", 1), "integer_ops": ("ok", 2), "qdq_conv": ("skipped", 1)}

    other_options = _by_name(api.batch(inputs[:1], out, options={"pipeline": "cleanup"}))
    assert other_options["fp16_mlp"]["status"] == "ok" and other_options["fp16_mlp"]["runs"] == 2

    forced = _by_name(api.batch(inputs[:1], out, options={"pipeline": "cleanup"}, force=True))
    assert forced["fp16_mlp"]["status"] == "ok" and forced["fp16_mlp"]["runs"] == 3
    assert _no_temp_files(out) == []


def test_validate_resume_follows_the_second_model(tmp_path):
    """validate's result depends on both models: a rerun skips only while the model it compares
    with (``against``) is unchanged, and validates again once that file changes."""
    (src,) = _copy(SMALL[:1], tmp_path / "in")
    against = tmp_path / "against.onnx"
    shutil.copy(src, against)
    out = tmp_path / "out"
    opts = {"against": str(against)}
    first = _by_name(api.batch([src], out, command="validate", options=opts))["fp16_mlp"]
    assert first["status"] == "ok", first
    again = _by_name(api.batch([src], out, command="validate", options=opts))["fp16_mlp"]
    assert again["status"] == "skipped" and again["runs"] == 1
    proto = onnx.load(against)
    proto.doc_string = "re-exported"
    onnx.save(proto, against)
    rerun = _by_name(api.batch([src], out, command="validate", options=opts))["fp16_mlp"]
    assert rerun["status"] == "ok" and rerun["runs"] == 2, rerun


def _driver(inputs, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "onnxopt.cli", "batch", *map(str, inputs), "-o", str(out),
                             "--workers", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_first_finished(out: Path, proc: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        assert proc.poll() is None, "the batch ended before it could be killed"
        try:
            doc = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError):
            doc = {}
        if any(e.get("status") == "ok" for e in doc.get("models", [])):
            return
        time.sleep(0.05)
    raise AssertionError("no model finished in time")


def _started(tmp_path):
    """A 3-model batch driver in a subprocess, returned once its first model has finished."""
    inputs = _copy(SMALL[:3], tmp_path / "in")
    out = tmp_path / "out"
    proc = _driver(inputs, out)
    _wait_first_finished(out, proc)
    return inputs, out, proc


def test_kill9_then_rerun_runs_only_the_missing(tmp_path):
    inputs, out, proc = _started(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after_kill = _by_name(json.loads((out / "summary.json").read_text()))
    done = {n for n, e in after_kill.items() if e["status"] == "ok"}
    assert 1 <= len(done) < 3
    time.sleep(0.5)  # the killed driver's model process dies with it (PR_SET_PDEATHSIG)
    import psutil

    orphans = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert orphans == []
    rerun = _by_name(api.batch([str(p) for p in inputs], out, workers=2))
    for n, e in rerun.items():
        if n in done:
            assert e["status"] == "skipped" and e["runs"] == 1, e
        else:
            assert e["status"] == "ok" and e["runs"] == 1, e


def test_sigterm_keeps_finished_results_and_no_temp_files(tmp_path):
    inputs, out, proc = _started(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    summary = _by_name(json.loads((out / "summary.json").read_text()))
    statuses = sorted(e["status"] for e in summary.values())
    assert "ok" in statuses and "pending" in statuses
    assert all(e["reason"] == "interrupted before it finished" for e in summary.values() if e["status"] == "pending")
    assert _no_temp_files(out) == []


def test_collect_manifests_and_names(tmp_path):
    _copy(("fp16_mlp.onnx",), tmp_path / "a")
    _copy(("fp16_mlp.onnx",), tmp_path / "b")
    (tmp_path / "m.json").write_text(json.dumps({"models": [
        "a/fp16_mlp.onnx", {"path": "b/fp16_mlp.onnx", "options": {"data": "calib", "max-drop": 0.02}}]}))
    jobs = batch.collect([tmp_path / "m.json"], {"ep": "cpu", "max_drop": 0.01})
    assert [j["name"] for j in jobs] == ["fp16_mlp", "fp16_mlp-2"]
    assert jobs[0]["options"] == {"ep": "cpu", "max_drop": 0.01}
    assert jobs[1]["options"] == {"ep": "cpu", "max_drop": 0.02, "data": str(tmp_path / "calib")}
    assert batch.ray_resources({"ep": "openvino"}) == {"openvino": 1} and batch.ray_resources({}) == {}
    args = batch._cli_args("optimize", {"name": "m", "input": "m.onnx",
                                        "options": {"shape": ["x:1x3"], "validate": False, "timeout": 3}}, Path("o"))
    assert args == ["optimize", "m.onnx", "-o", "o/m.onnx", "--report", "o/report.json", "--shape", "x:1x3",
                    "--no-validate"]
    try:
        import yaml  # noqa: F401
    except ImportError:
        return
    (tmp_path / "m.yaml").write_text("- path: a/fp16_mlp.onnx\n  options: {pipeline: cleanup}\n")
    assert batch.collect([tmp_path / "m.yaml"])[0]["options"] == {"pipeline": "cleanup"}


def test_ray_local_cluster_gives_the_same_statuses(zoo, tmp_path):
    pytest.importorskip("ray", reason="Ray is optional: pip install -e '.[ray]'")
    folder, _, local, _ = zoo
    inputs = [str(folder / "models" / "fp16_mlp.onnx"), str(folder / "corrupt.onnx"), str(folder / "limits.json")]
    summary = api.batch(inputs, tmp_path / "out", workers=2, ray_address="local")
    expected = {n: (e["status"], e["reason"].split(":")[0]) for n, e in _by_name(local).items()}
    got = {n: (e["status"], e["reason"].split(":")[0]) for n, e in _by_name(summary).items()}
    assert got == {n: expected[n] for n in got}
    assert (tmp_path / "out" / "fp16_mlp" / "fp16_mlp.onnx").is_file()


def test_ctrl_c_exits_130_and_keeps_finished_results(tmp_path):
    _, out, proc = _started(tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    statuses = sorted(e["status"] for e in json.loads((out / "summary.json").read_text())["models"])
    assert "ok" in statuses


def test_batch_runs_convert_and_prune(tmp_path, cli):
    """The commands added after batch run through it like the first four: convert --fp16 (the
    already-fp16 model fails with its reason), prune --sparsity with data (scored within budget)."""
    from models import tasks

    inputs = _copy(("cnn_dynamic.onnx", "fp16_mlp.onnx", "fp16_overflow.onnx"), tmp_path / "in")
    r = cli("batch", *inputs, "-o", tmp_path / "fp16", "--command", "convert", "--fp16", "--workers", "2")
    m = _by_name(json.loads((tmp_path / "fp16" / "summary.json").read_text()))
    assert m["cnn_dynamic"]["status"] == "ok" and m["fp16_overflow"]["status"] == "ok", r.output
    assert m["cnn_dynamic"]["validation"]["status"] == "ok" and m["cnn_dynamic"]["size_after"] < m["cnn_dynamic"]["size_before"]
    assert onnx.load(tmp_path / "fp16" / "cnn_dynamic" / "cnn_dynamic.onnx").graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
    assert m["fp16_mlp"]["status"] == "failed" and m["fp16_mlp"]["reason"].startswith("bad input: "), m["fp16_mlp"]

    calib = tasks.write_calibration("digits_cnn", tmp_path / "calib", batches=8, batch_size=8)
    (src,) = _copy(("digits_cnn.onnx",), tmp_path / "digits")
    r = cli("batch", src, "-o", tmp_path / "pruned", "--command", "prune", "--sparsity", "0.3", "--data", calib,
            "--max-drop", "0.05")
    e = _by_name(json.loads((tmp_path / "pruned" / "summary.json").read_text()))["digits_cnn"]
    assert r.exit_code == 0 and e["status"] == "ok", (r.output, e)
    assert e["validation"]["status"] == "ok" and e["validation"]["drop"] <= 0.05 and e["validation"]["value"] is not None
    w = [onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "pruned" / "digits_cnn" / "digits_cnn.onnx").graph.initializer]
    assert sum((a == 0).sum() for a in w if a.ndim >= 2) > 0.1 * sum(a.size for a in w if a.ndim >= 2)


def test_deterministic_failure_is_skipped_until_retry_failed(tmp_path, cli):
    """A corrupt model fails with exit 2 (bad input): a rerun with the same key reports it skipped
    (finished_status failed, not run again, the batch still exits 2); --retry-failed reruns it."""
    (good,) = _copy(SMALL[:1], tmp_path / "in")
    corrupt = tmp_path / "in" / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    out = tmp_path / "out"

    def summary():
        return _by_name(json.loads((out / "summary.json").read_text()))

    r = cli("batch", good, corrupt, "-o", out)
    first = summary()["corrupt"]
    assert r.exit_code == 2 and first["status"] == "failed" and first["exit_code"] == 2, r.output
    assert first["retryable"] is False and first["runs"] == 1 and summary()["fp16_mlp"]["retryable"] is False
    log_mtime = (out / "corrupt" / "log.txt").stat().st_mtime_ns

    r = cli("batch", good, corrupt, "-o", out)
    again = summary()["corrupt"]
    assert r.exit_code == 2, r.output
    assert again["status"] == "skipped" and again["finished_status"] == "failed" and again["runs"] == 1, again
    assert "failed before with the same input, options and onnxopt version" in again["reason"]
    assert "protobuf" in again["reason"] and "--retry-failed" in again["reason"]
    assert again["finished_reason"] == first["reason"] and again["retryable"] is False
    assert (out / "corrupt" / "log.txt").stat().st_mtime_ns == log_mtime  # not run again
    assert "2 skipped (1 failed before)" in r.output and "corrupt: skipped: failed before" in r.output

    r = cli("batch", good, corrupt, "-o", out, "--retry-failed")
    retried = summary()
    assert r.exit_code == 2, r.output
    assert retried["corrupt"]["status"] == "failed" and retried["corrupt"]["runs"] == 2, retried["corrupt"]
    assert retried["fp16_mlp"]["status"] == "skipped" and retried["fp16_mlp"]["runs"] == 1
    assert summary()["corrupt"]["reason"].startswith("bad input: ")
    assert batch.retryable({"status": "failed", "exit_code": -int(signal.SIGSEGV), "reason": "died"}) is False
    assert batch.retryable({"status": "failed", "exit_code": -int(signal.SIGKILL), "reason": "died"}) is True
    assert batch.retryable({"status": "failed", "exit_code": None, "reason": "ray task failed: X"}) is True


def test_timeout_kill_is_retried(tmp_path, cli):
    """The driver's own kill (--timeout) is not the model's fault: the next run tries it again."""
    (model,) = _copy(SMALL[:1], tmp_path / "in")
    out = tmp_path / "out"
    r = cli("batch", model, "-o", out, "--timeout", "0.3")
    first = _by_name(json.loads((out / "summary.json").read_text()))["fp16_mlp"]
    assert r.exit_code == 2 and first["status"] == "failed" and first["reason"].startswith("timeout: "), first
    assert first["retryable"] is True
    r = cli("batch", model, "-o", out, "--timeout", "0.3")  # the same key: run again, killed again
    second = _by_name(json.loads((out / "summary.json").read_text()))["fp16_mlp"]
    assert second["status"] == "failed" and second["runs"] == 2 and second["reason"].startswith("timeout: "), second
    r = cli("batch", model, "-o", out)
    third = _by_name(json.loads((out / "summary.json").read_text()))["fp16_mlp"]
    assert r.exit_code == 0 and third["status"] == "ok" and third["runs"] == 3, (r.output, third)


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_fast(tmp_path, cli):
    """--ray=ADDRESS where nothing listens: one error line naming the address, exit 2, in seconds
    (Ray itself retries for minutes), for batch and quantize --search alike."""
    from models import tasks

    address = f"127.0.0.1:{_free_loopback_port()}"
    (model,) = _copy(("digits_cnn.onnx",), tmp_path / "in")
    t0 = time.perf_counter()
    r = cli("batch", model, "-o", tmp_path / "out", f"--ray={address}")
    assert time.perf_counter() - t0 < 20
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert errors == [f"onnxopt: error: --ray {address}: no Ray cluster answers at this address (Connection refused); "
                      "check it, or start one there with `ray start --head`"], r.stderr
    assert not (tmp_path / "out" / "summary.json").exists()

    calib = tasks.write_calibration("digits_cnn", tmp_path / "calib", batches=2, batch_size=8)
    t0 = time.perf_counter()
    r = cli("quantize", model, "-o", tmp_path / "q.onnx", "--data", calib, "--search", f"--ray={address}")
    assert time.perf_counter() - t0 < 20
    assert r.exit_code == 2 and f"--ray {address}: no Ray cluster answers" in r.stderr, r.output
    assert not (tmp_path / "q.onnx").exists()


def test_failures_of_the_machine_are_retried():
    """Out of memory, a full disk, an OS error: exit 2 or 4 all the same, but not the model's fault."""
    for reason in ("bad input: [ONNXRuntimeError] Failed to allocate memory for requested buffer",
                   "internal error: MemoryError: ", "internal error: OSError: [Errno 28] No space left on device"):
        assert batch.retryable({"exit_code": 2, "reason": reason}), reason
    assert not batch.retryable({"exit_code": 2, "reason": "bad input: m.onnx: not an ONNX model (protobuf parse error)"})

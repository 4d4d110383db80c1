"""``onnxopt batch``: one command (optimize, quantize, validate, bench) over many models, each in its
own process, resumable, with a summary (``OUTDIR/summary.json`` and ``OUTDIR/summary.html``).

Isolation: every model runs as a fresh ``python -m onnxopt.cli COMMAND ...`` subprocess
(:func:`run_one`) in its own session, writing ``OUTDIR/<name>/<name>.onnx`` (optimize, quantize),
``OUTDIR/<name>/report.json`` and ``OUTDIR/<name>/log.txt`` (its stdout and stderr).  The driver
polls it: past ``timeout`` seconds, or over ``max_rss_mb`` (resident memory of the process and its
children, via psutil), it is stopped (SIGTERM to the CLI, which forwards it to its worker and
removes its staging folder; SIGKILL to the whole process group 3 s later) and marked failed with
the reason.  A crash inside the CLI's own worker (ORT segfault) is its exit 2 with the CLI's one
line; a signal death of the CLI process itself is reported with the signal's name.  The batch
goes on either way.  The subprocess gets SIGKILL when the thread that started it dies
(PR_SET_PDEATHSIG), so ``kill -9`` of the driver leaves no model running.

Local runs use a thread pool of ``workers`` threads, each waiting on one subprocess.  With Ray,
each model is a Ray task running the same :func:`run_one` (``num_cpus=1, max_retries=2``, plus a
custom resource named after a non-CPU ``--ep``); the task returns the result dict and the driver
writes everything.  (The model and report files are written by the task on its node: with a
remote cluster OUTDIR must be a shared folder.)

Resumability: an entry's ``key`` is the sha256 of the input bytes (the ``.onnx`` and its external
data files), of the command and options, and the onnxopt version.  A rerun skips a model whose
previous entry with the same key finished (ok, refused, or failed as it would again: exit 1, 2, 4,
a crash) and whose files are still there; it retries a failure the environment caused (a
``timeout:``/``memory:`` kill, ``interrupted``, a lost Ray task, SIGKILL: ``retryable``).
``retry_failed`` reruns every failure, ``force`` everything.  ``summary.json`` is rewritten
atomically after every model, so a driver killed with ``kill -9`` loses at most the models that
were running.  Ctrl-C / SIGTERM stop the running models, keep the finished results and remove
temporary files.

The summary entries (one per model, in input order): ``name``, ``input``, ``status`` (ok, failed,
refused, skipped: reused from an earlier run, whose status is ``finished_status`` and reason
``finished_reason``), ``reason``, ``retryable``, ``exit_code``, ``seconds``,
``nodes_before``/``nodes_after``, ``size_before``/``size_after`` (bytes), ``validation`` ({status,
max_abs, metric, value}), ``latency_ratio`` ({ep: reference ms / new ms}, above 1 is faster),
``input_sha256``, ``options``, ``onnxopt_version``, ``runs`` (how many times this model actually
ran in this OUTDIR), ``finished_at`` (Unix time), ``output``, ``report``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from onnxopt import __version__, commands, io, parallel, report
from onnxopt.commands import core, spec
from onnxopt.commands.spec import Command, flag
from onnxopt.commands.summary import summary_fields
from onnxopt.errors import BadInputError, Terminated, UsageError

logger = logging.getLogger(__name__)

COMMANDS = commands.BATCHED
#: Commands that write OUTDIR/<name>/<name>.onnx.
WRITERS = ("optimize", "quantize", "convert", "prune", "compress")
#: Statuses a rerun may reuse (a failure too when it is not retryable, :func:`retryable`).
FINISHED = ("ok", "refused")
#: Exit codes of a model that fails the same way every time: usage, bad input (a crash too), internal error.
DETERMINISTIC_EXITS = (1, 2, 4)
#: Signals that end the CLI process itself as a crash would, every time (not SIGKILL: the kernel's OOM killer).
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)
#: Reasons of failures the environment caused (the driver's kills, an interrupt, a lost Ray task).
RETRYABLE_REASONS = ("timeout:", "memory:", "interrupted", "ray task failed")
#: Option keys the driver consumes itself (per-model limits in a manifest); never passed to the CLI.
DRIVER_OPTIONS = ("timeout", "max_rss_mb")
#: Option keys that name files: relative ones in a manifest are taken from the manifest's folder.
PATH_OPTIONS = ("data", "recipe", "load_stats", "against")
POLL_SECONDS = 0.1
TERM_GRACE_SECONDS = 3.0
SUMMARY_JSON = "summary.json"
SUMMARY_HTML = "summary.html"


# ----------------------------------------------------------------------------------------- inputs

def collect(inputs: Sequence[str | os.PathLike], options: Mapping[str, Any] | None = None) -> list[dict]:
    """INPUTS -> jobs ``{"name", "input", "options"}``: model files, folders (their ``*.onnx``,
    sorted) and manifests (``.json``, or ``.yaml``/``.yml`` when PyYAML is installed: a list of
    entries, or ``{"models": [...]}``, each a path or ``{"path": ..., "options": {...}}``).
    ``options`` are the defaults; a manifest entry's options override them.  Names are the file
    stems, made unique with ``-2``, ``-3``...  Raises UsageError for a missing input or bad manifest."""
    base = dict(options or {})
    jobs: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
            if not found:
                logger.warning("%s: no .onnx file in this folder", p)
            jobs += [{"input": str(f), "options": dict(base)} for f in found]
        elif p.suffix.lower() in (".json", ".yaml", ".yml"):
            jobs += [{"input": e["input"], "options": {**base, **e["options"]}} for e in _manifest(p)]
        elif p.exists() or p.suffix.lower() == ".onnx":
            if not p.exists():
                raise UsageError(f"{p}: no such file")
            jobs.append({"input": str(p), "options": dict(base)})
        else:
            raise UsageError(f"{p}: no such file or folder")
    seen: dict[str, int] = {}
    for job in jobs:
        stem = re.sub(r"[^\w.-]", "_", Path(job["input"]).stem) or "model"
        seen[stem] = seen.get(stem, 0) + 1
        job["name"] = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
    return jobs


def _manifest(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"manifest {path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"manifest {path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError(f"manifest {path}: YAML manifests need PyYAML (pip install pyyaml); use .json") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"manifest {path}: not valid YAML ({e})") from None
    if isinstance(doc, dict):
        doc = doc.get("models")
    if not isinstance(doc, list):
        raise UsageError(f"manifest {path}: expected a list of entries (or {{\"models\": [...]}})")
    out = []
    for i, entry in enumerate(doc):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UsageError(f"manifest {path}: entry {i} needs a \"path\"")
        opts = entry.get("options") or {}
        if not isinstance(opts, dict):
            raise UsageError(f"manifest {path}: entry {i}: \"options\" must be a mapping")
        opts = {k.replace("-", "_"): v for k, v in opts.items()}
        for k in PATH_OPTIONS:
            if isinstance(opts.get(k), str) and not os.path.isabs(opts[k]):
                opts[k] = str(path.parent / opts[k])
        out.append({"input": str(path.parent / entry["path"]) if not os.path.isabs(entry["path"]) else entry["path"],
                    "options": opts})
    return out


def input_sha256(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """sha256 over the model file and its external data files (in name order), and their total
    size; (None, None) when the file cannot be read.  A file onnx cannot parse is hashed alone."""
    p = Path(path)
    files = [p]
    try:
        import onnx

        proto = onnx.load(str(p), load_external_data=False)
        locations = set()
        from onnx.external_data_helper import _get_all_tensors

        for t in _get_all_tensors(proto):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in t.external_data if e.key == "location"), None)
                if loc:
                    locations.add(loc)
        files += [p.parent / loc for loc in sorted(locations)]
    except Exception:  # noqa: BLE001 - a corrupt model is still hashed (and fails in its own process)
        pass
    h = hashlib.sha256()
    total = 0
    try:
        for f in files:
            if not f.is_file():
                continue
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                    total += len(chunk)
    except OSError:
        return None, None
    return h.hexdigest(), total


def job_key(command: str, sha: str | None, options: Mapping[str, Any]) -> str:
    text = json.dumps({"command": command, "sha256": sha, "options": options, "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------- one model

def second_model(command: str, job: Mapping[str, Any], model_dir: Path) -> Path | None:
    """The model ``validate``/``bench`` compare with: the ``against`` option, else the result of
    an earlier optimize/quantize batch into this folder (validate: always; bench: when it exists)."""
    against = job["options"].get("against")
    out = model_dir / f"{job['name']}.onnx"
    if command == "validate":
        return Path(against) if against else out
    if command == "bench":
        return Path(against) if against else (out if out.exists() else None)
    return None


def _cli_args(command: str, job: dict, model_dir: Path) -> list[str]:
    """The ``python -m onnxopt.cli`` argument list for one model (its options turned into the
    command's own flags, :func:`onnxopt.commands.spec.to_args`)."""
    name, opts = job["name"], {k: v for k, v in job["options"].items() if k not in DRIVER_OPTIONS}
    out = model_dir / f"{name}.onnx"
    args = [command, job["input"]]
    opts.pop("against", None)
    if command in WRITERS:
        args += ["-o", str(out)]
    second = second_model(command, job, model_dir)
    if second is not None:
        args.append(str(second))
    args += ["--report", str(model_dir / "report.json")]
    return args + spec.to_args(commands.get(command).options, opts)


def _tree_rss(proc) -> tuple[int, set[int]]:
    """Resident bytes of ``proc`` and its descendants, and their pids."""
    import psutil

    total, pids = 0, set[int]()
    try:
        members = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, pids
    for p in members:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
            pids.add(p.pid)
    return total, pids


def _stop(popen: subprocess.Popen) -> None:
    """SIGTERM to the CLI (it forwards it and cleans its staging folder), SIGKILL to the group after
    TERM_GRACE_SECONDS."""
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(TERM_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        popen.wait(5)


def _last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        for prefix in ("onnxopt: error:", "onnxopt: internal error:"):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:300]
    return ""


def _watch(argv: list[str], log_path: Path, timeout: float | None, max_rss_mb: float | None,
           stop: threading.Event | None, t0: float) -> tuple[subprocess.Popen, str | None, set[int]]:
    """Start ``argv`` with its output in ``log_path`` and poll it until it ends, or stop it past
    ``timeout`` / over ``max_rss_mb`` / on ``stop``; returns the process, why it was killed
    (None: it ended by itself) and the pids seen in its tree."""
    import psutil  # the driver's memory watch only

    killed: str | None = None
    pids: set[int] = set()
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=io.die_with_parent if sys.platform == "linux" else None)
        try:
            proc = psutil.Process(popen.pid)
        except psutil.Error:
            proc = None
        try:
            while popen.poll() is None:
                elapsed = time.perf_counter() - t0
                if stop is not None and stop.is_set():
                    killed = "interrupted"
                elif timeout is not None and elapsed > float(timeout):
                    killed = f"timeout: still running after {float(timeout):g} s (killed)"
                elif max_rss_mb is not None and proc is not None:
                    rss, seen = _tree_rss(proc)
                    pids |= seen
                    if rss > float(max_rss_mb) * 1e6:
                        killed = f"memory: resident {rss / 1e6:.0f} MB over --max-rss {float(max_rss_mb):g} MB (killed)"
                if killed:
                    if proc is not None:
                        pids |= _tree_rss(proc)[1]
                    _stop(popen)
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(POLL_SECONDS)
        except BaseException:
            _stop(popen)
            raise
    return popen, killed, pids


def run_one(command: str, job: dict, outdir: str, timeout: float | None = None, max_rss_mb: float | None = None,
            stop: threading.Event | None = None) -> dict:
    """Run one model in a fresh ``python -m onnxopt.cli`` process and return its result dict (never
    raises for the model's own failures).  Used by the local pool and, unchanged, as the Ray task."""
    model_dir = Path(outdir) / job["name"]
    model_dir.mkdir(parents=True, exist_ok=True)
    opts = job["options"]
    timeout = opts.get("timeout", timeout)
    max_rss_mb = opts.get("max_rss_mb", max_rss_mb)
    argv = [sys.executable, "-m", "onnxopt.cli", *_cli_args(command, job, model_dir)]
    log_path = model_dir / "log.txt"
    report_path = model_dir / "report.json"
    with contextlib.suppress(FileNotFoundError):
        report_path.unlink()  # a report left by an earlier run must not be read as this run's
    result: dict[str, Any] = {"name": job["name"], "command_line": shlex.join(argv[1:])}
    t0 = time.perf_counter()
    popen, killed, pids = _watch(argv, log_path, timeout, max_rss_mb, stop, t0)
    code = popen.returncode
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["exit_code"] = code
    if killed:
        io.remove_stale_staging(model_dir, pids | {popen.pid})
        result.update(status="failed", reason=killed)
        return result
    if code is not None and code < 0:
        io.remove_stale_staging(model_dir, pids | {popen.pid})
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        result.update(status="failed", reason=f"the onnxopt process died ({name})")
        return result
    report = None
    if report_path.exists():
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(report_path.read_text())
    result.update(summary_fields(command, report, opts))
    if code == 0:
        result.update(status="ok", reason="")
    elif code == 3:
        result.update(status="refused", reason=_last_error(log_path) or "validation refused")
    else:
        kind = {1: "usage", 2: "bad input", 4: "internal error"}.get(code, f"exit {code}")
        result.update(status="failed", reason=f"{kind}: {_last_error(log_path)}")
    if command in WRITERS and code == 0:
        result["output"] = str(model_dir / f"{job['name']}.onnx")
    if report is not None:
        result["report"] = str(report_path)
    return result


# ------------------------------------------------------------------------------------------ driver

def _load_previous(outdir: Path) -> dict[str, dict]:
    try:
        doc = json.loads((outdir / SUMMARY_JSON).read_text())
        return {e["name"]: e for e in doc.get("models", []) if isinstance(e, dict) and "name" in e}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


#: failures of the machine, not of the model (out of memory, a full disk, an OS error): retried
ENVIRONMENT = re.compile(r"alloc|MemoryError|out of memory|No space|\[Errno", re.IGNORECASE)


def retryable(result: Mapping[str, Any]) -> bool:
    """Whether a failed model's result may change on a rerun with the same key: not when it failed
    deterministically (:data:`DETERMINISTIC_EXITS`, :data:`CRASH_SIGNALS`), yes for the driver's
    kills, interrupts, lost Ray tasks and any other exit."""
    code = result.get("exit_code")
    reason = str(result.get("reason") or "")
    if reason.startswith(RETRYABLE_REASONS) or not isinstance(code, int) or ENVIRONMENT.search(reason):
        return True
    return code not in DETERMINISTIC_EXITS if code >= 0 else -code not in CRASH_SIGNALS


def _reusable(prev: dict | None, key: str, retry_failed: bool = False) -> bool:
    if not prev or prev.get("key") != key or prev.get("finished_status") not in (*FINISHED, "failed"):
        return False
    if prev["finished_status"] == "failed" and (retry_failed or prev.get("retryable", retryable(prev))):
        return False  # (an entry of an older onnxopt has no "retryable": judged from its exit)
    return all(Path(p).exists() for p in (prev.get("output"), prev.get("report")) if p)


def _skip_reason(prev: dict) -> str:
    if prev["finished_status"] != "failed":
        return f"unchanged since an earlier run ({prev['finished_status']})"
    return ("failed before with the same input, options and onnxopt version, and would fail again "
            f"({prev.get('finished_reason', prev.get('reason'))}); --retry-failed reruns it")


def _totals(entries: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    failed_before = sum(e["status"] == "skipped" and e.get("finished_status") == "failed" for e in entries)
    return {"models": len(entries), **counts, **({"failed_before": failed_before} if failed_before else {}),
            "seconds_run": round(sum(e.get("seconds") or 0 for e in entries if e.get("status") != "skipped"), 3)}


@dataclasses.dataclass
class Options:
    inputs: Sequence[str | os.PathLike]
    outdir: str | os.PathLike
    command: str = flag("optimize", "--command", type=click.Choice(list(commands.BATCHED)),
                        help="The command run on every model.")
    workers: int = flag(2, "--workers", type=int, help="Models run at the same time (one process each).")
    timeout: float | None = flag(None, "--timeout", type=float,
                                 help="Seconds per model before it is killed (marked failed).")
    max_rss_mb: float | None = flag(None, "--max-rss", type=float,
                                    help="MB of resident memory per model before it is killed.")
    force: bool = flag(False, "--force", is_flag=True, help="Redo models whose earlier result is still valid.")
    retry_failed: bool = flag(False, "--retry-failed", is_flag=True,
                              help="Rerun models that failed deterministically before (bad input, crash, internal "
                                   "error), which a rerun skips otherwise; timeouts and memory kills are always retried.")
    ray_address: str | None = flag(None, "--ray", is_flag=False, flag_value="local",
                                   help="Run models as Ray tasks: --ray (a local cluster of --workers CPUs) or --ray=ADDRESS.")
    #: the command's options by key (``max_drop`` or its flag's name); the CLI gives exactly X's flags
    options: Mapping[str, Any] | None = None
    #: called with each model's summary entry as it finishes
    on_result: Callable[[dict], None] | None = None


def _plan(jobs: list[dict], command: str, out: Path, force: bool, retry_failed: bool = False) -> tuple[dict[str, dict], list[dict]]:
    """Summary entries of every job (reused ones ``skipped``, the others ``pending``) and the jobs to run."""
    previous = _load_previous(out)
    entries: dict[str, dict] = {}
    todo: list[dict] = []
    for job in jobs:
        sha, size = input_sha256(job["input"])
        second = second_model(command, job, out / job["name"])
        # validate/bench results also depend on the second model's bytes (an optimize rerun changes them)
        key = job_key(command, sha if second is None else f"{sha}+{input_sha256(second)[0]}", job["options"])
        base = {"name": job["name"], "input": job["input"], "command": command, "options": job["options"],
                "input_sha256": sha, "size_before": size, "key": key, "onnxopt_version": __version__}
        prev = previous.get(job["name"])
        if not force and prev is not None and _reusable(prev, key, retry_failed):
            entries[job["name"]] = {**prev, **base, "status": "skipped", "reason": _skip_reason(prev),
                                    "finished_reason": prev.get("finished_reason", prev.get("reason")),
                                    "retryable": False}
        else:
            job["base"] = base
            todo.append(job)
            entries[job["name"]] = {**base, "status": "pending", "reason": "not run yet", "retryable": True,
                                    "runs": (prev or {}).get("runs", 0)}
    return entries, todo


def _jobs(o: Options) -> list[dict]:
    """The jobs of ``o.inputs``, their options checked against the command's own (usage errors first)."""
    if o.command not in COMMANDS:
        raise UsageError(f"batch --command {o.command}: expected one of {', '.join(COMMANDS)}")
    if o.workers < 1:
        raise UsageError("--workers must be at least 1")
    jobs = collect(o.inputs, o.options)
    if not jobs:
        raise UsageError("no models to run")
    if o.ray_address is not None:  # an unreachable cluster: one line now, not Ray's retries for minutes
        parallel.check_ray_address(o.ray_address)
    for job in jobs:
        opts = {k: v for k, v in job["options"].items() if k not in DRIVER_OPTIONS and k != "against"}
        try:
            spec.to_args(commands.get(o.command).options, opts)
        except UsageError as e:
            raise UsageError(f"batch --command {o.command}, {job['name']}: {e}") from None
    return jobs


def run(o: Options, progress: Callable[[int], None] | None = None) -> Result:
    """``onnxopt batch`` (see the module docstring); returns the summary."""
    jobs = _jobs(o)
    command, workers, ray_address = o.command, o.workers, o.ray_address
    timeout, max_rss_mb, on_result = o.timeout, o.max_rss_mb, o.on_result
    out = Path(o.outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    io.remove_stale_staging(out)
    started = time.time()
    entries, todo = _plan(jobs, command, out, o.force, o.retry_failed)
    lock = threading.Lock()

    def save() -> dict:
        models = [entries[j["name"]] for j in jobs]
        summary = core.header("batch", batch_command=command, outdir=str(out), workers=workers,
                             ray=ray_address, started_at=started, models=models, totals=_totals(models))
        report.write(summary, out / SUMMARY_JSON)
        report.write(summary, out / SUMMARY_HTML)
        return summary

    def record(job: dict, result: dict) -> None:
        with lock:
            entry = {**job["base"], **result, "runs": entries[job["name"]].get("runs", 0) + 1,
                     "finished_at": time.time()}
            entry.update(finished_status=entry["status"], finished_reason=entry["reason"],
                         retryable=entry["status"] == "failed" and retryable(entry))
            entries[job["name"]] = entry
            save()
        logger.info("%s: %s%s (%.1f s)", job["name"], entry["status"], f" - {entry['reason']}" if entry["reason"] else "",
                    entry.get("seconds") or 0)
        if on_result is not None:
            on_result(entry)
        if progress is not None:
            progress(1)

    for job in jobs:
        entry = entries[job["name"]]
        if entry["status"] == "skipped":
            logger.info("%s: skipped (%s)", job["name"], entry["reason"])
            if on_result is not None:
                on_result(entry)
            if progress is not None:
                progress(1)
    save()
    try:
        if todo and ray_address is not None:
            _run_ray(todo, command, str(out), workers, timeout, max_rss_mb, ray_address, record)
        elif todo:
            _run_local(todo, command, str(out), workers, timeout, max_rss_mb, record)
    except BaseException:
        with lock:
            for entry in entries.values():
                if entry["status"] == "pending":
                    entry["reason"] = "interrupted before it finished"
            save()
        raise
    return Result.from_report(save())


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (and SIGHUP) raise Terminated in the main thread while the batch runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(f"batch stopped ({signal.Signals(signum).name}); finished results kept", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_local(todo, command, outdir, workers, timeout, max_rss_mb, record) -> None:
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxopt-batch")
    futures = {}
    try:
        with _sigterm_as_interrupt():
            futures = {pool.submit(run_one, command, {k: job[k] for k in ("name", "input", "options")}, outdir,
                                   timeout, max_rss_mb, stop): job for job in todo}
            for fut in concurrent.futures.as_completed(futures):
                record(futures[fut], fut.result())
    except BaseException:
        stop.set()
        for fut in futures:
            fut.cancel()
        pool.shutdown(wait=True)  # run_one stops its process on `stop` and cleans its staging folder
        raise
    pool.shutdown(wait=True)


def ray_resources(options: Mapping[str, Any]) -> dict:
    """The custom Ray resource a model needs: its first non-CPU --ep (e.g. {"openvino": 1})."""
    eps = [e.strip() for e in str(options.get("ep") or "cpu").split(",") if e.strip()]
    gpu_like = [e for e in eps if e != "cpu"]
    return {gpu_like[0]: 1} if gpu_like else {}


def _run_ray(todo, command, outdir, workers, timeout, max_rss_mb, address, record) -> None:
    def done(job: dict, result: dict | None, error: BaseException | None) -> None:
        if error is not None:  # a task lost after its retries: that model failed
            first = str(error).splitlines()[0] if str(error) else ""
            result = {"name": job["name"], "status": "failed", "exit_code": None, "seconds": None,
                      "reason": f"ray task failed: {type(error).__name__}: {first}"}
        record(job, result)

    calls = [(job, (command, {k: job[k] for k in ("name", "input", "options")}, outdir, timeout, max_rss_mb),
              ray_resources(job["options"])) for job in todo]
    with parallel.ray_cluster(address, workers) as ray, _sigterm_as_interrupt():
        parallel.ray_each(ray, run_one, calls, done)


@dataclasses.dataclass
class Result(core.Result):
    command = "batch"

    batch_command: str
    outdir: str
    workers: int
    ray: str | None
    started_at: float
    models: list
    totals: dict


def render(result: core.Result) -> None:
    summary = result.to_dict()
    for e in summary["models"]:
        size = ""
        if e.get("size_before") and e.get("size_after"):
            size = f", {e['size_before'] / 1e6:.2f} MB -> {e['size_after'] / 1e6:.2f} MB"
        nodes = f", {e['nodes_before']} -> {e['nodes_after']} nodes" if e.get("nodes_after") is not None else ""
        secs = f" ({e['seconds']:.1f} s)" if e.get("seconds") is not None else ""
        reason = f": {e['reason']}" if e.get("reason") and e["status"] != "ok" else ""
        click.echo(f"{e['name']}: {e['status']}{reason}{nodes}{size}{secs}")
    t = summary["totals"]
    before = f" ({t['failed_before']} failed before)" if t.get("failed_before") else ""
    click.echo(f"{t['models']} model(s): " + ", ".join(f"{t[k]} {k}" + (before if k == "skipped" else "") for k in
                                                      ("ok", "refused", "failed", "skipped", "pending") if t.get(k))
               + f"; summary in {Path(summary['outdir']) / SUMMARY_HTML}")
    if t.get("failed") or t.get("pending") or t.get("failed_before"):
        raise click.exceptions.Exit(2)


COMMAND = Command(
    name="batch", short_help="Run a command over many models, one process each, resumable.",
    help="Run --command on every model of INPUTS (files, folders of *.onnx, .json/.yaml manifests of {path, options}), "
         "each in its own process; write OUTDIR/<name>/ and OUTDIR/summary.json/.html. A rerun skips models already done "
         "with the same input bytes and options, failures a rerun would repeat too (--retry-failed reruns failures, "
         "--force everything).",
    arguments=(("inputs", {"metavar": "INPUTS...", "nargs": -1, "required": True}),
               ("outdir", {"decls": ("-o", "--outdir"), "type": click.Path(file_okay=False),
                           "help": "Results: OUTDIR/<name>/, summary.json/.html."})),
    options=Options, run=run, render=render, result=Result, output=None, isolated=False, passthrough=True,
    progress="batch")

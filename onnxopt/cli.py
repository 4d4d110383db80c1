"""The ``onnxopt`` command: parse, call onnxopt.api, print.  Exit codes: 0 ok, 1 usage, 2 bad input,
3 validation refused, 4 internal error.  Expected errors print one line, never a traceback.

Crash isolation: a command that reads a model (optimize, quantize, validate, bench, inspect) runs
in a forked child process (:func:`run_isolated`; fork is copy-on-write, a few ms).  The child
inherits stdin/stdout/stderr, so output and progress bars are unchanged, and its exit code is the
command's; it is killed when the parent dies (``kill -9`` of onnxopt stops the work).  If native
code (ONNX Runtime, onnx) kills the child with a signal, the parent prints one line
(``onnxopt: error: ONNX Runtime (or another native library) crashed (SIGSEGV) on model.onnx;
nothing written``), removes the child's staging folder beside the output, and exits 2:
a model that crashes the runtime is bad input (a kill from outside, e.g. SIGTERM or the OOM
killer's SIGKILL, is one line too, exit 128 + signal).  SIGTERM/SIGHUP/SIGINT sent to onnxopt are
forwarded to the child (a terminal's Ctrl-C reaches both itself: exit 130).  ``sys.exit`` inside
the command (a --metric module may call it) keeps its exit code.  Isolation is skipped where
it cannot work or is not wanted: no ``os.fork``, more than one thread, or stdout/stderr without a
file descriptor (in-process callers such as click's CliRunner); the command then runs in the
calling process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import typing
from collections.abc import Callable
from pathlib import Path

import click

from onnxopt import __version__, api, io, pipeline, registry, report, runtime
from onnxopt.commands import batch as batch_mod
from onnxopt.errors import BadInputError, OnnxoptError, Terminated, UsageError, ValidationRefused
from onnxopt.precision.fp16 import DEFAULT_OP_BLOCK_LIST
from onnxopt.quantization import static as quantize_mod

logger = logging.getLogger("onnxopt.cli")

#: Signals that mean native code crashed (as opposed to a kill from outside).
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})


def _exit_code_of(fn: Callable[[], object]) -> int:
    """Run ``fn`` (a parsed command, or click's whole main) and map what it raises to an exit code,
    printing one line: click's usage errors 1, OnnxoptError its code, anything else 4 (a bug; the
    traceback is logged at -vv).  An int returned is the exit code (click's main returns the code
    of ``Exit`` in non-standalone mode)."""
    try:
        rv = fn()
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        e.show()
        return 1
    except click.Abort as e:
        click.echo("onnxopt: aborted", err=True)
        return 130 if isinstance(e.__cause__, KeyboardInterrupt) else 1  # Ctrl-C: the shell's convention
    except OnnxoptError as e:
        click.echo(f"onnxopt: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # e.g. a --metric module calling sys.exit(): keep its code, as Python would
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        click.echo(f"onnxopt: error: {e.code}", err=True)
        return 1
    except Exception as e:  # a bug: one line for the user, the traceback at -vv
        logger.debug("internal error", exc_info=True)
        text = (str(e).strip().splitlines() or [""])[0]
        click.echo(f"onnxopt: internal error: {type(e).__name__}: {text}; nothing was written; "
                   f"please report it (-vv shows the traceback)", err=True)
        return 4
    return rv if isinstance(rv, int) else 0


class _Group(click.Group):
    """Maps errors to our exit codes (click's own usage exit code is 2; ours is 1)."""

    def main(self, args=None, prog_name=None, **extra):  # noqa: D401
        extra.pop("standalone_mode", None)
        run = functools.partial(super().main, args=args, prog_name=prog_name or "onnxopt",
                                standalone_mode=False, **extra)
        sys.exit(_exit_code_of(run))


def _can_isolate() -> bool:
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return False
    try:
        sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def _file_state(path: Path | None):
    """Identity of ``path`` and of its external-data file ``path.data`` (commit renames that first)."""
    if path is None:
        return None
    state = []
    for p in (path, path.with_name(path.name + ".data")):
        try:
            st = p.stat()
            state.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            state.append(None)
    return tuple(state)


def _from_terminal() -> bool:
    """Whether a SIGINT came from our terminal's Ctrl-C (which the child gets too): our process
    group is the terminal's foreground group."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, AttributeError, ValueError):
        return False


def run_isolated(fn: Callable[[], object], label: str, output: str | os.PathLike | None = None) -> int:
    """Run ``fn`` in a forked child and return its exit code (errors inside are mapped and printed
    by the child as in the CLI: one line, see :func:`_exit_code_of`).

    If the child dies by a signal, its staging entries beside ``output`` are removed and an error
    is raised naming ``label`` and the signal, saying whether ``output`` was replaced before: a
    crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) is BadInputError (exit 2), a kill from
    outside (SIGTERM, SIGKILL, ...) is Terminated (exit 128 + signal).  SIGTERM/SIGHUP received
    while waiting are forwarded to the child; so is SIGINT, unless it is a terminal's Ctrl-C (the
    child got that one itself).  The child's staging entries in the system temp folder (a
    verify-each copy) are removed too.
    Also the hook tests use: ``run_isolated(lambda: os.kill(os.getpid(), signal.SIGSEGV), "m")``."""
    out = Path(output) if output is not None else None
    before = _file_state(out)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's frames
        code = 4
        try:
            _die_with_parent(parent)
            for signum in (signal.SIGTERM, signal.SIGHUP):  # whatever the caller installed (Ray does):
                signal.signal(signum, signal.SIG_DFL)       # a kill from outside ends the work
            code = _exit_code_of(fn)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def interrupt(signum, frame):
        if not _from_terminal():
            forward(signum, frame)

    previous: dict[signal.Signals, typing.Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ((signal.SIGINT, interrupt), (signal.SIGTERM, forward), (signal.SIGHUP, forward)):
            previous[signum] = signal.signal(signum, handler)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not os.WIFSIGNALED(status):
        return os.waitstatus_to_exitcode(status)
    sig = os.WTERMSIG(status)
    name = signal.Signals(sig).name
    if out is not None:
        io.remove_stale_staging(out.parent if str(out.parent) else Path("."), {pid})
    io.remove_stale_staging(tempfile.gettempdir(), {pid})
    written = "nothing written" if _file_state(out) == before else f"{out} had been written before"
    if sig in CRASH_SIGNALS:
        raise BadInputError(f"ONNX Runtime (or another native library) crashed ({name}) on {label}; {written}")
    raise Terminated(f"the process working on {label} was killed ({name}"
                     f"{'; out of memory?' if sig == signal.SIGKILL else ''}); {written}", sig)


def _die_with_parent(parent: int) -> None:
    """The forked child dies with the parent (see io.die_with_parent), also when the parent died
    before that took effect."""
    if io.die_with_parent() and os.getppid() != parent:
        os._exit(137)


def _isolated(label: Callable[[dict], str], output: str | None = None):
    """Run the decorated command through :func:`run_isolated` when the process allows it."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(**kwargs):
            if not _can_isolate():
                return f(**kwargs)
            code = run_isolated(functools.partial(f, **kwargs), label(kwargs),
                                kwargs.get(output) if output else None)
            if code:
                raise click.exceptions.Exit(code)  # the child has printed its error line
            return None

        return wrapper

    return decorate


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"onnxopt: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.levelno <= logging.DEBUG:  # -vv: the traceback a debug record carries
            line += "\n" + self.formatException(record.exc_info)
        return line


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    # onnx-ir's warnings (about malformed models) get our prefix instead of Python's bare last resort.
    for name in ("onnxopt", "onnx_ir"):
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxopt")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """Post-export optimizer for ONNX models, validated on ONNX Runtime."""
    _setup_logging(verbose, quiet)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@contextlib.contextmanager
def _progress(total: int | None, desc: str):
    """A progress bar on stderr that appears only after 2 s, only on a TTY and not with -q;
    yields the ``update(n)`` callable the library functions accept."""
    from tqdm import tqdm

    quiet = logging.getLogger("onnxopt").getEffectiveLevel() >= logging.ERROR
    bar = tqdm(total=total, desc=desc, delay=2, leave=False, file=sys.stderr,
               disable=quiet or not sys.stderr.isatty())
    try:
        yield bar.update
    finally:
        bar.close()


def _common(f):
    """The options every model-running command shares."""
    f = click.option("--preprocess", default=None,
                     help='For image-folder --data: "resize=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw".')(f)
    f = click.option("--data", type=click.Path(), default=None,
                     help=".npz (arrays by input name), a folder of .npy/.npz batches, or an image folder. Without it, "
                          "inputs are synthesized (at most 1 GiB; larger declared inputs need --data).")(f)
    f = click.option("--shape", "shapes", multiple=True, help="Input shape NAME:1x3x224x224 for symbolic dims (repeatable).")(f)
    f = click.option("--ep", "ep_text", default="cpu", show_default=True,
                     help="Execution providers, comma separated: cpu, openvino, cuda, tensorrt, dml, coreml.")(f)
    f = click.option("--report", "report_path", type=click.Path(), default=None, help="Write a report: .json, .md or .html.")(f)
    return f


def _tolerances(metric: str, tols: tuple[str, ...], rtol: float | None):
    """--tol VALUE (all outputs) and --tol NAME=VALUE (one output) -> Tolerance or {name: Tolerance}."""
    from onnxopt.validation import LOSSLESS, Tolerance

    def make(value: float | None) -> Tolerance:
        if metric == "allclose":
            return Tolerance(rtol if rtol is not None else LOSSLESS.rtol, value if value is not None else LOSSLESS.atol)
        return Tolerance(LOSSLESS.rtol, LOSSLESS.atol, metric, value)

    default, per_output = None, {}
    for item in tols:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--tol '{item}': expected a number or NAME=number") from None
        if sep:
            per_output[name] = make(number)
        else:
            default = number
    base = make(default)
    return ({"*": base, **per_output} if per_output else base), base


@main.command(short_help="Optimize a model (validated against the original).")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the optimized model.")
@click.option("-p", "--pipeline", "pipeline_text", default=None,
              help='Passes, e.g. "cleanup,fold-constants{size-limit=4096},dedup" '
                   f'(default: {pipeline.DEFAULT_PIPELINE}).')
@_common
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare against the original on ORT.")
@click.option("--force", is_flag=True, help="Write the result even when validation finds diverging outputs.")
@click.option("--verify-each", is_flag=True, help="Validate after every pass and name the pass that broke outputs.")
@click.option("--in-place", is_flag=True, help="Allow -o to be the input file.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUT.data (default: only when over ~1.8 GB).")
@click.option("--model-type", default=None,
              help="fuse-transformer's model type: bert, gpt2, vit, ... (default: detected from the inputs).")
@_isolated(lambda kw: str(kw["model"]), output="output")
def optimize(model, output, pipeline_text, report_path, ep_text, shapes, data, preprocess, validate, force,
             verify_each, in_place, external_data, model_type):
    """Optimize MODEL into OUTPUT (validated against MODEL by default, on the --ep given)."""
    if report_path:
        report.check_path(report_path)
    eps = runtime.parse_eps(ep_text)
    if len(eps) != 1:
        raise UsageError("optimize validates on one --ep; compare on several with 'onnxopt validate'")
    try:
        result = api.optimize(model, output, pipeline_text=pipeline_text, data=data, preprocess=preprocess,
                              ep=eps[0], shapes=runtime.parse_shapes(shapes), validate_result=validate, force=force,
                              verify_each=verify_each, in_place=in_place, external_data=external_data,
                              with_cost=bool(report_path), model_type=model_type)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        for line in ((e.result or {}).get("validation") or {}).get("outputs", []):
            if not line["ok"]:
                click.echo(f"  {line['name']}: max abs {line['max_abs'] or 0:.3g}, max rel {line['max_rel'] or 0:.3g}: "
                           f"{line['reason']}", err=True)
        lw = (e.result or {}).get("layerwise")
        if lw and lw.get("first_divergence"):
            click.echo(f"  {_divergence(lw['first_divergence'])}", err=True)
        raise
    if report_path:
        report.write(result, report_path)
    inp, out = result["input"], result["output"]
    click.echo(f"{model}: {inp['nodes']} -> {out['nodes']} nodes, {_mb(inp['file_bytes'])} -> {_mb(out['file_bytes'])}"
               f" ({result['iterations']} iteration(s), {result['seconds']:.2f} s)")
    for name, entry in result["passes"].items():
        if entry["changed"]:
            click.echo(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in entry["changed"].items()))
    v = result["validation"]
    if v is None:
        click.echo("validation: skipped (--no-validate)")
    else:
        status = "ok" if v["ok"] else "DIVERGED (written because of --force)"
        latency = ""
        if v.get("latency_ref_ms"):
            latency = f", latency {v['latency_ref_ms']:.3f} -> {v['latency_new_ms']:.3f} ms"
        points = sum(1 for p in v.get("points", []) if p["status"] == "compared")
        click.echo(f"validation: {status}, {len(v['outputs'])} output(s) at {points} input point(s), "
                   f"max abs diff {v['max_abs']:.3g}{latency}")
    click.echo(f"wrote {output}")


@main.command(short_help="Static int8 QDQ quantization from calibration data.")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the quantized model.")
@click.option("--data", type=click.Path(), default=None,
              help="Calibration data: .npz, a folder of .npy/.npz batches, or an image folder (with --preprocess). Needed by "
                   "--mode static; optional for --mode dynamic and --weights int4 (then scoring inputs are synthesized).")
@click.option("--mode", type=click.Choice(quantize_mod.MODES), default=None,
              help="static: int8 QDQ, calibrated (default); dynamic: int8 weights per channel, activations quantized at run "
                   "time (MatMulInteger, DynamicQuantizeMatMul on the CPU EP); weight-only: int4 weights (--weights int4).")
@click.option("--weights", "weights", type=click.Choice(("int8", "int4")), default="int8", show_default=True,
              help="int4: block-wise 4-bit weight-only MatMuls (MatMulNBits on the CPU EP, int4 DequantizeLinear at opset 21 "
                   "elsewhere), activations float.")
@click.option("--block-size", type=int, default=32, show_default=True, help="With --weights int4: 32, 64 or 128 weights per block.")
@click.option("--head-bits", type=click.Choice(("4", "8")), default="8", show_default=True,
              help="With --weights int4: bits of the output head (the weight matmul feeding a graph output: LM head, classifier).")
@click.option("--rounding", type=click.Choice(("rtn", "gptq")), default=None,
              help="int4 rounding: gptq (error feedback with the input Hessian from --data; the default with --data) or rtn "
                   "(round to nearest; the default without --data).")
@click.option("--embeddings", type=click.Choice(("int8", "int4", "none")), default="int8", show_default=True,
              help="Gather tables (embeddings), weight-only: int8 + DequantizeLinear after the Gather, int4 (with --weights int4 "
                   "on cpu: GatherBlockQuantized) or none (float).")
@click.option("--preprocess", default=None, help="For image-folder --data (see 'optimize --help').")
@click.option("--method", default="percentile", show_default=True,
              help="Range method: minmax, percentile (percentile{p=99.9} to set p), entropy, mse.")
@click.option("--ep", "ep_text", default="cpu", show_default=True, help="Target EP: cpu, openvino, cuda, tensorrt.")
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="Accuracy budget: largest allowed drop of the metric (default: per output, top-1 agreement at every "
                   "position for class scores, cosine otherwise; see README).")
@click.option("--metric", default=None,
              help="Task metric module:function or path/to/file.py:function, called with an ORT session, higher is "
                   "better. A module name is imported with the current directory first on sys.path (as python -m does).")
@click.option("--recover", "recover_text", default=",".join(quantize_mod.DEFAULT_RECOVERY), show_default=True,
              help="Recovery passes, comma separated: bias-correction, cle, adaround (or 'none').")
@click.option("--save-stats", type=click.Path(), default=None, help="Save calibration statistics (.npz) for reuse.")
@click.option("--load-stats", type=click.Path(), default=None, help="Use saved statistics instead of calibrating.")
@click.option("--calib-batches", type=click.IntRange(min=1), default=None, help="Read at most this many --data batches.")
@click.option("--exclude", multiple=True, help="Keep this node in float (repeatable).")
@click.option("--latency-guard/--no-latency-guard", default=True, show_default=True,
              help="Keep in float the layers that run slower quantized on --ep, and write the float model if the "
                   "result is slower than fp32 (--no-latency-guard: quantize regardless, e.g. for size).")
@click.option("--cost-model/--no-cost-model", default=True, show_default=True,
              help="Let the latency guard decide clear cases from each layer timed alone, cached per machine "
                   "(ONNXOPT_CACHE_DIR); --no-cost-model measures every decision in the whole model.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--recipe", "recipe_path", type=click.Path(), default=None,
              help="Replay a recipe (from --save-recipe or a JSON report): its placement, method, weights and recovery, "
                   "without the latency guard or budget search (calibration still runs on --data or --load-stats).")
@click.option("--save-recipe", type=click.Path(), default=None, help="Write the recipe (JSON) for --recipe.")
@click.option("--search", "search", is_flag=True,
              help="Evaluate candidate recipes (method x per-channel/per-tensor x recovery x layers kept float) and write "
                   "the fastest on the accuracy/latency/size Pareto front within --max-drop; the recipe is saved "
                   "(--save-recipe, else OUTPUT.recipe.json).")
@click.option("--budget", "search_budget", type=click.IntRange(min=1), default=None,
              help=f"With --search: build at most this many candidates (default {quantize_mod.DEFAULT_SEARCH_BUDGET}).")
@click.option("--workers", "search_workers", type=click.IntRange(min=1), default=None,
              help="With --search: build and score candidates on this many local processes "
                   "(default: the CPU count, at most 4); 1 builds them in this process.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="With --search: build and score candidates as Ray tasks: --ray (a local cluster of --workers CPUs) "
                   "or --ray=ADDRESS.")
@click.option("--force", is_flag=True, help="Write the result even when the accuracy budget is missed.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write a report: .json, .md or .html.")
@_isolated(lambda kw: str(kw["model"]), output="output")
def quantize(model, output, data, mode, weights, block_size, head_bits, rounding, embeddings, preprocess, method,
             ep_text, max_drop, metric, recover_text, save_stats, load_stats,
             calib_batches, exclude, latency_guard, cost_model, per_channel, recipe_path, save_recipe, search,
             search_budget, search_workers, ray_address, force, report_path):
    """Quantize MODEL into OUTPUT, guarded for latency and accuracy: static int8 QDQ calibrated on --data (default),
    --mode dynamic (int8 weights, activations at run time) or --weights int4 (block-wise weight-only)."""
    if report_path:
        report.check_path(report_path)
    m = re.fullmatch(r"\s*(\w+)\s*(?:\{\s*p\s*=\s*([0-9.]+)\s*\})?\s*", method)
    if m is None or (m.group(2) and m.group(1) != "percentile"):
        raise UsageError(f"--method '{method}': expected minmax, percentile, percentile{{p=99.9}}, entropy or mse")
    settings = {"method": m.group(1), "percentile": float(m.group(2) or 99.99), "ep": ep_text,
                "per_channel": per_channel, "recovery": tuple(r for r in recover_text.split(",") if r and r != "none"),
                "exclude": tuple(exclude), "latency_guard": latency_guard, "embeddings": embeddings,
                "mode": mode or ("weight-only" if weights == "int4" else "static"), "weights": weights,
                "block_size": block_size, "rounding": rounding, "head_bits": int(head_bits)}
    if recipe_path is not None:
        ctx = click.get_current_context()
        given = [f"--{p.replace('_text', '').replace('_', '-')}" for p in
                 ("method", "ep_text", "per_channel", "recover_text", "exclude", "latency_guard", "mode", "weights",
                  "block_size", "head_bits", "rounding", "embeddings")
                 if ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise UsageError(f"--recipe fixes the placement and settings; drop {', '.join(given)}")
        settings = {}
    if search_budget is not None and not search:
        raise UsageError("--budget counts --search candidates; give --search with it")
    if (search_workers is not None or ray_address is not None) and not search:
        raise UsageError("--workers and --ray spread --search candidates; give --search with them")
    if search_workers is None:
        search_workers = max(1, min(4, os.cpu_count() or 1)) if search else 1
    if search:
        if recipe_path is not None:
            raise UsageError("--search and --recipe: a replayed recipe is not searched")
        ctx = click.get_current_context()
        given = [f"--{p.replace('_text', '').replace('_', '-')}" for p in ("method", "per_channel", "recover_text")
                 if ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise UsageError(f"--search tries the methods, weight scales and recovery itself; drop {', '.join(given)}")
    try:
        with _progress(None, "calibrating") as update:
            result = api.quantize(model, output, data=data, recipe=recipe_path, preprocess=preprocess, max_drop=max_drop,
                                  metric=metric, stats_in=load_stats, stats_out=save_stats, recipe_out=save_recipe,
                                  calib_limit=calib_batches, force=force, progress=update, search=search,
                                  budget=search_budget, workers=search_workers, ray_address=ray_address,
                                  cost_model=cost_model, **settings)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        raise
    if report_path:
        report.write(result, report_path)
    _print_quantize(model, output, result)


def _print_quantize(model, output, result: dict) -> None:
    r, acc, lat = result["recipe"], result["accuracy"], result["latency"]
    click.echo(f"{model}: {r['quantized_layers']} of {r['quantized_layers'] + len(r['float_layers'])} layers "
               f"{'int4' if r.get('weights') == 'int4' else 'int8'} ({r.get('mode', 'static')}) "
               f"({', '.join(f'{k} {v}' for k, v in sorted(r['kinds'].items())) or 'none'}), {len(r['float_layers'])} kept float"
               + (f" (recipe {r['replayed_from']})" if r.get("replayed_from") else ""))
    click.echo(f"accuracy ({acc['metric']}): {acc['float']:.4f} -> {acc['quantized']:.4f} "
               f"(drop {acc['drop']:.4f}, budget {acc['max_drop']:g})")
    click.echo(f"latency on {result['ep']} ({lat['threads']} thread): {lat['float_ms']:.3f} -> {lat['quantized_ms']:.3f} ms "
               f"({lat['speedup']:.2f}x)")
    if result["wrote_float_model"]:
        reasons = list(r.get("float_reasons", {}).values())
        if reasons and not any(x.startswith("final check") for x in reasons):
            click.echo("every layer was kept in float (accuracy budget / exclusions): wrote the optimized float model")
        else:
            click.echo("quantizing did not make it faster on this EP: wrote the optimized float model")
    found = result.get("search")
    if found:
        chosen = found["candidates"][found["chosen"]]
        front = [found["candidates"][i]["label"] for i in found["front"]]
        click.echo(f"search: {found['evaluated'] - 1} candidates + the float model, Pareto front {len(front)}; chosen "
                   f"#{chosen['id']} {chosen['label']} ({chosen['latency_ms']:.3f} ms, {chosen['bytes']} bytes, "
                   f"score {chosen['accuracy']:.4f})")
        click.echo(f"wrote recipe {result['recipe_file']}")
    click.echo(f"wrote {output}")


@main.command(short_help="Mixed-precision fp16 for GPU EPs (validated on the CPU EP).")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the converted model.")
@click.option("--fp16", is_flag=True, help="Convert to mixed-precision float16 (the only target so far).")
@click.option("--keep-io-types/--no-keep-io-types", default=True, show_default=True,
              help="Keep float32 graph inputs/outputs (Casts at the edges); --no-keep-io-types makes them float16.")
@click.option("--op-block-list", default=None,
              help="Op types kept float32, comma separated; 'default' stands for the defaults "
                   f"(e.g. 'default,Softmax'; defaults: {', '.join(DEFAULT_OP_BLOCK_LIST)}).")
@click.option("--node-block-list", default=None, help="Node names kept float32, comma separated.")
@click.option("--limit", type=float, default=None,
              help="Largest observed |x| a tensor may reach and stay fp16 (default 65504/4: a margin of 4).")
@click.option("--calib-batches", type=click.IntRange(min=1), default=None,
              help="Read at most this many --data batches for the ranges.")
@_common
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare against the original on the CPU EP (rtol 1e-2, atol 1e-3 per output).")
@click.option("--force", is_flag=True, help="Write the result even when validation finds diverging outputs.")
@_isolated(lambda kw: str(kw["model"]), output="output")
def convert(model, output, fp16, keep_io_types, op_block_list, node_block_list, limit, calib_batches, report_path,
            ep_text, shapes, data, preprocess, validate, force):
    """Convert MODEL to mixed-precision fp16 into OUTPUT: tensors whose --data ranges would overflow fp16 stay float32."""
    if report_path:
        report.check_path(report_path)
    try:
        with _progress(None, "ranges") as update:
            result = api.convert(model, output, fp16=fp16, ep=ep_text, keep_io_types=keep_io_types,
                                 op_block_list=op_block_list, node_block_list=node_block_list, data=data, preprocess=preprocess,
                                 shapes=runtime.parse_shapes(shapes), calib_limit=calib_batches, limit=limit,
                                 validate_result=validate, force=force, progress=update)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        for line in ((e.result or {}).get("validation") or {}).get("outputs", []):
            if not line["ok"]:
                click.echo(f"  {line['name']}: {line['reason']}", err=True)
        raise
    if report_path:
        report.write(result, report_path)
    _print_convert(model, output, result)


def _print_convert(model, output, result: dict) -> None:
    c, inp, out, r = result["conversion"], result["input"], result["output"], result["ranges"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["kept_fp32_by_kind"].items()))
    click.echo(f"{model}: {c['fp16_nodes']} nodes fp16, {c['fp32_nodes']} kept fp32" + (f" ({kinds})" if kinds else "")
               + f"; Casts {inp['casts']} -> {out['casts']}; {_mb(inp['file_bytes'])} -> {_mb(out['file_bytes'])} "
               f"({result['size_ratio']:.2f}x)")
    source = "--data" if r["source"] == "data" else "synthesized inputs (give --data for real ranges)"
    click.echo(f"ranges: {r['tensors']} tensors from {source}, {r['batches']} batch(es); {r['over_limit']} over "
               f"{r['limit']:g}, {r['over_fp16_max']} over 65504")
    v = result["validation"]
    if v is None:
        click.echo("validation: skipped (--no-validate)")
    else:
        status = "ok" if v["ok"] else "DIVERGED (written because of --force)"
        points = sum(1 for p in v.get("points", []) if p["status"] == "compared")
        click.echo(f"validation (CPU EP, every fp16 tensor rounded as fp16 kernels do, rtol 1e-2 atol 1e-3): {status}, "
                   f"{len(v['outputs'])} output(s) at {points} input point(s), max abs diff {v['max_abs']:.3g}")
def _lossy(f):
    """Options prune and compress share with quantize (data, budget, metric, EP, report)."""
    f = click.option("--report", "report_path", type=click.Path(), default=None, help="Write a report: .json, .md or .html.")(f)
    f = click.option("--force", is_flag=True, help="Write the result even when the accuracy budget is missed.")(f)
    f = click.option("--refit/--no-refit", default=True, show_default=True,
                     help="Least-squares refit of the pruned / consuming layers on --data against the original.")(f)
    f = click.option("--exclude", multiple=True, help="Leave this node alone (with --channels: every group it is part of); repeatable.")(f)
    f = click.option("--calib-batches", type=int, default=None, help="Read at most this many --data batches.")(f)
    f = click.option("--ep", "ep_text", default="cpu", show_default=True, help="Target EP for scoring and latency.")(f)
    f = click.option("--metric", default=None, help="Task metric module:function (see 'quantize --help').")(f)
    f = click.option("--max-drop", type=float, default=0.01, show_default=True,
                     help="Accuracy budget: largest allowed drop of the metric (default metric: see 'quantize --help').")(f)
    f = click.option("--preprocess", default=None, help="For image-folder --data (see 'optimize --help').")(f)
    f = click.option("--data", type=click.Path(), default=None,
                     help="Calibration data (.npz, folder of .npy/.npz batches, image folder): held-out batches score "
                          "the result, the others feed the refit.")(f)
    return f


def _run_lossy(call, report_path):
    if report_path:
        report.check_path(report_path)
    try:
        with _progress(None, "reading data") as update:
            result = call(update)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        raise
    if report_path:
        report.write(result, report_path)
    return result


@main.command(short_help="Magnitude or structured (channel) pruning, validated against the original.")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the pruned model.")
@click.option("--sparsity", type=float, default=None, help="Magnitude pruning: fraction of weights zeroed, in [0, 1).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="--sparsity over all pruned layers together or in each layer.")
@click.option("--threshold", type=float, default=None, help="Magnitude pruning: zero every weight with |w| < T.")
@click.option("--channels", type=float, default=None,
              help="Structured pruning: fraction of the channels of each group to remove physically (needs --data).")
@click.option("--criterion", type=click.Choice(["activation", "l1", "l2"]), default="l1", show_default=True,
              help="--channels importance: mean |activation| x outgoing weight norm, or the filters' L1/L2 norm.")
@click.option("--latency-guard/--no-latency-guard", default=True, show_default=True,
              help="--channels: keep a group's removal only when it makes the model faster on --ep.")
@_lossy
@_isolated(lambda kw: str(kw["model"]), output="output")
def prune(model, output, sparsity, scope, threshold, channels, criterion, latency_guard, data, preprocess, max_drop,
          metric, ep_text, calib_batches, exclude, refit, force, report_path):
    """Prune MODEL into OUTPUT: --sparsity/--threshold zero small weights, --channels removes channels."""
    if sparsity is None and threshold is None and channels is None:
        raise UsageError("give --sparsity, --threshold or --channels")
    result = _run_lossy(lambda update: api.prune(
        model, output, sparsity=sparsity, threshold=threshold, scope=scope, channels=channels, criterion=criterion,
        exclude=exclude, latency_guard=latency_guard, data=data, preprocess=preprocess, max_drop=max_drop, metric=metric,
        ep=ep_text, refit=refit, force=force, calib_limit=calib_batches, progress=update), report_path)
    acc = result["accuracy"]
    if result["mode"] == "magnitude":
        s = result["sizes"]
        click.echo(f"{model}: sparsity {result['total_sparsity']:.1%} over {sum(r['pruned'] for r in result['layers'])} "
                   f"layers; gzip {_mb(s['original']['gzip'])} -> {_mb(s['pruned']['gzip'])}, CSR weights "
                   f"{_mb(s['pruned']['weights_csr_npz'])}")
    else:
        kept = [g for g in result["groups"] if g.get("accepted")]
        click.echo(f"{model}: {result['removed_channels']} channels removed in {len(kept)} of {len(result['groups'])} "
                   f"groups ({len(result['unresolved'])} unresolved)")
        lat = result.get("latency")
        if lat:
            click.echo(f"latency on {result['ep']} ({lat['threads']} thread): {lat['float_ms']:.3f} -> "
                       f"{lat['pruned_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    click.echo(f"accuracy ({acc['metric']}): {acc['float']:.4f} -> {acc['pruned']:.4f} "
               f"(drop {acc['drop']:.4f}, budget {acc['max_drop']:g})")
    click.echo(f"wrote {output}")


@main.command(short_help="Weight sharing (k-means) after optional pruning, with a Deep Compression report.")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the compressed model.")
@click.option("--cluster", "clusters", type=int, required=True, help="Shared values per layer: a power of 2 up to 256.")
@click.option("--sparsity", type=float, default=None, help="Magnitude-prune this fraction first, in [0, 1).")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True)
@_lossy
@_isolated(lambda kw: str(kw["model"]), output="output")
def compress(model, output, clusters, sparsity, scope, data, preprocess, max_drop, metric, ep_text, calib_batches,
             exclude, refit, force, report_path):
    """Compress MODEL into OUTPUT: prune (optional), cluster each layer's weights, report Deep Compression sizes."""
    result = _run_lossy(lambda update: api.compress(
        model, output, clusters=clusters, sparsity=sparsity, scope=scope, exclude=exclude, data=data,
        preprocess=preprocess, max_drop=max_drop, metric=metric, ep=ep_text, refit=refit, force=force,
        calib_limit=calib_batches, progress=update), report_path)
    for s in result["deep_compression"]:
        click.echo(f"{s['stage']:<28} {s['bytes']:>10} bytes  {s['compression_ratio']:6.2f}x")
    acc = result["accuracy"]
    click.echo(f"accuracy ({acc['metric']}): {acc['float']:.4f} -> {acc['pruned']:.4f} "
               f"(drop {acc['drop']:.4f}, budget {acc['max_drop']:g})")
    click.echo(f"wrote {output}")


@main.command(short_help="Show a model's structure (and cost with --cost).")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--cost", "with_cost", is_flag=True, help="Count MACs/FLOPs per op type and peak activation memory.")
@click.option("--shape", "shapes", multiple=True, help="Input shape NAME:1x3x224x224 for --cost (symbolic dims else 1).")
@_isolated(lambda kw: str(kw["model"]))
def inspect(model, as_json, with_cost, shapes):
    """Show a model's structure: opsets, inputs/outputs, ops, parameters, subgraphs, external data."""
    info = api.inspect(model, cost_shapes=runtime.parse_shapes(shapes) if with_cost else None)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: IR {info['ir_version']}, producer {info['producer'] or '-'}")
    click.echo("opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for v in info[kind]:
            shape = "?" if v["shape"] is None else "x".join(str(d) for d in v["shape"]) or "scalar"
            click.echo(f"  {v['name']}: {v['dtype']} [{shape}]")
    click.echo(f"nodes: {info['nodes']}")
    for op, n in info["ops"].items():
        click.echo(f"  {op}: {n}")
    click.echo(f"parameters: {info['parameters']:,} ({_mb(info['parameter_bytes'])})")
    for dtype, e in info["parameters_by_dtype"].items():
        click.echo(f"  {dtype}: {e['params']:,} ({_mb(e['bytes'])})")
    if info["subgraphs"]:
        click.echo("subgraphs:")
        for s in info["subgraphs"]:
            click.echo(f"  {s['op']} '{s['node']}'.{s['attribute']}: {s['nodes']} nodes")
    if info["custom_domains"]:
        click.echo("custom domains: " + ", ".join(info["custom_domains"]))
    if info["external_data"]:
        click.echo("external data:")
        for f, n in info["external_data"].items():
            click.echo(f"  {f}: {_mb(n)}")
    cost = info.get("cost")
    if cost:
        click.echo(f"cost: {cost['macs']:,} MACs, {cost['flops']:,} FLOPs, peak activations "
                   f"{_mb(cost['peak_activation_bytes'])}" + (f", {len(cost['unknown_nodes'])} nodes with unknown shapes"
                                                               if cost["unknown_nodes"] else ""))
        for op, e in cost["by_op"].items():
            if e["flops"]:
                click.echo(f"  {op}: {e['count']} nodes, {e['macs']:,} MACs, {e['flops']:,} FLOPs")


@main.command(short_help="Compare two models' outputs on each EP.")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@_common
@click.option("--metric", type=click.Choice(["allclose", "max-abs", "rel", "cosine", "snr", "topk"]),
              default="allclose", show_default=True, help="How outputs are judged.")
@click.option("--tol", "tols", multiple=True,
              help="Threshold for --metric (allclose: atol), or NAME=VALUE for one output (repeatable).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance of allclose (default 1e-4).")
@click.option("--batches", type=int, default=16, show_default=True, help="At most this many --data batches.")
@click.option("--layerwise", is_flag=True, help="Compare intermediate tensors and name the first diverging node.")
@_isolated(lambda kw: f"{kw['a']} or {kw['b']}")
def validate(a, b, report_path, ep_text, shapes, data, preprocess, metric, tols, rtol, batches, layerwise):
    """Run A (reference) and B on each EP with the same inputs and compare every output (exit 3 if B diverges)."""
    if report_path:
        report.check_path(report_path)
    eps = runtime.parse_eps(ep_text)
    tolerance, _ = _tolerances(metric, tols, rtol)
    try:
        with _progress(None, "validate") as update:
            result = api.validate_models(a, b, eps=eps, data=data, shapes=runtime.parse_shapes(shapes),
                                         preprocess=preprocess, tolerance=tolerance, max_batches=batches,
                                         layerwise=layerwise, progress=update)
    except ValidationRefused as e:
        if e.result:
            _print_validate(e.result)
            if report_path:
                report.write(e.result, report_path)
        raise
    _print_validate(result)
    if report_path:
        report.write(result, report_path)


def _print_validate(result: dict) -> None:
    for ep, r in result["comparison"]["per_ep"].items():
        click.echo(f"[{ep}] {'ok' if r['ok'] else 'DIVERGED'}: {r['summary']}")
        for o in r["outputs"]:
            cos = "-" if o["cosine"] is None else f"{o['cosine']:.6f}"
            snr = "-" if o["snr_db"] is None else f"{o['snr_db']:.1f}"
            click.echo(f"  {o['name']:<24} max abs {o['max_abs'] or 0:<10.3g} max rel {o['max_rel'] or 0:<10.3g} "
                       f"cosine {cos:<9} SNR {snr:<6} {'ok' if o['ok'] else 'FAIL ' + o['reason']}")
    if "layerwise" in result:
        _print_layerwise(result["layerwise"])


def _print_layerwise(lw: dict | None) -> None:
    if lw is None:
        return
    first = lw["first_divergence"]
    click.echo(f"layerwise: {lw['pairs']} of {lw['values_in_b']} intermediate values paired; "
               + (_divergence(first) if first else "no divergence inside the graph"))


def _divergence(first: dict) -> str:
    return (f"first divergence at node '{first['node']}' ({first['op_type']}), value '{first['value_b']}', "
            f"max abs {first['max_abs']:.3g}")


@main.command(short_help="Latency, throughput and memory side by side.")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@_common
@click.option("--threads", type=int, default=1, show_default=True, help="Intra-op threads per session (0 = ORT default).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model first.")
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs per model (round-robin).")
@click.option("--batch", "batch_text", default=None, help="Batch sizes for the first input dim, e.g. 1,8.")
@_isolated(lambda kw: ", ".join(map(str, kw["models"])))
def bench(models, report_path, ep_text, shapes, data, preprocess, threads, warmup, runs, batch_text):
    """Latency (p50/p90/p99/mean/std), throughput, load time and memory per model and EP, side by side."""
    if report_path:
        report.check_path(report_path)
    eps = runtime.parse_eps(ep_text)
    try:
        batches = [int(b) for b in batch_text.split(",")] if batch_text else [None]
    except ValueError:
        raise UsageError(f"--batch '{batch_text}': expected sizes like 1,8") from None
    with _progress(len(eps) * len(batches) * len(models) * runs, "bench") as update:
        result = api.bench(models, eps=eps, threads=threads or None, warmup=warmup, runs=runs, batches=batches,
                           data=data, shapes=runtime.parse_shapes(shapes), preprocess=preprocess, progress=update)
    click.echo(result["summary"])
    if report_path:
        report.write(result, report_path)


@main.command("passes", short_help="List the passes with their one-line contracts.")
def list_passes():
    """List the available passes with their one-line contracts."""
    for name in registry.names():
        cls = registry.get(name)
        opts = ", ".join(f"{k}={v}" for k, v in pipeline.options_of(cls).items())
        click.echo(f"{name}{' {' + opts + '}' if opts else ''}\n    {cls.contract()}")



# --- batch (many models, one process each; see onnxopt/batch.py) -----------------------------

_BATCH_PASSTHROUGH = ("pipeline", "data", "preprocess", "shape", "ep", "validate", "method", "max_drop", "metric",
                      "recover", "calib_batches", "runs", "warmup", "threads", "tol", "rtol", "batches", "fp16",
                      "op_block_list", "node_block_list", "sparsity", "scope", "threshold", "channels", "criterion",
                      "cluster")


@main.command("batch", short_help="Run a command over many models, one process each, resumable.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False), help="Results: OUTDIR/<name>/, summary.json/.html.")
@click.option("--command", "command", type=click.Choice(list(batch_mod.COMMANDS)), default="optimize",
              show_default=True, help="The command run on every model.")
@click.option("--workers", type=int, default=2, show_default=True, help="Models run at the same time (one process each).")
@click.option("--timeout", type=float, default=None, help="Seconds per model before it is killed (marked failed).")
@click.option("--max-rss", "max_rss_mb", type=float, default=None, help="MB of resident memory per model before it is killed.")
@click.option("--force", is_flag=True, help="Redo models whose earlier result is still valid.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Run models as Ray tasks: --ray (a local cluster of --workers CPUs) or --ray=ADDRESS.")
@click.option("-p", "--pipeline", default=None, help="optimize: the pipeline.")
@click.option("--data", type=click.Path(), default=None, help="Data for every model (a manifest can set it per model).")
@click.option("--preprocess", default=None, help="For image-folder --data.")
@click.option("--shape", multiple=True, help="NAME:1x3x224x224 (repeatable).")
@click.option("--ep", default=None, help="Execution provider(s) of the command.")
@click.option("--validate/--no-validate", default=None, help="optimize: validate (default) or not.")
@click.option("--method", default=None, help="quantize: range method.")
@click.option("--max-drop", type=float, default=None, help="quantize: accuracy budget.")
@click.option("--metric", default=None, help="quantize: module:function; validate: how outputs are judged.")
@click.option("--recover", default=None, help="quantize: recovery passes.")
@click.option("--calib-batches", type=click.IntRange(min=1), default=None, help="quantize: at most this many --data batches.")
@click.option("--runs", type=int, default=None, help="bench: timed runs.")
@click.option("--warmup", type=int, default=None, help="bench: untimed runs.")
@click.option("--threads", type=int, default=None, help="bench: intra-op threads.")
@click.option("--tol", multiple=True, help="validate: threshold (repeatable).")
@click.option("--rtol", type=float, default=None, help="validate: relative tolerance.")
@click.option("--batches", type=int, default=None, help="validate: at most this many batches.")
@click.option("--fp16", is_flag=True, default=None, help="convert: to mixed-precision float16.")
@click.option("--op-block-list", default=None, help="convert: ops kept in float32.")
@click.option("--node-block-list", default=None, help="convert: nodes kept in float32.")
@click.option("--sparsity", type=float, default=None, help="prune/compress: fraction of weights zeroed.")
@click.option("--scope", default=None, help="prune: global or layer.")
@click.option("--threshold", type=float, default=None, help="prune: zero every |w| < T.")
@click.option("--channels", type=float, default=None, help="prune: fraction of channels removed.")
@click.option("--criterion", default=None, help="prune --channels: activation, l1 or l2.")
@click.option("--cluster", type=int, default=None, help="compress: centroids per layer.")
def batch(inputs, outdir, command, workers, timeout, max_rss_mb, force, ray_address, **passthrough):
    """Run --command on every model of INPUTS (files, folders of *.onnx, .json/.yaml manifests of
    {path, options}), each in its own process; write OUTDIR/<name>/ and OUTDIR/summary.json/.html.
    A rerun skips models already done with the same input bytes and options (--force redoes them)."""
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in passthrough.items()
               if k in _BATCH_PASSTHROUGH and v is not None and v != ()}
    with _progress(None, "batch") as update:
        summary = api.batch(list(inputs), outdir, command=command, options=options, workers=workers, timeout=timeout,
                            max_rss_mb=max_rss_mb, force=force, ray_address=ray_address, progress=update)
    for e in summary["models"]:
        size = ""
        if e.get("size_before") and e.get("size_after"):
            size = f", {_mb(e['size_before'])} -> {_mb(e['size_after'])}"
        nodes = f", {e['nodes_before']} -> {e['nodes_after']} nodes" if e.get("nodes_after") is not None else ""
        secs = f" ({e['seconds']:.1f} s)" if e.get("seconds") is not None else ""
        reason = f": {e['reason']}" if e.get("reason") and e["status"] != "ok" else ""
        click.echo(f"{e['name']}: {e['status']}{reason}{nodes}{size}{secs}")
    t = summary["totals"]
    click.echo(f"{t['models']} model(s): " + ", ".join(f"{t[k]} {k}" for k in ("ok", "refused", "failed", "skipped", "pending")
                                                      if t.get(k)) + f"; summary in {Path(outdir) / 'summary.html'}")
    if t.get("failed") or t.get("pending"):
        raise click.exceptions.Exit(2)


if __name__ == "__main__":
    main()

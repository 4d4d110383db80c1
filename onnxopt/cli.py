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
import logging
import os
import signal
import sys
import tempfile
import threading
import typing
from collections.abc import Callable
from pathlib import Path

import click

from onnxopt import __version__, commands, io, pipeline, registry, report
from onnxopt.commands import spec
from onnxopt.errors import BadInputError, OnnxoptError, Terminated, ValidationRefused

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
    """Maps errors to our exit codes (click's own usage exit code is 2; ours is 1); builds each
    command from its module (onnxopt.commands) only when it is asked for, so a command's start-up
    imports its own engine only."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*commands.NAMES, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in commands.NAMES:
            return _command(commands.get(cmd_name))
        return super().get_command(ctx, cmd_name)

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
    state: list[tuple[int, int, int] | None] = []
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


@contextlib.contextmanager
def _progress(total: int | None, desc: str | None):
    """A progress bar on stderr that appears only after 2 s, only on a TTY and not with -q;
    yields the ``update(n)`` callable the library functions accept (None without ``desc``)."""
    if desc is None:
        yield None
        return
    from tqdm import tqdm

    quiet = logging.getLogger("onnxopt").getEffectiveLevel() >= logging.ERROR
    bar = tqdm(total=total, desc=desc, delay=2, leave=False, file=sys.stderr,
               disable=quiet or not sys.stderr.isatty())
    try:
        yield bar.update
    finally:
        bar.close()


def _execute(cmd: spec.Command, fixed: dict, values: dict, report_path: str | None) -> None:
    """Parse, run, print and write the report of one command (in the isolated child)."""
    if report_path:
        report.check_path(report_path)
    if cmd.passthrough:  # batch: the other command's flags, by key
        fixed["options"] = {k[len("pass__"):]: list(v) if isinstance(v, tuple) else v for k, v in list(values.items())
                            if k.startswith("pass__") and v is not None and v != ()}
    options = spec.build(cmd.options, values, **fixed)
    if report_path and cmd.for_report is not None:
        options = cmd.for_report(options)
    try:
        with _progress(cmd.progress_total(options) if cmd.progress_total else None, cmd.progress) as update:
            result = cmd.run(options, update)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        if e.result and cmd.render_refused is not None:
            cmd.render_refused(e.result)
        raise
    if report_path:
        report.write(result.to_dict(), report_path)
    cmd.render(result)


def _command(cmd: spec.Command) -> click.Command:
    """The click command of ``cmd``: its arguments, the flags of its Options, --report."""
    params: list[click.Parameter] = []
    for name, kw in cmd.arguments:
        kw = dict(kw)
        decls = kw.pop("decls", None)
        kind = kw.pop("type", click.Path())
        if decls:
            params.append(click.Option([*decls, name], required=True, type=kind, **kw))
        else:
            params.append(click.Argument([name], type=kind, **kw))
    params.append(click.Option(["--report", "report_path"], type=click.Path(), default=None,
                               help="Write a report: .json, .md or .html."))
    params += spec.click_params(cmd.options)
    if cmd.passthrough:
        params += commands.passthrough_params(cmd)
    names = [name for name, _ in cmd.arguments]

    def callback(report_path: str | None, **values: typing.Any) -> None:
        fixed = {n: values.pop(n) for n in names}
        call = functools.partial(_execute, cmd, fixed, values, report_path)
        if not cmd.isolated or not _can_isolate():
            call()
            return
        code = run_isolated(call, cmd.label(fixed), fixed.get(cmd.output) if cmd.output else None)
        if code:
            raise click.exceptions.Exit(code)  # the child has printed its error line

    return click.Command(cmd.name, params=params, callback=callback, help=cmd.help, short_help=cmd.short_help)


@main.command("passes", short_help="List the passes with their one-line contracts.")
def list_passes():
    """List the available passes with their one-line contracts."""
    for name in registry.names():
        cls = registry.get(name)
        opts = ", ".join(f"{k}={v}" for k, v in pipeline.options_of(cls).items())
        click.echo(f"{name}{' {' + opts + '}' if opts else ''}\n    {cls.contract()}")


if __name__ == "__main__":
    main()

"""What every command shares, below the commands: the report header, model statistics, path checks,
the staged validate-and-commit write, error wrapping, and the :class:`Result` base type.

Commands that write a model share :func:`stage_validate_commit`: the model is written beside the
destination, checked there against the original on ORT, and renamed into place only when it
passes (or with ``force``).  A refused result is never moved into place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import onnx_ir as ir

from onnxopt import __version__, io
from onnxopt.base import count_initializers, count_nodes, op_histogram
from onnxopt.errors import InternalError, OnnxoptError, UsageError, ValidationRefused

logger = logging.getLogger("onnxopt")

ProgressFn = Callable[[int], None]
#: ``ONNXOPT_STRICT_RESULTS=1`` (the test suite sets it): a report key its Result type does not declare fails
STRICT_ENV = "ONNXOPT_STRICT_RESULTS"
T = typing.TypeVar("T")


class CheckResult(Protocol):
    """What a command's check of its staged result returns (validation.ValidationResult for lossless
    commands, a budget result for lossy ones)."""

    @property
    def ok(self) -> bool: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict: ...


def header(command: str, **fields: Any) -> dict:
    """The first keys of every report."""
    return {"tool": "onnxopt", "version": __version__, "command": command, **fields}


def model_stats(model: ir.Model, path: str | os.PathLike | None = None) -> dict:
    """Node, op, initializer and weight counts of ``model`` (with ``path``: its file bytes too)."""
    stats: dict[str, Any] = {
        "nodes": count_nodes(model),
        "ops": dict(sorted(op_histogram(model).items())),
        "initializers": count_initializers(model),
        "weight_bytes": io.weight_bytes(model),
    }
    if path is not None:
        p = Path(path)
        data_files = {t.path for _, t in io.external_tensors(model)}
        stats["file_bytes"] = p.stat().st_size + sum(os.path.getsize(f) for f in data_files if os.path.exists(f))
    return stats


def check_model_file(path: str | os.PathLike) -> None:
    """The same one-line errors as optimize for a model another command will hand to ORT."""
    io.load(path)


def check_output(input_path: str | os.PathLike, output_path: str | os.PathLike, *, in_place: bool = False,
                 hint: str = "pass --in-place to overwrite it") -> None:
    """Usage error when the output is the input (unless ``in_place``); bad input when it cannot be written."""
    if io.same_file(input_path, output_path) and not in_place:
        raise UsageError(f"output {output_path} is the input file; {hint}")
    io.check_writable(Path(output_path))


def stage_validate_commit(model: ir.Model, output_path: str | os.PathLike, report: dict, *,
                          check: Callable[[Path], CheckResult] | None,
                          force: bool = False, external_data: bool | None = None,
                          on_refused: Callable[[Path, Any], None] | None = None,
                          refused: str = "result not written", drop_weights: bool = False) -> dict:
    """Write ``model`` beside ``output_path``, run ``check`` on the staged file (None: not
    validated), and rename it into place when it passes or ``force``; fill ``report["output"]``,
    ``report["validation"]`` and ``report["written"]``.  Refused: ``on_refused(staged path,
    result)`` may add diagnostics to the report, then ValidationRefused(report) is raised and
    nothing is written.  ``drop_weights`` (a caller that does not read ``model``'s weights afterwards):
    once staged with external data, the model's weights are the staged file's, read lazily, so the
    arrays in memory are freed before ``check`` loads the staged file into ORT.  Returns ``report``."""
    with io.StagedModel(model, output_path, external_data) as staged:
        report["output"] = {"path": str(output_path), **model_stats(model), "file_bytes": staged.size_bytes()}
        report["validation"] = None
        if drop_weights and staged.external_data:
            io.point_at(model, io.load(staged.path))
        if check is not None:
            result = check(staged.path)
            report["validation"] = result.to_dict()
            if not result.ok:
                if not force:
                    report["written"] = False
                    if on_refused is not None:
                        on_refused(staged.path, result)
                    raise ValidationRefused(f"{refused}: {result.summary()}", report)
                logger.warning("outputs diverge but --force was given: %s", result.summary())
        staged.commit()
    report["written"] = True
    return report


def guarded(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; expected errors pass, anything else becomes one InternalError line (exit 4)."""
    try:
        return fn()
    except (OnnxoptError, KeyboardInterrupt):
        raise
    except Exception as e:
        logger.debug("%s failed", what, exc_info=True)
        raise InternalError(f"{what} failed ({type(e).__name__}: {e}); nothing was written; "
                            f"please report it (-vv shows the traceback)") from e


@dataclasses.dataclass
class Result:
    """A command's result: the report's keys as typed fields (after the common :func:`header`).

    :meth:`to_dict` is the report JSON (what ``--report`` writes and the report module renders);
    :meth:`from_report` reads one back and fails on a key the type does not declare, so a report
    that drifts from its type (and from ``docs/report.schema.json``, which a test checks against
    these types) is caught.  Optional fields (default None) are left out of the JSON while None,
    unless they are listed in ``always``; a result read with :meth:`from_report` keeps the
    report's key order and presence (``order``), so it writes back the same JSON."""

    command: ClassVar[str] = ""
    #: optional keys written even when None (their null means something: "not validated")
    always: ClassVar[frozenset[str]] = frozenset()
    #: the keys of the report this result was read from, in order (None: built directly)
    order: tuple[str, ...] | None = dataclasses.field(default=None, kw_only=True, repr=False, compare=False,
                                                      metadata={"internal": True})
    #: keys of that report the type does not declare (kept, written back as they were)
    extra: dict = dataclasses.field(default_factory=dict, kw_only=True, repr=False, compare=False,
                                    metadata={"internal": True})

    def to_dict(self) -> dict:
        out = header(self.command)
        fields = {_key(f): f for f in _fields(self)}
        for key in self.order if self.order is not None else list(fields):
            if key in out:
                continue
            if key in self.extra:
                out[key] = self.extra[key]
                continue
            f = fields[key]
            value = getattr(self, f.name)
            if self.order is None and value is None and f.default is None and key not in self.always:
                continue
            out[key] = value
        return out

    @classmethod
    def from_report(cls: type[R], report: dict) -> R:
        keys = {_key(f): f.name for f in _fields(cls)}
        unknown = sorted(set(report) - set(keys) - {"tool", "version", "command"})
        if unknown:
            text = f"{cls.command} report has keys its Result type does not declare: {', '.join(unknown)}"
            if os.environ.get(STRICT_ENV) == "1":  # the test suite: a report drifting from its type fails
                raise InternalError(text)
            logger.debug("%s (kept as they are)", text)  # users: the model is written by now, keep the keys
        return cls(**{keys[k]: v for k, v in report.items() if k in keys}, order=tuple(report),
                   extra={k: report[k] for k in unknown})

    @classmethod
    def keys(cls) -> tuple[list[str], list[str]]:
        """(required, optional) report keys of this type, header included."""
        required: list[str] = ["tool", "version", "command"]
        optional: list[str] = []
        for f in _fields(cls):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            (optional if has_default and _key(f) not in cls.always else required).append(_key(f))
        return required, optional


def _fields(obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if not f.metadata.get("internal")]


R = typing.TypeVar("R", bound=Result)


def _key(f: dataclasses.Field) -> str:
    """A field's report key (``key`` metadata where the key is not a Python name)."""
    return str(f.metadata.get("key", f.name))

"""Pipeline text -> pass instances -> fixed-point run with per-pass records.

Text: ``"cleanup,fold-constants{size-limit=4096},dedup"``; options are kebab-case spellings of
the pass constructor's keyword arguments, separated by ``,`` or ``;`` inside the braces, and
coerced to the type of the argument's default.  The runner repeats the whole sequence until an
iteration changes nothing (a pass may enable another), at most ``max_iterations`` times; a pass
is skipped when no pass changed the model since its own last run (passes are idempotent).
We run our own loop rather than ``ir.passes.PassManager`` because we record every pass's
changes/skips and can call a hook (``--verify-each``) between passes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxopt import registry
from onnxopt.base import OptResult, count_nodes, serialized_size
from onnxopt.errors import InternalError, OnnxoptError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_PIPELINE = "cleanup,fold-constants,fold-shapes,simplify,transpose-push,fuse-activations,fuse-affine,dedup,cse"
_ITEM = re.compile(r"\s*([a-z0-9][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*")


@dataclasses.dataclass
class PassSpec:
    name: str
    options: dict[str, object]

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "}"


def _split_top(text: str) -> list[str]:
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UsageError(f"pipeline '{text}': unbalanced '}}'")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise UsageError(f"pipeline '{text}': unbalanced '{{'")
    items.append("".join(cur))
    return items


#: pipeline text item that stands for DEFAULT_PIPELINE (e.g. "default,fuse-transformer")
DEFAULT_TOKEN = "default"


def parse(text: str) -> list[PassSpec]:
    """Parse pipeline text; unknown pass names and options are UsageErrors naming the alternatives.

    The item ``default`` expands to :data:`DEFAULT_PIPELINE`.  Passes whose class sets
    ``runs_first`` (fuse-transformer: its patterns must be matched before other passes rewrite
    them) move to the front, keeping their relative order, so the order written does not matter."""
    specs = _parse_items(text)
    return sorted(specs, key=lambda s: not getattr(registry.get(s.name), "runs_first", False))


def _parse_items(text: str) -> list[PassSpec]:
    specs = []
    for item in _split_top(text):
        if item.strip() == DEFAULT_TOKEN:
            specs += _parse_items(DEFAULT_PIPELINE)
            continue
        if not item.strip():
            raise UsageError(f"pipeline '{text}': empty pass name")
        m = _ITEM.fullmatch(item)
        if not m:
            raise UsageError(f"pipeline '{text}': cannot parse '{item.strip()}' (expected name or name{{key=value}})")
        name, body = m.group(1), m.group(2)
        cls = registry.get(name)
        accepted = options_of(cls)
        options: dict[str, object] = {}
        for pair in filter(None, (p.strip() for p in re.split(r"[,;]", body or ""))):
            key, sep, raw = (s.strip() for s in pair.partition("="))
            if not sep or not key:
                raise UsageError(f"pass '{name}': option '{pair}' must be key=value")
            if key not in accepted:
                known = ", ".join(accepted) or "none"
                raise UsageError(f"pass '{name}' has no option '{key}' (options: {known})")
            options[key] = _coerce(name, key, raw, accepted[key])
        specs.append(PassSpec(name, options))
    return specs


def with_option(specs: list[PassSpec], name: str, key: str, value: object, flag: str) -> list[PassSpec]:
    """``specs`` with option ``key`` of every pass ``name`` set to ``value`` (a CLI flag such as
    ``--model-type`` that stands for a pass option); a UsageError when no such pass is in them."""
    if not any(s.name == name for s in specs):
        raise UsageError(f"{flag} applies to the pass '{name}', which is not in the pipeline (add it with -p)")
    return [PassSpec(s.name, {**s.options, key: value}) if s.name == name else s for s in specs]


#: Constructor arguments the pipeline supplies itself (not options in pipeline text):
#: ``start_bytes``, the model's serialized size when the pipeline started (fold-constants' budget).
#: ``feeds``, the validation's input points (fuse-transformer checks its candidates on them).
PIPELINE_ARGUMENTS = frozenset({"start_bytes", "feeds"})


def options_of(cls: type) -> dict[str, object]:
    """kebab-case option name -> default value, from the constructor's keyword arguments."""
    params = inspect.signature(cls).parameters
    return {p.name.replace("_", "-"): p.default for p in params.values()
            if p.name != "self" and p.name not in PIPELINE_ARGUMENTS and p.default is not inspect.Parameter.empty}


def _coerce(name: str, key: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(float(raw)) if re.fullmatch(r"\d+(\.0*)?(e\d+)?", raw) else int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UsageError(f"pass '{name}': option '{key}={raw}' must be a {type(default).__name__}") from None
    return raw


def build(specs: Sequence[PassSpec], start_bytes: int | None | Callable[[], int | None] = None,
          feeds: list | None = None) -> list[ir.passes.PassBase]:
    """Instantiate the passes; those whose constructor takes ``start_bytes`` or ``feeds`` get them
    explicitly (``start_bytes`` may be a function, called only when a pass takes it: measuring
    costs one serialization)."""
    passes = []
    for s in specs:
        cls = registry.get(s.name)
        kwargs = {k.replace("-", "_"): v for k, v in s.options.items()}
        if "start_bytes" in inspect.signature(cls).parameters:
            if callable(start_bytes):
                start_bytes = start_bytes()
            kwargs["start_bytes"] = start_bytes
        if "feeds" in inspect.signature(cls).parameters:
            kwargs["feeds"] = feeds
        passes.append(cls(**kwargs))
    return passes


@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    modified: bool
    changed: dict[str, int]
    skipped: dict[str, int]
    seconds: float
    nodes_after: int


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model  # the final model (a functional pass returns a new object)
    records: list[PassRecord]
    iterations: int
    converged: bool

    def totals(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per pass: summed changes and the skips of the last iteration (skips repeat each round)."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for r in self.records:
            entry = out.setdefault(r.name, {"changed": {}, "skipped": {}})
            for k, v in r.changed.items():
                entry["changed"][k] = entry["changed"].get(k, 0) + v
            entry["skipped"] = dict(r.skipped)
        return out


def run(model: ir.Model, specs: Sequence[PassSpec], *, max_iterations: int = 10,
        after_pass: Callable[[PassSpec, ir.Model], None] | None = None, feeds: list | None = None) -> PipelineResult:
    """Apply the passes in order, repeated until nothing changes.  ``after_pass`` runs after
    every pass that modified the model (and may raise to stop the run).  ``feeds``: input points
    (name -> array dicts) for passes that check their own candidates (the validation's)."""
    passes = build(specs, start_bytes=lambda: serialized_size(model), feeds=feeds)
    records: list[PassRecord] = []
    version = 0  # bumped whenever a pass modifies the model
    last_run: dict[int, int] = {}  # pass index -> version it last ran on
    for iteration in range(1, max_iterations + 1):
        any_change = False
        for index, (spec, p) in enumerate(zip(specs, passes)):
            if last_run.get(index) == version:
                continue  # nothing changed since this pass last ran: idempotent, so a no-op
            if iteration > 1 and getattr(p, "runs_first", False):
                continue  # runs once, on the model as given (see parse)
            t0 = time.perf_counter()
            try:
                result = p(model)
            except OnnxoptError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug in a pass: one line for the user, details at -vv
                logger.debug("pass '%s' failed", spec, exc_info=True)
                raise InternalError(f"pass '{spec}' failed ({type(e).__name__}: {e}); nothing was written; "
                                    f"leave the pass out with -p, and please report it (-vv shows the traceback)") from e
            model = result.model
            changed = dict(result.changed) if isinstance(result, OptResult) else ({"modified": 1} if result.modified else {})
            skipped = dict(result.skipped) if isinstance(result, OptResult) else {}
            records.append(PassRecord(str(spec), iteration, result.modified, changed, skipped,
                                      time.perf_counter() - t0, count_nodes(model)))
            logger.info("%s (iteration %d): changed %s, skipped %s", spec, iteration, changed or "nothing", skipped or "nothing")
            if result.modified:
                version += 1
                any_change = True
            last_run[index] = version
            if result.modified and after_pass is not None:
                after_pass(spec, model)
        if not any_change:
            return PipelineResult(model, records, iteration, True)
    logger.warning("pipeline did not reach a fixed point in %d iterations", max_iterations)
    return PipelineResult(model, records, max_iterations, False)

"""The teacher every lossy command scores against (quantize in every mode, prune, compress): the
prepared fp32 model, the held-out batches and its outputs on them, the yardstick (a user
``--metric``, else the per-output fidelity of onnxopt.fidelity), the float score, and the budget
check of a staged result.  One held-out rule for all: of the batches read, every 4th (index 3, 7,
...) is held out, up to :data:`HELD_OUT`; the others calibrate, refit or recover.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import fidelity, runtime
from onnxopt.errors import BadInputError, OnnxoptError, UsageError

logger = logging.getLogger("onnxopt")

#: held-out batches at most (every 4th batch read)
HELD_OUT = 8


def is_held_out(i: int) -> bool:
    """Whether batch ``i`` (0-based, in reading order) is held out for scoring."""
    return i % 4 == 3 and i // 4 < HELD_OUT


def score_session(sess: Any, metric: Callable | None, metric_name: str | None, rules: Any, max_drop: float | None,
                  held_out: Sequence[Mapping], reference: Sequence[Mapping],
                  margins: Mapping[str, Any] | None = None) -> tuple[float, list[dict] | None]:
    """A candidate session's score: the user's ``metric(sess)`` (an exception in it is one
    BadInputError line), else the lowest per-output fidelity (onnxopt.fidelity) of its outputs on
    the ``held_out`` batches against the ``reference`` outputs (``margins``: the reference's top-2
    margins elsewhere, for the flip estimate); with those per-output results (None for a user metric)."""
    if metric is not None:
        try:
            return float(metric(sess)), None
        except Exception as e:  # noqa: BLE001 - user code
            text = (str(e).strip().splitlines() or [""])[0]
            raise BadInputError(f"--metric '{metric_name}' raised {type(e).__name__}: {text}") from None
    fid = fidelity.Fidelity(rules, max_drop, margins)
    for feeds, ref in zip(held_out, reference):
        fid.add(ref, runtime.run_candidate(sess, feeds, list(ref)))
    results = fid.results()
    return min((r["score"] for r in results), default=1.0), results


@dataclasses.dataclass
class BudgetResult:
    """The accuracy check of a staged model, in the shape ``commands.core.stage_validate_commit`` wants."""

    ok: bool
    metric: str
    drop: float
    max_drop: float
    #: how the result was placed, for the refusal line (None: said nothing of it)
    where: str | None = None

    def summary(self) -> str:
        return f"{self.metric} drop {self.drop:.4g} > --max-drop {self.max_drop:g}" + (f" {self.where}" if self.where else "")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "metric": self.metric, "drop": self.drop, "max_drop": self.max_drop}


class Teacher:
    """The fp32 reference of one run: ``source`` (what ORT sessions are made from), ``held_out``
    batches, ``ep``/``threads`` the candidates are scored on, the yardstick (``metric``, a callable
    loaded from ``metric_name``, or the fidelity ``rules`` of the model's outputs; class outputs
    declared in ``class_outputs``, name -> class axis or None for cosine) and ``max_drop``.  On
    ``synthesized`` held-out inputs (no --data) predictions are judged by cosine, not class flips:
    a flip on noise inputs means nothing.

    The float model scores itself once at construction (``float_score``: its metric, or 1.0 for
    the default yardstick, whose per-output results are kept in ``last_results``)."""

    def __init__(self, model: ir.Model, source: runtime.Source, held_out: list[dict], *, ep: str, threads: int,
                 metric: Callable | None, metric_name: str | None, max_drop: float | None,
                 class_outputs: Mapping[str, int | None] | None = None, synthesized: bool = False,
                 prepack: bool = True):
        self.source, self.held_out, self.ep, self.threads = source, held_out, ep, threads
        self.metric, self.metric_name, self.max_drop = metric, metric_name, max_drop
        #: how each output is judged without --metric (onnxopt.fidelity); per-output results of the last score
        self.rules = fidelity.rules(model, class_outputs)
        if synthesized and metric is None:
            self.rules = fidelity.for_synthesized(self.rules)
        self.last_results: list[dict] = []
        #: per top-1 output, the float model's top-2 margins on the calibration batches, and witness
        #: calibration batches with their float outputs (learn_from)
        self.margins: dict[str, Any] = {}
        self.witness: list[Mapping] = []
        self.witness_reference: list[Mapping] = []
        self.float_session: Any = runtime.session(source, ep, threads, prepack=prepack)
        self.reference = [runtime.run(self.float_session, f) for f in held_out]
        self.float_score = self.score_session(self.float_session)
        if metric is None:  # fp32 agrees with itself everywhere; a sample's lower bound is not its score
            self.float_score = 1.0

    # Pickling (onnxopt.parallel sends the quantizer, and its teacher, to search workers).
    def __getstate__(self) -> dict:
        """Everything but the ORT session (a worker scores with sessions of its own) and a metric
        loaded by name (loaded again from ``metric_name`` where it is unpickled)."""
        state = dict(vars(self))
        state["float_session"] = None
        if self.metric_name is not None:
            state["metric"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        if self.metric is None and self.metric_name is not None:
            self.metric = load_metric(self.metric_name)

    def learn_from(self, batches: Iterable[Mapping], limit: int = 4 * HELD_OUT) -> None:
        """What the calibration batches (``batches``, up to ``limit``) tell the default yardstick.

        - The float model's top-2 margins there, for the outputs judged by top-1: when the held-out
          positions are too few to certify the budget, the flip estimate reads the margins of every
          position there is (onnxopt.fidelity.flip_rate).
        - When the data were short (fewer than HELD_OUT held-out batches), up to as many *witness*
          batches as there are held-out ones, with the float outputs on them: a candidate the held-out
          batches do not certify (an agreement below the certifiable sample size, or a cosine) scores
          the lower of the held-out and the witness score.  The witnesses were
          calibrated or refitted on, so they flatter the smooth part of the error, but a rare event the
          few held-out batches missed (an attention arg-max that moves, a near-tied class) shows there
          as well (a pruned attention: 0 change on its 2 held-out batches, cosine drop 0.02 on the 6
          others, 0.027 on fresh data).
        Costs one float run per batch; keeps one number per position and the witness batches."""
        if self.metric is not None:
            return
        names = {n: r.axis for n, r in self.rules.items() if r.metric == fidelity.TOP1 and r.axis is not None}
        parts: dict[str, list] = {n: [] for n in names}
        for i, feeds in enumerate(batches):
            if i >= limit:
                break
            out = runtime.run(self.float_session, feeds)
            if len(self.witness) < len(self.held_out) < HELD_OUT and not any(feeds is h for h in self.held_out):
                self.witness.append(feeds)
                self.witness_reference.append(out)
            for name, axis in names.items():
                r = np.asarray(out[name])
                if np.issubdtype(r.dtype, np.floating) and -r.ndim <= axis < r.ndim and r.shape[axis] >= 2:
                    parts[name].append(fidelity.top2_margins(np.moveaxis(r, axis, -1).reshape(-1, r.shape[axis])))
        self.margins = {n: np.concatenate(p) for n, p in parts.items() if p}

    def score_session(self, sess: Any, reference: Sequence[Mapping] | None = None) -> float:
        score, results = score_session(sess, self.metric, self.metric_name, self.rules, self.max_drop, self.held_out,
                                       reference or self.reference, self.margins)
        certified = results is not None and all(r.get("judged_by") == "95% lower bound" for r in results)
        if self.witness and results is not None and not certified:
            seen, on_witness = score_session(sess, None, None, self.rules, self.max_drop, self.witness,
                                             self.witness_reference, self.margins)
            if seen < score and on_witness is not None:
                score, results = seen, [{**r, "judged_by": f"{r['judged_by'] or 'score'} on calibration batches (lower "
                                                          f"than on the held-out ones)"} for r in on_witness]
        if results is not None:
            self.last_results = results
        return score

    def score(self, source: runtime.Light | bytes | str | os.PathLike) -> float:
        """Score a model (a weightless ``runtime.Light``, serialized bytes, or a model file)."""
        src = source if isinstance(source, (runtime.Light, bytes)) else str(source)
        return self.score_session(runtime.session(src, self.ep, self.threads))

    def metric_label(self) -> str:
        """The yardstick as the report names it."""
        return self.metric_name or "default: " + fidelity.describe(self.last_results)

    def check(self, report: dict, keys: Sequence[str], where: str | None = None,
              warn_uncertified: bool = False) -> Callable[[Path], BudgetResult]:
        """Score the staged file and fill ``report["accuracy"]`` (the score under each of ``keys``;
        without --metric also the per-output results, and with ``warn_uncertified`` a warning for an
        output whose held-out positions are too few to certify the budget)."""

        def check(path: Path) -> BudgetResult:
            score = self.score(path)
            drop = self.float_score - score
            metric = self.metric_label()
            accuracy: dict[str, Any] = {"metric": metric, "float": self.float_score}
            accuracy.update({k: score for k in keys})
            accuracy.update(drop=drop, max_drop=self.max_drop)
            if self.metric is None:
                if warn_uncertified:
                    self._warn_uncertified()
                accuracy["outputs"] = self.last_results
            report["accuracy"] = accuracy
            budget = float(self.max_drop if self.max_drop is not None else 0.0)
            return BudgetResult(drop <= budget, metric, drop, budget, where)

        return check

    def _warn_uncertified(self) -> None:
        for r in fidelity.uncertified(self.last_results, float(self.max_drop or 0.0)):
            lo, hi = r["agreement_interval"]
            logger.warning("output '%s': %s agreement %.4f on only %d held-out positions (95%% interval "
                           "%.3f-%.3f) cannot certify the %.3g budget; more --data batches (every 4th, up to 8, "
                           "is held out) or a --metric would", r["name"], r["metric"], r["agreement"],
                           r["positions"], lo, hi, 1 - float(self.max_drop or 0.0))


def load_metric(spec: str | None) -> Callable | None:
    """``module:function`` or ``path/to/file.py:function`` -> the callable.

    A module name is imported with the current directory first on ``sys.path`` (as ``python -m``
    does, so ``models.tasks:digits_accuracy`` works from the repository root); a path (ending in
    ``.py`` or containing a ``/``) is loaded from that file.  A spec without ``:`` is a usage error
    (exit 1); a module that is missing, does not import (syntax error, exception at import), or
    lacks a callable of that name is bad input (exit 2), one line."""
    import importlib.util

    if spec is None:
        return None
    module, _, func = spec.rpartition(":")
    if not module or not func:
        raise UsageError(f"--metric '{spec}': expected module:function or path/to/file.py:function")
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            path = Path(module)
            if not path.is_file():
                raise BadInputError(f"--metric '{spec}': no such file '{module}'")
            name = f"_onnxopt_metric_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise BadInputError(f"--metric '{spec}': '{module}' is not a Python file")
            mod = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = mod  # dataclasses and pickling look the module up by name
            try:
                module_spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
    except OnnxoptError:
        raise
    except SyntaxError as e:
        raise BadInputError(f"--metric '{spec}': syntax error in {e.filename}, line {e.lineno}: {e.msg}") from None
    except ModuleNotFoundError as e:
        raise BadInputError(f"--metric '{spec}': no module named '{e.name}' (modules are looked up from the "
                            f"current directory and sys.path; or give path/to/file.py:{func})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code runs at import
        text = (str(e).strip().splitlines() or [""])[0]
        raise BadInputError(f"--metric '{spec}': importing '{module}' failed ({type(e).__name__}: {text})") from None
    fn = getattr(mod, func, None)
    if fn is None:
        raise BadInputError(f"--metric '{spec}': '{module}' has no attribute '{func}'")
    if not callable(fn):
        raise BadInputError(f"--metric '{spec}': '{func}' in '{module}' is not callable")
    return fn

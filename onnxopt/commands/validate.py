"""``onnxopt validate A B``: A (reference) and B on every EP with the same inputs, every output
compared (worst case over the batches); with ``layerwise`` also the intermediate tensors at the
first batch, naming the first diverging node.  Exit 3 when B diverges.

``onnxopt validate A --ep cpu,openvino`` (no B): A on each other EP against A on the first, and the
first node where they diverge beyond the tolerance (the layerwise comparison always runs then), as a
user porting a model to another EP needs.  Exit 3 when an EP diverges."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import click

from onnxopt import data as data_mod
from onnxopt import layerwise as layerwise_mod
from onnxopt import runtime, validation
from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag
from onnxopt.errors import UsageError, ValidationRefused

Tolerances = validation.Tolerance | Mapping[str, validation.Tolerance]


def tolerances(metric: str, tols: tuple[str, ...], rtol: float | None) -> Tolerances:
    """--tol VALUE (all outputs) and --tol NAME=VALUE (one output) -> Tolerance or {name: Tolerance}."""
    lossless = validation.LOSSLESS

    def make(value: float | None) -> validation.Tolerance:
        if metric == "allclose":
            return validation.Tolerance(rtol if rtol is not None else lossless.rtol,
                                        value if value is not None else lossless.atol)
        return validation.Tolerance(lossless.rtol, lossless.atol, metric, value)

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
    return {"*": base, **per_output} if per_output else base


@dataclasses.dataclass
class Options:
    a: str | os.PathLike
    #: None: A against itself across the EPs
    b: str | os.PathLike | None = None
    data: str | os.PathLike | None = common.data()
    preprocess: str | None = common.preprocess()
    shapes: Mapping[str, tuple[int, ...]] | None = common.shapes()
    eps: str | tuple[str, ...] = flag(("cpu",), "--ep", default="cpu", parse=runtime.parse_eps,
                                      help="Execution providers, comma separated: cpu, openvino, cuda, tensorrt, dml, coreml.")
    metric: str = flag("allclose", "--metric", type=click.Choice(list(validation.METRICS)),
                       help="How outputs are judged.")
    tol: tuple[str, ...] = flag((), "--tol", multiple=True,
                                help="Threshold for --metric (allclose: atol), or NAME=VALUE for one output (repeatable).")
    rtol: float | None = flag(None, "--rtol", type=float, help="Relative tolerance of allclose (default 1e-4).")
    max_batches: int = flag(16, "--batches", type=int, help="At most this many --data batches.")
    layerwise: bool = flag(False, "--layerwise", is_flag=True,
                           help="Compare intermediate tensors and name the first diverging node.")
    #: the tolerance itself (Python API; None: from ``metric``, ``tol`` and ``rtol``)
    tolerance: Tolerances | None = None


@dataclasses.dataclass
class Result(core.Result):
    command = "validate"

    a: str
    b: str | None
    tolerance: dict
    comparison: dict
    error_samples: list | dict | None
    layerwise: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Raises ValidationRefused(report) when B diverges."""
    eps = runtime.parse_eps(o.eps) if isinstance(o.eps, str) else tuple(o.eps)
    tolerance = o.tolerance if o.tolerance is not None else tolerances(o.metric, tuple(o.tol), o.rtol)
    if o.b is None and len(eps) < 2:
        raise UsageError("validate A alone compares execution providers: name two or more (--ep cpu,openvino), "
                         "or give B to compare two models")
    for path in (o.a, o.b):
        if path is not None:
            core.check_model_file(path)
    base = tolerance if isinstance(tolerance, validation.Tolerance) else tolerance.get("*", validation.LOSSLESS)
    comparison = validation.compare_models(o.a, o.b, eps=eps, data=o.data, shapes=o.shapes, preprocess=o.preprocess,
                                           tolerance=tolerance, max_batches=o.max_batches, progress=progress)
    report = core.header("validate", a=str(o.a), b=None if o.b is None else str(o.b), tolerance=base.describe(),
                         comparison=comparison.to_dict(), error_samples=comparison.error_samples)
    if o.layerwise or (o.b is None and not comparison.ok):
        report["layerwise"] = _first_divergence(o, eps, comparison, base, progress)
    if not comparison.ok:
        raise ValidationRefused("outputs of B diverge from A beyond the tolerance" if o.b is not None else
                                f"outputs of A on {', '.join(k for k, r in comparison.per_ep.items() if not r.ok)} "
                                f"diverge beyond the tolerance", report)
    return Result.from_report(report)


def _first_divergence(o: Options, eps: tuple[str, ...], comparison: validation.ModelComparison,
                      base: validation.Tolerance, progress: core.ProgressFn | None) -> dict:
    """The layerwise comparison at the first batch: B against A on the first EP, or without B, A on the
    first EP that diverged (else the second) against A on the first."""
    sess = runtime.session(o.a, eps[0])
    feeds = data_mod.feeds_for(sess, o.data, o.shapes, o.preprocess, limit=1)[0]
    if o.b is not None:
        return layerwise_mod.compare_layers(o.a, o.b, feeds, base, eps[0], progress=progress).to_dict()
    diverged = [label.split(" vs ")[0] for label, r in comparison.per_ep.items() if not r.ok] or [eps[1]]
    result = layerwise_mod.compare_layers(o.a, o.a, feeds, base, eps[0], progress=progress, ep_b=diverged[0]).to_dict()
    return {**result, "eps": [eps[0], diverged[0]]}


def render_refused(report: dict) -> None:
    for ep, r in report["comparison"]["per_ep"].items():
        click.echo(f"[{ep}] {'ok' if r['ok'] else 'DIVERGED'}: {r['summary']}")
        for o in r["outputs"]:
            cos = "-" if o["cosine"] is None else f"{o['cosine']:.6f}"
            snr = "-" if o["snr_db"] is None else f"{o['snr_db']:.1f}"
            click.echo(f"  {o['name']:<24} max abs {o['max_abs'] or 0:<10.3g} max rel {o['max_rel'] or 0:<10.3g} "
                       f"cosine {cos:<9} SNR {snr:<6} {'ok' if o['ok'] else 'FAIL ' + o['reason']}")
    if "layerwise" in report:
        lw = report["layerwise"]
        if lw is None:
            return
        first = lw["first_divergence"]
        across = f" ({lw['eps'][1]} against {lw['eps'][0]})" if lw.get("eps") else ""
        click.echo(f"layerwise{across}: {lw['pairs']} of {lw['values_in_b']} intermediate values paired; "
                   + (common.divergence(first) if first else "no divergence inside the graph"))


def render(result: core.Result) -> None:
    render_refused(result.to_dict())


COMMAND = Command(
    name="validate", short_help="Compare two models' outputs on each EP, or one model across EPs.",
    help="Run A (reference) and B on each EP with the same inputs and compare every output (exit 3 if B diverges). "
         "Without B, run A on each EP of --ep (two or more) against the first and name the first node where they "
         "diverge (exit 3 if an EP diverges).",
    arguments=(("a", {"metavar": "A"}), ("b", {"metavar": "[B]", "required": False})),
    options=Options, run=run, render=render, render_refused=render_refused, result=Result, output=None,
    label=lambda kw: f"{kw['a']} or {kw['b']}" if kw.get("b") else str(kw["a"]), progress="validate")

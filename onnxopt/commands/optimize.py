"""``onnxopt optimize``: the lossless pipeline, validated against the original on ORT.

Steps (each a call into its own module): load, validator, pipeline, report, stage-check-commit.
The input file is never modified (unless ``in_place``, and then only by the final atomic rename).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import onnx_ir as ir

from onnxopt import flops, io, layerwise, pipeline, runtime, validation
from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag
from onnxopt.errors import UsageError, ValidationRefused

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Options:
    input_path: str | os.PathLike
    output_path: str | os.PathLike
    pipeline_text: str | None = flag(None, "-p", "--pipeline",
                                     help='Passes, e.g. "cleanup,fold-constants{size-limit=4096},dedup" '
                                          f'(default: {pipeline.DEFAULT_PIPELINE}).')
    data: str | os.PathLike | None = common.data()
    preprocess: str | None = common.preprocess()
    shapes: Mapping[str, tuple[int, ...]] | None = common.shapes()
    ep: str = common.ep()
    validate_result: bool = flag(True, "--validate/--no-validate", help="Compare against the original on ORT.")
    force: bool = common.force()
    verify_each: bool = flag(False, "--verify-each", is_flag=True,
                             help="Validate after every pass and name the pass that broke outputs.")
    in_place: bool = flag(False, "--in-place", is_flag=True, help="Allow -o to be the input file.")
    external_data: bool | None = flag(None, "--external-data/--no-external-data",
                                      help="Write weights to OUT.data (default: only when over ~1.8 GB).")
    model_type: str | None = flag(None, "--model-type",
                                  help="fuse-transformer's model type: bert, gpt2, vit, ... (default: detected from the inputs).")
    #: timed runs of each model for the latency line (0: none)
    latency_runs: int = 10
    #: count MACs/FLOPs before and after (the CLI does when it writes a report)
    with_cost: bool = False


@dataclasses.dataclass
class Result(core.Result):
    command = "optimize"
    always = frozenset({"validation"})

    input: dict
    pipeline: str
    iterations: int
    converged: bool
    passes: dict
    records: list
    optimize_seconds: float
    declared_output_shape_mismatches: list
    output: dict
    validation: dict | None
    written: bool
    seconds: float = 0.0
    layerwise: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Optimize ``o.input_path`` into ``o.output_path``.  Raises ValidationRefused (with the report)
    when outputs diverge and not ``force``; nothing is written then."""
    t_start = time.perf_counter()
    eps = runtime.parse_eps(o.ep)
    if len(eps) != 1:
        raise UsageError("optimize validates on one --ep; compare on several with 'onnxopt validate'")
    ep = eps[0]
    core.check_output(o.input_path, o.output_path, in_place=o.in_place)
    specs = pipeline.parse(o.pipeline_text or pipeline.DEFAULT_PIPELINE)
    if o.model_type is not None:
        specs = pipeline.with_option(specs, "fuse-transformer", "model-type", o.model_type, "--model-type")
        pipeline.build(specs)  # an unknown model type is a usage error before any work

    model = io.load(o.input_path)
    before = core.model_stats(model, o.input_path)
    if o.with_cost:
        before["cost"] = flops.estimate(model, o.shapes).to_dict(per_node=False)
    fp16 = any(s.name == "convert-fp16" for s in specs)
    # lossy convert-fp16: the fp16 tolerances (onnxopt convert checks ranges too)
    tolerance = validation.LOSSLESS_FP16 if fp16 else validation.default_tolerance(model)
    validator = None
    if o.validate_result or o.verify_each:
        validator = validation.Validator(o.input_path, data=o.data, preprocess=o.preprocess, shapes=o.shapes,
                                         tolerance=tolerance, ep=ep, latency_runs=o.latency_runs if o.validate_result else 0)
    faithful = _fp16_check(validator) if fp16 and validator is not None and validator.ep == "cpu" else None

    mismatches = validation.declared_shape_mismatches(model, validator.reference) if validator else []
    for m in mismatches:
        logger.warning("output '%s' is declared %s but the model produces %s (kept as declared)",
                       m["output"], m["declared"], m["actual"])

    def verify(spec: pipeline.PassSpec, current: ir.Model) -> None:
        assert validator is not None
        check = faithful.check_model(current) if faithful is not None else validator.check_model(current)
        if not check.ok:
            raise ValidationRefused(f"pass '{spec}' changed the outputs: {check.summary()}")

    t0 = time.perf_counter()
    feeds = [p.feeds for p in validator.points if p.reference is not None] if validator else None
    done = pipeline.run(model, specs, after_pass=verify if o.verify_each else None, feeds=feeds)
    model = done.model
    report = core.header("optimize", input={"path": str(o.input_path), **before},
                         pipeline=",".join(str(s) for s in specs), iterations=done.iterations, converged=done.converged,
                         passes=done.totals(), records=[dataclasses.asdict(r) for r in done.records],
                         optimize_seconds=time.perf_counter() - t0, declared_output_shape_mismatches=mismatches)

    def check(path: Path) -> core.CheckResult:
        assert validator is not None
        return faithful(path) if faithful is not None else validator.check(path)

    def diagnose(path: Path, result: validation.ValidationResult) -> None:
        assert validator is not None
        report["validation"]["points"] = validator.exercised()
        report["seconds"] = time.perf_counter() - t_start
        # layerwise runs plain sessions, which hide fp16 overflow: not for the fp16-faithful check
        report["layerwise"] = first_divergence(o.input_path, path, result, ep) if faithful is None else None

    after_cost = flops.estimate(model, o.shapes).to_dict(per_node=False) if o.with_cost else None  # before anything is written
    core.stage_validate_commit(model, o.output_path, report,
                               check=check if validator is not None and o.validate_result else None,
                               force=o.force, external_data=o.external_data, on_refused=diagnose,
                               refused="optimized model not written")
    if after_cost is not None:
        report["output"]["cost"] = after_cost
    if report["validation"] is not None and validator is not None:
        report["validation"]["points"] = validator.exercised()
    report["seconds"] = time.perf_counter() - t_start
    return Result.from_report(report)


def _fp16_check(validator: validation.Validator) -> Any:
    """The fp16-faithful check of ``onnxopt convert`` (the plain CPU EP computes fp16 chains in
    float32 and would hide an overflow)."""
    from onnxopt.precision import convert as convert_mod  # convert-fp16 pipelines only: the fp16 check's imports

    return convert_mod.Fp16Check(validator)


def first_divergence(original: str | os.PathLike, candidate: str | os.PathLike, result: validation.ValidationResult,
                     ep: str) -> dict | None:
    """Layerwise comparison at the input point where an output diverged: the first node whose
    output differs names the pass's mistake.  None when the candidate cannot run at all."""
    point = result.failing_point
    if point is None or not point.feeds:
        return None
    tolerance = result.tolerance if isinstance(result.tolerance, validation.Tolerance) else validation.LOSSLESS
    try:
        return layerwise.compare_layers(original, candidate, point.feeds, tolerance, ep).to_dict()
    except Exception as e:  # noqa: BLE001 - a diagnosis must never turn a refusal (exit 3) into a crash
        logger.info("layerwise comparison unavailable: %s", e)
        logger.debug("layerwise comparison failed", exc_info=True)
        return None


def render(result: core.Result) -> None:
    r = result.to_dict()
    inp, out = r["input"], r["output"]
    click.echo(f"{inp['path']}: {inp['nodes']} -> {out['nodes']} nodes, {common.mb(inp['file_bytes'])} -> "
               f"{common.mb(out['file_bytes'])} ({r['iterations']} iteration(s), {r['seconds']:.2f} s)")
    for name, entry in r["passes"].items():
        if entry["changed"]:
            click.echo(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in entry["changed"].items()))
    common.echo_validation(r["validation"])
    click.echo(f"wrote {out['path']}")


def render_refused(report: dict) -> None:
    for line in (report.get("validation") or {}).get("outputs", []):
        if not line["ok"]:
            click.echo(f"  {line['name']}: max abs {line['max_abs'] or 0:.3g}, max rel {line['max_rel'] or 0:.3g}: "
                       f"{line['reason']}", err=True)
    lw = report.get("layerwise")
    if lw and lw.get("first_divergence"):
        click.echo(f"  {common.divergence(lw['first_divergence'])}", err=True)


def _for_report(o: Options) -> Options:
    return dataclasses.replace(o, with_cost=True)


COMMAND = Command(
    name="optimize", short_help="Optimize a model (validated against the original).",
    help="Optimize MODEL into OUTPUT (validated against MODEL by default, on the --ep given).",
    arguments=(("input_path", {"metavar": "MODEL"}),
               ("output_path", {"decls": ("-o", "--output"), "help": "Where to write the optimized model."})),
    options=Options, run=run, render=render, render_refused=render_refused, result=Result, for_report=_for_report)

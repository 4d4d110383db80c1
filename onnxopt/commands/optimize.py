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

from onnxopt import flops, io, layerwise, pipeline, registry, runtime, validation
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
    strict: bool = flag(False, "--strict", is_flag=True,
                        help="Refuse (exit 3) when the result diverges, instead of writing it without the pass "
                             "that broke the outputs.")


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
    #: passes left out because they changed the outputs ({pass, reason}); the result is the others'
    rolled_back: list | None = None


class PassBroke(ValidationRefused):
    """A pass whose result diverges from the original (``--verify-each``, or bisecting a refusal)."""

    def __init__(self, spec: pipeline.PassSpec, summary: str):
        super().__init__(f"pass '{spec}' changed the outputs: {summary}")
        self.spec, self.summary = spec, summary


@dataclasses.dataclass
class _Setting:
    """What every attempt of one optimize run shares: the options, EP, the original's statistics and
    the checks (the validator's reference outputs are computed once)."""

    o: Options
    ep: str
    before: dict
    validator: validation.Validator | None
    faithful: Any
    mismatches: list
    t_start: float

    def verify(self, spec: pipeline.PassSpec, current: ir.Model, all_points: bool = False) -> None:
        """After a pass: its result checked against the original (``--verify-each``; every point
        when bisecting a refusal)."""
        assert self.validator is not None
        check = self.faithful.check_model(current) if self.faithful is not None else \
            self.validator.check_model(current, all_points)
        if not check.ok:
            raise PassBroke(spec, check.summary())


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Optimize ``o.input_path`` into ``o.output_path``.  When the validated result diverges, the
    pass responsible is found (the pipeline rerun with every pass checked) and the result is written
    without it, with one warning line naming it (``rolled_back`` in the report); ``strict`` refuses
    instead (ValidationRefused with the report, exit 3), and so does a divergence no single pass
    explains.  Nothing is written when refused."""
    t_start = time.perf_counter()
    eps = runtime.parse_eps(o.ep)
    if len(eps) != 1:
        raise UsageError("optimize validates on one --ep; compare on several with 'onnxopt validate'")
    core.check_output(o.input_path, o.output_path, in_place=o.in_place)
    specs = pipeline.parse(o.pipeline_text or pipeline.DEFAULT_PIPELINE)
    if o.model_type is not None:
        specs = pipeline.with_option(specs, "fuse-transformer", "model-type", o.model_type, "--model-type")
        pipeline.build(specs)  # an unknown model type is a usage error before any work
    model = io.load(o.input_path)
    setting = _setting(o, eps[0], model, specs, t_start)
    try:
        return Result.from_report(_attempt(setting, specs, model, []))
    except ValidationRefused as refusal:
        if o.strict or o.force or o.verify_each or setting.validator is None or not o.validate_result:
            raise
        return Result.from_report(_roll_back(setting, specs, refusal))


def _setting(o: Options, ep: str, model: ir.Model, specs: list, t_start: float) -> _Setting:
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
    return _Setting(o, ep, before, validator, faithful, mismatches, t_start)


def _say_idle_passes(specs: list, done: pipeline.PipelineResult) -> None:
    """One warning per pass the user added to the default pipeline that changed nothing but declined
    something, with its reasons (e.g. fuse-transformer on a model whose weights exceed 2 GB): asked for,
    so its silence would read as success."""
    default = {s.name for s in pipeline.parse(pipeline.DEFAULT_PIPELINE)}
    totals = done.totals()
    for spec in specs:
        entry = totals.get(str(spec))
        if spec.name in default or entry is None or entry["changed"] or not entry["skipped"]:
            continue
        reasons = sorted(entry["skipped"].items(), key=lambda kv: -kv[1])[:3]
        logger.warning("pass '%s' changed nothing: %s", spec, "; ".join(f"{why} ({n})" for why, n in reasons))


def _attempt(st: _Setting, specs: list, model: ir.Model, rolled_back: list[dict]) -> dict:
    """Run ``specs`` on ``model``, then stage, check and commit; returns the report (raises
    ValidationRefused with it when the result diverges and not ``force``)."""
    o, validator = st.o, st.validator
    t0 = time.perf_counter()
    feeds = [p.feeds for p in validator.points if p.reference is not None] if validator else None
    done = pipeline.run(model, specs, after_pass=st.verify if o.verify_each else None, feeds=feeds)
    model = done.model
    if not rolled_back:
        _say_idle_passes(specs, done)
    report = core.header("optimize", input={"path": str(o.input_path), **st.before},
                         pipeline=",".join(str(s) for s in specs), iterations=done.iterations, converged=done.converged,
                         passes=done.totals(), records=[dataclasses.asdict(r) for r in done.records],
                         optimize_seconds=time.perf_counter() - t0, declared_output_shape_mismatches=st.mismatches)
    if rolled_back:
        report["rolled_back"] = rolled_back

    def check(path: Path) -> core.CheckResult:
        assert validator is not None
        return st.faithful(path) if st.faithful is not None else validator.check(path)

    def diagnose(path: Path, result: validation.ValidationResult) -> None:
        assert validator is not None
        report["validation"]["points"] = validator.exercised()
        report["seconds"] = time.perf_counter() - st.t_start
        # layerwise runs plain sessions, which hide fp16 overflow: not for the fp16-faithful check
        report["layerwise"] = first_divergence(o.input_path, path, result, st.ep) if st.faithful is None else None

    after_cost = flops.estimate(model, o.shapes).to_dict(per_node=False) if o.with_cost else None  # before anything is written
    core.stage_validate_commit(model, o.output_path, report,
                               check=check if validator is not None and o.validate_result else None,
                               force=o.force, external_data=o.external_data, on_refused=diagnose,
                               refused="optimized model not written", drop_weights=True)
    if after_cost is not None:
        report["output"]["cost"] = after_cost
    if report["validation"] is not None and validator is not None:
        report["validation"]["points"] = validator.exercised()
    report["seconds"] = time.perf_counter() - st.t_start
    return report


def _first_breaking(st: _Setting, specs: list) -> tuple[pipeline.PassSpec, str] | None:
    """The first pass whose result diverges (every point checked after each pass), or None."""
    feeds = [p.feeds for p in st.validator.points if p.reference is not None] if st.validator else None
    try:
        pipeline.run(io.load(st.o.input_path), specs, after_pass=lambda spec, m: st.verify(spec, m, True), feeds=feeds)
    except PassBroke as e:
        return e.spec, e.summary
    return None


def _narrow_to_rule(st: _Setting, specs: list, spec: pipeline.PassSpec) -> tuple[str, pipeline.PassSpec] | None:
    """For a pass made of named rules (``rule_names()`` and a ``skip`` option: simplify), the one rule
    whose applications break the outputs, by halving the rules left out; (rule, the pass without it)
    or None (no such pass, or no single rule explains it).  Cost: about log2(rules) + 1 pipeline runs
    with a check after every pass."""
    names = getattr(registry.get(spec.name), "rule_names", None)
    if names is None:
        return None

    earlier = [r for r in str(spec.options.get("skip", "")).split("+") if r]

    def without(rules: list[str]) -> pipeline.PassSpec:
        return pipeline.PassSpec(spec.name, {**spec.options, "skip": "+".join(earlier + rules)})

    def clean(rules: list[str]) -> bool:
        """This pass no longer breaks the outputs (another one may, later: its own bisection)."""
        trial = without(rules)
        found = _first_breaking(st, [trial if s is spec else s for s in specs])
        return found is None or found[0] is not trial

    suspects = [r for r in names() if r not in earlier]
    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        suspects = half if clean(half) else suspects[len(half):]
    if not suspects or not clean(suspects):
        return None
    return suspects[0], without(suspects)


def _roll_back(st: _Setting, specs: list, refusal: ValidationRefused) -> dict:
    """Never empty-handed: drop the pass that breaks the outputs (found by :func:`_first_breaking`)
    and write what the others make, validated; at most one attempt per pass of the pipeline.
    Cost: a pipeline run with a check after every pass, plus a run and a check, per pass dropped."""
    current, dropped = list(specs), []
    for _ in range(len(specs)):
        found = _first_breaking(st, current)
        if found is None:  # no single pass diverges on its own (an interaction): refuse as before
            raise refusal
        spec, why = found
        narrowed = _narrow_to_rule(st, current, spec)
        if narrowed is not None:  # the pass stays, without the one rule that broke the outputs
            rule, kept = narrowed
            dropped.append({"pass": str(spec), "rule": rule, "reason": why})
            logger.warning("pass '%s', rule '%s' changed the outputs (%s); writing the result without that rule "
                           "(--strict refuses instead)", spec, rule, why)
            current = [kept if s is spec else s for s in current]
        else:
            dropped.append({"pass": str(spec), "reason": why})
            logger.warning("pass '%s' changed the outputs (%s); writing the result without it (--strict refuses "
                           "instead)", spec, why)
            current = [s for s in current if s is not spec]
        try:
            return _attempt(st, current, io.load(st.o.input_path), dropped)
        except ValidationRefused:
            continue
    raise refusal


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

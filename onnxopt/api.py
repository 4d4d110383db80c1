"""The Python API behind the CLI, one function per command: optimize, quantize, validate, bench,
inspect.  Each returns the command's report (a JSON-able dict starting with :func:`header`), raises
an :class:`~onnxopt.errors.OnnxoptError` for expected failures (``ValidationRefused`` carries the
report), and reports progress only through a ``progress(n)`` callback (the CLI draws the bars).

Commands that write a model share :func:`stage_validate_commit`: the model is written beside the
destination, checked there against the original on ORT, and renamed into place only when it
passes (or with ``force``).  A refused result is never moved into place.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from onnxopt import __version__, io, pipeline, runtime
from onnxopt import flops as cost
from onnxopt import validation as validate
from onnxopt.base import STANDARD_DOMAINS, count_initializers, count_nodes, op_histogram
from onnxopt.errors import UsageError, ValidationRefused

logger = logging.getLogger(__name__)


ProgressFn = Callable[[int], None]


class CheckResult(Protocol):
    """What a command's check of its staged result returns (validate.ValidationResult for lossless
    commands, quantize's budget result for lossy ones)."""

    @property
    def ok(self) -> bool: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict: ...


def header(command: str, **fields) -> dict:
    """The first keys of every report."""
    return {"tool": "onnxopt", "version": __version__, "command": command, **fields}


def stage_validate_commit(model: ir.Model, output_path: str | os.PathLike, report: dict, *,
                          check: Callable[[Path], Any] | None,
                          force: bool = False, external_data: bool | None = None,
                          on_refused: Callable[[Path, Any], None] | None = None,
                          refused: str = "result not written") -> dict:
    """Write ``model`` beside ``output_path``, run ``check`` on the staged file (None: not
    validated), and rename it into place when it passes or ``force``; fill ``report["output"]``,
    ``report["validation"]`` and ``report["written"]``.  Refused: ``on_refused(staged path,
    result)`` may add diagnostics to the report, then ValidationRefused(report) is raised and
    nothing is written.  Returns ``report``."""
    with io.StagedModel(model, output_path, external_data) as staged:
        report["output"] = {"path": str(output_path), **model_stats(model), "file_bytes": staged.size_bytes()}
        report["validation"] = None
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


def model_stats(model: ir.Model, path: str | os.PathLike | None = None) -> dict:
    stats = {
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


def optimize(input_path: str | os.PathLike, output_path: str | os.PathLike, *,
             pipeline_text: str | None = None, data: str | os.PathLike | None = None,
             preprocess: str | None = None, ep: str = "cpu",
             shapes: Mapping[str, tuple[int, ...]] | None = None, validate_result: bool = True,
             force: bool = False, verify_each: bool = False, in_place: bool = False,
             external_data: bool | None = None, latency_runs: int = 10, with_cost: bool = False,
             model_type: str | None = None) -> dict:
    """Optimize ``input_path`` into ``output_path``; return the report dict.  ``model_type``
    overrides fuse-transformer's model type (bert, gpt2, vit, ...; default: detected).

    Raises ValidationRefused (with ``.result`` = the report) when outputs diverge and not ``force``;
    nothing is written then.  The input file is never modified (unless ``in_place``, and then
    only by the final atomic rename).  The steps (load, validator, pipeline, report, stage-check-
    commit) read in order here; each is a call into its own module."""
    t_start = time.perf_counter()
    if io.same_file(input_path, output_path) and not in_place:
        raise UsageError(f"output {output_path} is the input file; pass --in-place to overwrite it")
    io.check_writable(Path(output_path))
    specs = pipeline.parse(pipeline_text or pipeline.DEFAULT_PIPELINE)
    if model_type is not None:
        specs = pipeline.with_option(specs, "fuse-transformer", "model-type", model_type, "--model-type")
        pipeline.build(specs)  # an unknown model type is a usage error before any work

    model = io.load(input_path)
    before = model_stats(model, input_path)
    if with_cost:
        before["cost"] = cost.estimate(model, shapes).to_dict(per_node=False)
    tolerance = validate.default_tolerance(model)
    fp16 = any(s.name == "convert-fp16" for s in specs)
    if fp16:  # lossy: the fp16 tolerances (onnxopt convert checks ranges too)
        tolerance = validate.LOSSLESS_FP16
    validator = None
    if validate_result or verify_each:
        validator = validate.Validator(input_path, data=data, preprocess=preprocess, shapes=shapes,
                                       tolerance=tolerance, ep=ep, latency_runs=latency_runs if validate_result else 0)
    faithful = _fp16_check(validator) if fp16 and validator is not None and validator.ep == "cpu" else None

    mismatches = validate.declared_shape_mismatches(model, validator.reference) if validator else []
    for m in mismatches:
        logger.warning("output '%s' is declared %s but the model produces %s (kept as declared)",
                       m["output"], m["declared"], m["actual"])

    def verify(spec: pipeline.PassSpec, current: ir.Model) -> None:
        check = faithful.check_model(current) if faithful is not None else validator.check_model(current)
        if not check.ok:
            raise ValidationRefused(f"pass '{spec}' changed the outputs: {check.summary()}")

    t0 = time.perf_counter()
    feeds = [p.feeds for p in validator.points if p.reference is not None] if validator else None
    run = pipeline.run(model, specs, after_pass=verify if verify_each else None, feeds=feeds)
    model = run.model
    optimize_seconds = time.perf_counter() - t0

    report = header("optimize", input={"path": str(input_path), **before},
                    pipeline=",".join(str(s) for s in specs), iterations=run.iterations, converged=run.converged,
                    passes=run.totals(), records=[r.__dict__ for r in run.records],
                    optimize_seconds=optimize_seconds, declared_output_shape_mismatches=mismatches)

    def check(path: Path) -> CheckResult:
        return faithful(path) if faithful is not None else validator.check(path)

    def diagnose(path: Path, result: validate.ValidationResult) -> None:
        report["validation"]["points"] = validator.exercised()
        report["seconds"] = time.perf_counter() - t_start
        # layerwise runs plain sessions, which hide fp16 overflow: not for the fp16-faithful check
        report["layerwise"] = _first_divergence(input_path, path, result, ep) if faithful is None else None

    after_cost = cost.estimate(model, shapes).to_dict(per_node=False) if with_cost else None  # before anything is written
    stage_validate_commit(model, output_path, report, check=check if validator is not None and validate_result else None,
                          force=force, external_data=external_data, on_refused=diagnose,
                          refused="optimized model not written")
    if after_cost is not None:
        report["output"]["cost"] = after_cost
    if report["validation"] is not None:
        report["validation"]["points"] = validator.exercised()
    report["seconds"] = time.perf_counter() - t_start
    return report


def _fp16_check(validator: validate.Validator):
    """The fp16-faithful check of ``onnxopt convert`` (the plain CPU EP computes fp16 chains in
    float32 and would hide an overflow)."""
    from onnxopt.precision import convert as convert_mod

    return convert_mod.Fp16Check(validator)


def quantize(input_path: str | os.PathLike, output_path: str | os.PathLike, *, data: str | os.PathLike | None = None,
             recipe=None, mode: str | None = None, weights: str | None = None, block_size: int | None = None,
             rounding: str | None = None, embeddings: str | None = None, head_bits: int | None = None,
             method: str | None = None, percentile: float | None = None, ep: str | None = None,
             per_channel: bool | None = None, recovery: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None, latency_guard: bool | None = None,
             preprocess: str | None = None, max_drop: float = 0.01, metric: str | None = None,
             stats_in: str | os.PathLike | None = None, stats_out: str | os.PathLike | None = None,
             recipe_out: str | os.PathLike | None = None, calib_limit: int | None = None, threads: int = 1,
             force: bool = False, class_outputs: Mapping[str, int | None] | None = None,
             progress: ProgressFn | None = None, search: bool = False, budget: int | None = None,
             workers: int = 1, ray_address: str | None = None, cost_model: bool = True) -> dict:
    """``onnxopt quantize``: int8 QDQ (``mode`` static, the default, needs ``data``), dynamic int8
    (``mode="dynamic"``) or int4 weight-only (``weights="int4"``, ``block_size``, ``rounding``,
    ``head_bits``; mode ``weight-only``) quantization, embeddings int8 (default), int4 or none (see
    onnxopt.quantization.static, onnxopt.quantization.modes), staged, scored
    and committed through :func:`stage_validate_commit`; the report starts with :func:`header`.

    The recipe settings (``method`` ... ``latency_guard``; None = the default) decide a new
    placement; ``recipe`` (an ``onnxopt.quantization.static.Recipe`` or a JSON file from ``recipe_out`` or a
    JSON quantize report) is replayed instead and excludes them.  ``progress(1)`` per calibration
    batch.  ``search``: evaluate up to ``budget`` candidate recipes (onnxopt.quantization.search; the settings
    are searched, only ``ep``, ``exclude`` and ``latency_guard`` apply) and write the best within
    ``max_drop``; the report gets ``"search"`` and the recipe is saved (``recipe_out``, else
    OUTPUT + ".recipe.json").  The candidates are built and scored on ``workers`` local processes,
    or as Ray tasks with ``ray_address`` ("local" starts a local cluster of ``workers`` CPUs).
    ``cost_model``: the latency guard decides clear cases from region timings cached per machine
    (onnxopt.quantization.latency_cache); False measures every decision in the whole model.
    Raises ValidationRefused(report) when the accuracy budget is missed
    and not ``force``."""
    from onnxopt.quantization import static as quantize_mod

    if weights == "int4" and mode is None:
        mode = "weight-only"
    settings = {k: v for k, v in {"method": method, "percentile": percentile, "ep": ep, "per_channel": per_channel,
                                  "recovery": recovery, "exclude": exclude, "latency_guard": latency_guard, "mode": mode,
                                  "weights": weights, "block_size": block_size, "rounding": rounding,
                                  "embeddings": embeddings, "head_bits": head_bits}.items()
                if v is not None}
    return quantize_mod.quantize(input_path, output_path, data=data, recipe=recipe, preprocess=preprocess,
                                 max_drop=max_drop, metric=metric, stats_in=stats_in, stats_out=stats_out,
                                 recipe_out=recipe_out, calib_limit=calib_limit, threads=threads, force=force,
                                 class_outputs=class_outputs, progress=progress, search=search,
                                 search_budget=quantize_mod.DEFAULT_SEARCH_BUDGET if budget is None else budget,
                                 search_workers=workers, search_ray=ray_address, cost_model=cost_model,
                                 **settings)


def _first_divergence(original, candidate, result: validate.ValidationResult, ep: str) -> dict | None:
    """Layerwise comparison at the input point where an output diverged: the first node whose
    output differs names the pass's mistake.  None when the candidate cannot run at all."""
    from onnxopt import layerwise

    point = result.failing_point
    if point is None or not point.feeds:
        return None
    try:
        return layerwise.compare_layers(original, candidate, point.feeds, result.tolerance
                                        if isinstance(result.tolerance, validate.Tolerance) else validate.LOSSLESS,
                                        ep).to_dict()
    except Exception as e:  # noqa: BLE001 - a diagnosis must never turn a refusal (exit 3) into a crash
        logger.info("layerwise comparison unavailable: %s", e)
        logger.debug("layerwise comparison failed", exc_info=True)
        return None


def validate_models(a: str | os.PathLike, b: str | os.PathLike, *, eps: Sequence[str] = ("cpu",),
                    data: str | os.PathLike | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                    preprocess: str | None = None,
                    tolerance: validate.Tolerance | Mapping[str, validate.Tolerance] = validate.LOSSLESS,
                    max_batches: int = 16, layerwise: bool = False, progress: ProgressFn | None = None) -> dict:
    """``onnxopt validate A B``: A (reference) and B on every EP with the same inputs, every output
    compared (worst case over the batches); with ``layerwise`` also the intermediate tensors at the
    first batch, naming the first diverging node.  Raises ValidationRefused(report) when B diverges."""
    from onnxopt import data as data_mod
    from onnxopt import layerwise as layerwise_mod

    for path in (a, b):
        check_model_file(path)
    base = tolerance if isinstance(tolerance, validate.Tolerance) else tolerance.get("*", validate.LOSSLESS)
    comparison = validate.compare_models(a, b, eps=tuple(eps), data=data, shapes=shapes, preprocess=preprocess,
                                         tolerance=tolerance, max_batches=max_batches, progress=progress)
    report = header("validate", a=str(a), b=str(b), tolerance=base.describe(), comparison=comparison.to_dict(),
                    error_samples=comparison.error_samples)
    if layerwise:
        sess = runtime.session(a, eps[0])
        feeds = data_mod.feeds_for(sess, data, shapes, preprocess, limit=1)[0]
        report["layerwise"] = layerwise_mod.compare_layers(a, b, feeds, base, eps[0], progress=progress).to_dict()
    if not comparison.ok:
        raise ValidationRefused("outputs of B diverge from A beyond the tolerance", report)
    return report


def bench(models: Sequence[str | os.PathLike], *, eps: Sequence[str] = ("cpu",), threads: int | None = 1,
          warmup: int = 10, runs: int = 100, batches: Sequence[int | None] = (None,),
          data: str | os.PathLike | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
          preprocess: str | None = None, progress: ProgressFn | None = None) -> dict:
    """``onnxopt bench``: latency per model and EP side by side (see onnxopt.benchmark); the report's
    ``results`` are BenchResult dicts, ``summary`` the text table the CLI prints."""
    from onnxopt import benchmark as bench_mod

    for path in models:
        check_model_file(path)
    results = bench_mod.bench(models, eps=tuple(eps), threads=threads, warmup=warmup, runs=runs,
                              batches=list(batches), data=data, shapes=shapes, preprocess=preprocess, progress=progress)
    return header("bench", threads=threads or 0, warmup=warmup, runs=runs, results=[r.to_dict() for r in results],
                  summary=bench_mod.summary(results))


def check_model_file(path: str | os.PathLike) -> None:
    """The same one-line errors as optimize for a model another command will hand to ORT."""
    io.load(path)


def inspect(path: str | os.PathLike, cost_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """Structure of a model without reading its external weights; with ``cost_shapes`` (a dict,
    possibly empty) also its compute cost (see onnxopt.flops)."""
    model = io.load(path)
    params_by_dtype: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"params": 0, "bytes": 0})
    for g in model.graphs():
        for v in g.initializers.values():
            if v.const_value is None:
                continue
            entry = params_by_dtype[v.const_value.dtype.name]
            entry["params"] += v.const_value.size
            entry["bytes"] += v.const_value.nbytes
    subgraphs = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs.append({"node": node.name, "op": node.op_type, "attribute": attr.name,
                                  "nodes": len(attr.as_graph())})
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, g in enumerate(attr.as_graphs()):
                    subgraphs.append({"node": node.name, "op": node.op_type, "attribute": f"{attr.name}[{i}]",
                                      "nodes": len(g)})
    custom = sorted({n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)} - STANDARD_DOMAINS)
    external: dict[str, int] = collections.Counter()
    for _, t in io.external_tensors(model):
        external[str(t.location)] += t.nbytes
    return {
        "path": str(path),
        "ir_version": model.ir_version,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "opsets": {d or "ai.onnx": v for d, v in sorted(model.opset_imports.items())},
        "inputs": [_value_info(v) for v in model.graph.inputs],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "nodes": count_nodes(model),
        "ops": dict(op_histogram(model).most_common()),
        "parameters": sum(e["params"] for e in params_by_dtype.values()),
        "parameter_bytes": sum(e["bytes"] for e in params_by_dtype.values()),
        "parameters_by_dtype": dict(params_by_dtype),
        "subgraphs": subgraphs,
        "custom_domains": custom,
        "external_data": dict(external),
        "metadata": dict(model.metadata_props),
        **({"cost": cost.estimate(model, cost_shapes).to_dict()} if cost_shapes is not None else {}),
    }


def _value_info(v: ir.Value) -> dict:
    dims = None if v.shape is None else [d if isinstance(d, int) else (d.value or "?") for d in v.shape]
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims}


def batch(inputs: Sequence[str | os.PathLike], outdir: str | os.PathLike, *, command: str = "optimize",
          options: Mapping[str, Any] | None = None, workers: int = 2, timeout: float | None = None,
          max_rss_mb: float | None = None, force: bool = False, ray_address: str | None = None,
          progress: ProgressFn | None = None) -> dict:
    """``onnxopt batch``: ``command`` (optimize, quantize, validate, bench) over every model of
    ``inputs`` (files, folders of ``*.onnx``, JSON/YAML manifests with per-model options), each in
    its own process, ``workers`` at a time (or as Ray tasks with ``ray_address``: an address, or
    "local" for a local cluster of ``workers`` CPUs).  ``options`` are the command's options by
    parameter name (``pipeline``, ``data``, ``shape`` (a list), ``ep``, ``validate``, ``method``,
    ``max_drop``...); a manifest entry's options override them.  A model past ``timeout`` seconds
    or over ``max_rss_mb`` is killed and marked failed; the batch goes on.  Results go to
    ``outdir/<name>/`` and ``outdir/summary.json``/``summary.html`` (written after each model);
    a rerun skips models whose input bytes, options and onnxopt version match a finished result
    unless ``force``.  ``progress(1)`` per model.  Returns the summary dict (see onnxopt.commands.batch)."""
    from onnxopt.commands import batch as batch_mod

    return batch_mod.run(inputs, outdir, command=command, options=options, workers=workers, timeout=timeout,
                         max_rss_mb=max_rss_mb, force=force, ray_address=ray_address, progress=progress)


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, *, fp16: bool = True, ep: str = "cpu",
            keep_io_types: bool = True, op_block_list: str | Sequence[str] | None = None,
            node_block_list: str | Sequence[str] | None = None, data: str | os.PathLike | None = None,
            preprocess: str | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
            calib_limit: int | None = None, limit: float | None = None, validate_result: bool = True,
            force: bool = False, progress: ProgressFn | None = None) -> dict:
    """``onnxopt convert --fp16``: mixed-precision float16 (see onnxopt.precision.convert); the report starts
    with :func:`header` and the result goes through :func:`stage_validate_commit`.  Raises
    ValidationRefused(report) when outputs leave the fp16 tolerances and not ``force``."""
    from onnxopt.precision import convert as convert_mod
    from onnxopt.precision import fp16 as convert_fp16

    if not fp16:
        raise UsageError("convert: choose a target precision (--fp16)")
    if ep.lower() != "cpu":
        raise UsageError("convert validates on the CPU EP (--ep cpu); compare on others with 'onnxopt validate'")
    return convert_mod.convert(input_path, output_path, keep_io_types=keep_io_types, op_block_list=op_block_list,
                               node_block_list=node_block_list, data=data, preprocess=preprocess, shapes=shapes,
                               calib_limit=calib_limit, limit=convert_fp16.DEFAULT_LIMIT if limit is None else limit,
                               validate_result=validate_result, force=force, progress=progress)
def prune(input_path: str | os.PathLike, output_path: str | os.PathLike, *, sparsity: float | None = None,
          threshold: float | None = None, scope: str = "global", channels: float | None = None,
          criterion: str = "l1", exclude: Sequence[str] = (), latency_guard: bool = True,
          data: str | os.PathLike | None = None, preprocess: str | None = None, max_drop: float = 0.01,
          metric: str | None = None, ep: str = "cpu", refit: bool = True, force: bool = False,
          calib_limit: int | None = None, threads: int = 1, progress: ProgressFn | None = None) -> dict:
    """``onnxopt prune``: magnitude pruning (``sparsity`` or ``threshold``) or structured channel
    pruning (``channels``, needs ``data``), scored against the original and committed through
    :func:`stage_validate_commit` (see onnxopt.compression.engine).  Raises ValidationRefused(report) over
    ``max_drop`` unless ``force``."""
    from onnxopt.compression import engine as c

    opts = c.Options(data=data, preprocess=preprocess, max_drop=max_drop, metric=metric, ep=ep, threads=threads,
                     force=force, refit=refit, calib_limit=calib_limit, progress=progress)
    runtime.provider(ep)
    if channels is not None:
        if sparsity is not None or threshold is not None:
            raise UsageError("--channels (structured) and --sparsity/--threshold (magnitude) are separate runs")
        return c.run_guarded(c.prune_channels, input_path, output_path, fraction=channels, criterion=criterion,
                             latency_guard=latency_guard, exclude=exclude, opts=opts)
    if sparsity is not None and threshold is not None:
        raise UsageError("give --sparsity or --threshold, not both")
    return c.run_guarded(c.prune_magnitude, input_path, output_path, sparsity=sparsity, threshold=threshold,
                         scope=scope, exclude=exclude, opts=opts)


def compress(input_path: str | os.PathLike, output_path: str | os.PathLike, *, clusters: int,
             sparsity: float | None = None, scope: str = "global", exclude: Sequence[str] = (),
             data: str | os.PathLike | None = None, preprocess: str | None = None, max_drop: float = 0.01,
             metric: str | None = None, ep: str = "cpu", refit: bool = True, force: bool = False,
             calib_limit: int | None = None, threads: int = 1, progress: ProgressFn | None = None) -> dict:
    """``onnxopt compress``: optional magnitude pruning, k-means weight sharing to ``clusters``
    values, and the Deep Compression size report (``report["deep_compression"]``); validated like
    :func:`prune` (see onnxopt.compression.engine)."""
    from onnxopt.compression import engine as c

    opts = c.Options(data=data, preprocess=preprocess, max_drop=max_drop, metric=metric, ep=ep, threads=threads,
                     force=force, refit=refit, calib_limit=calib_limit, progress=progress)
    runtime.provider(ep)
    return c.run_guarded(c.compress, input_path, output_path, clusters=clusters, sparsity=sparsity, scope=scope,
                         exclude=exclude, opts=opts)

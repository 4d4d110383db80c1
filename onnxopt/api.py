"""The Python API behind the CLI: optimize a file, inspect a file.

``optimize`` is load -> pipeline -> stage (write beside the destination) -> validate the staged
file against the original on ORT -> commit (rename).  A refused result is never moved into place.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from onnxopt import __version__, cost, io, pipeline, validate
from onnxopt.base import STANDARD_DOMAINS, count_initializers, count_nodes, op_histogram
from onnxopt.errors import UsageError, ValidationRefused

logger = logging.getLogger(__name__)


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
             external_data: bool | None = None, latency_runs: int = 10, with_cost: bool = False) -> dict:
    """Optimize ``input_path`` into ``output_path``; return the report dict.

    Raises ValidationRefused (with ``.result`` = the report) when outputs diverge and not ``force``;
    nothing is written then.  The input file is never modified (unless ``in_place``, and then
    only by the final atomic rename)."""
    t_start = time.perf_counter()
    if io.same_file(input_path, output_path) and not in_place:
        raise UsageError(f"output {output_path} is the input file; pass --in-place to overwrite it")
    io.check_writable(Path(output_path))
    specs = pipeline.parse(pipeline_text or pipeline.DEFAULT_PIPELINE)

    model = io.load(input_path)
    before = model_stats(model, input_path)
    if with_cost:
        before["cost"] = cost.estimate(model, shapes).to_dict(per_node=False)
    tolerance = validate.default_tolerance(model)
    validator = None
    if validate_result or verify_each:
        validator = validate.Validator(input_path, data=data, preprocess=preprocess, shapes=shapes,
                                       tolerance=tolerance, ep=ep, latency_runs=latency_runs if validate_result else 0)

    mismatches = validate.declared_shape_mismatches(model, validator.reference) if validator else []
    for m in mismatches:
        logger.warning("output '%s' is declared %s but the model produces %s (kept as declared)",
                       m["output"], m["declared"], m["actual"])

    def verify(spec: pipeline.PassSpec, current: ir.Model) -> None:
        check = validator.check_model(current)
        if not check.ok:
            raise ValidationRefused(f"pass '{spec}' changed the outputs: {check.summary()}")

    t0 = time.perf_counter()
    run = pipeline.run(model, specs, after_pass=verify if verify_each else None)
    model = run.model
    optimize_seconds = time.perf_counter() - t0

    report: dict = {
        "tool": "onnxopt", "version": __version__, "command": "optimize",
        "input": {"path": str(input_path), **before},
        "pipeline": ",".join(str(s) for s in specs),
        "iterations": run.iterations, "converged": run.converged,
        "passes": run.totals(),
        "records": [r.__dict__ for r in run.records],
        "optimize_seconds": optimize_seconds,
        "declared_output_shape_mismatches": mismatches,
    }
    after = model_stats(model)
    if with_cost:
        after["cost"] = cost.estimate(model, shapes).to_dict(per_node=False)
    with io.StagedModel(model, output_path, external_data) as staged:
        after["file_bytes"] = staged.size_bytes()
        report["output"] = {"path": str(output_path), **after}
        if validator is not None and validate_result:
            check = validator.check(staged.path)
            report["validation"] = {**check.to_dict(), "points": validator.exercised()}
            if not check.ok and not force:
                report["written"] = False
                report["seconds"] = time.perf_counter() - t_start
                raise ValidationRefused(f"optimized model not written: {check.summary()}", report)
            if not check.ok:
                logger.warning("outputs diverge but --force was given: %s", check.summary())
        else:
            report["validation"] = None
        staged.commit()
    report["written"] = True
    report["seconds"] = time.perf_counter() - t_start
    return report


def check_model_file(path: str | os.PathLike) -> None:
    """The same one-line errors as optimize for a model another command will hand to ORT."""
    io.load(path)


def inspect(path: str | os.PathLike, cost_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """Structure of a model without reading its external weights; with ``cost_shapes`` (a dict,
    possibly empty) also its compute cost (see onnxopt.cost)."""
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

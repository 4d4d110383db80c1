"""``onnxopt inspect``: a model's structure without reading its external weights (opsets,
inputs/outputs, ops, parameters, subgraphs, external data); with ``--cost`` also its compute cost
(see onnxopt.flops)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping

import click
import onnx_ir as ir

from onnxopt import flops, io, runtime
from onnxopt.base import STANDARD_DOMAINS, count_nodes, op_histogram
from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag


@dataclasses.dataclass
class Options:
    path: str | os.PathLike
    #: the Python API's form of --cost --shape: input shapes for the cost (a dict, possibly empty); None: no cost
    cost_shapes: Mapping[str, tuple[int, ...]] | None = None
    as_json: bool = flag(False, "--json", is_flag=True, help="Print JSON instead of text.")
    with_cost: bool = flag(False, "--cost", is_flag=True, help="Count MACs/FLOPs per op type and peak activation memory.")
    shapes: Mapping[str, tuple[int, ...]] | None = flag(None, "--shape", multiple=True, parse=runtime.parse_shapes,
                                                        help="Input shape NAME:1x3x224x224 for --cost (symbolic dims else 1).")


@dataclasses.dataclass
class Result(core.Result):
    command = "inspect"

    path: str
    ir_version: int
    producer: str
    opsets: dict
    inputs: list
    outputs: list
    nodes: int
    ops: dict
    parameters: int
    parameter_bytes: int
    parameters_by_dtype: dict
    subgraphs: list
    custom_domains: list
    external_data: dict
    metadata: dict
    cost: dict | None = None
    #: print JSON (a rendering choice, not a report key)
    as_json: bool = dataclasses.field(default=False, kw_only=True, metadata={"internal": True})


def _parameters(model: ir.Model) -> dict[str, dict[str, int]]:
    by_dtype: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"params": 0, "bytes": 0})
    for g in model.graphs():
        for v in g.initializers.values():
            if v.const_value is None:
                continue
            entry = by_dtype[v.const_value.dtype.name]
            entry["params"] += v.const_value.size
            entry["bytes"] += v.const_value.nbytes
    return dict(by_dtype)


def _subgraphs(model: ir.Model) -> list[dict]:
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found.append({"node": node.name, "op": node.op_type, "attribute": attr.name, "nodes": len(attr.as_graph())})
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, g in enumerate(attr.as_graphs()):
                    found.append({"node": node.name, "op": node.op_type, "attribute": f"{attr.name}[{i}]", "nodes": len(g)})
    return found


def _value_info(v: ir.Value) -> dict:
    dims = None if v.shape is None else [d if isinstance(d, int) else (d.value or "?") for d in v.shape]
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims}


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    model = io.load(o.path)
    params = _parameters(model)
    external: dict[str, int] = collections.Counter()
    for _, t in io.external_tensors(model):
        external[str(t.location)] += t.nbytes
    with_cost, shapes = (True, o.cost_shapes) if o.cost_shapes is not None else (o.with_cost, o.shapes or {})
    cost = flops.estimate(model, shapes).to_dict() if with_cost else None
    return Result(
        path=str(o.path), ir_version=model.ir_version,
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        opsets={d or "ai.onnx": v for d, v in sorted(model.opset_imports.items())},
        inputs=[_value_info(v) for v in model.graph.inputs], outputs=[_value_info(v) for v in model.graph.outputs],
        nodes=count_nodes(model), ops=dict(op_histogram(model).most_common()),
        parameters=sum(e["params"] for e in params.values()), parameter_bytes=sum(e["bytes"] for e in params.values()),
        parameters_by_dtype=params, subgraphs=_subgraphs(model),
        custom_domains=sorted({n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)} - STANDARD_DOMAINS),
        external_data=dict(external), metadata=dict(model.metadata_props), cost=cost, as_json=o.as_json)


def render(result: core.Result) -> None:
    info = result.to_dict()
    if isinstance(result, Result) and result.as_json:
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
    click.echo(f"parameters: {info['parameters']:,} ({common.mb(info['parameter_bytes'])})")
    for dtype, e in info["parameters_by_dtype"].items():
        click.echo(f"  {dtype}: {e['params']:,} ({common.mb(e['bytes'])})")
    _render_parts(info)


def _render_parts(info: dict) -> None:
    if info["subgraphs"]:
        click.echo("subgraphs:")
        for s in info["subgraphs"]:
            click.echo(f"  {s['op']} '{s['node']}'.{s['attribute']}: {s['nodes']} nodes")
    if info["custom_domains"]:
        click.echo("custom domains: " + ", ".join(info["custom_domains"]))
    if info["external_data"]:
        click.echo("external data:")
        for f, n in info["external_data"].items():
            click.echo(f"  {f}: {common.mb(n)}")
    cost = info.get("cost")
    if cost:
        unknown = f", {len(cost['unknown_nodes'])} nodes with unknown shapes" if cost["unknown_nodes"] else ""
        click.echo(f"cost: {cost['macs']:,} MACs, {cost['flops']:,} FLOPs, peak activations "
                   f"{common.mb(cost['peak_activation_bytes'])}" + unknown)
        for op, e in cost["by_op"].items():
            if e["flops"]:
                click.echo(f"  {op}: {e['count']} nodes, {e['macs']:,} MACs, {e['flops']:,} FLOPs")


COMMAND = Command(
    name="inspect", short_help="Show a model's structure (and cost with --cost).",
    help="Show a model's structure: opsets, inputs/outputs, ops, parameters, subgraphs, external data.",
    arguments=(("path", {"metavar": "MODEL"}),),
    options=Options, run=run, render=render, result=Result, output=None, label=lambda kw: str(kw["path"]))

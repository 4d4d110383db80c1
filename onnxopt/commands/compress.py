"""``onnxopt compress``: optional magnitude pruning, k-means weight sharing to ``--cluster`` values
per layer, and the Deep Compression size report; scored like prune (see onnxopt.compression.engine)."""

from __future__ import annotations

import dataclasses
import os

import click

from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag, group
from onnxopt.compression import engine


@dataclasses.dataclass
class Options:
    input_path: str | os.PathLike
    output_path: str | os.PathLike
    clusters: int = flag(None, "--cluster", type=int, required=True,
                         help="Shared values per layer: a power of 2 up to 256.")
    sparsity: float | None = flag(None, "--sparsity", type=float, help="Magnitude-prune this fraction first, in [0, 1).")
    scope: str = common.scope()
    scoring: common.Scoring = group(common.Scoring)


@dataclasses.dataclass
class Result(core.Result):
    command = "compress"

    input: dict
    notes: list
    clusters: int
    sparsity: float | None
    scope: str
    refit: bool
    ep: str
    layers: list
    pruning: list
    deep_compression: list
    packed_weights: list
    output: dict
    validation: dict | None
    written: bool
    accuracy: dict
    sizes: dict
    seconds: float
    asked_sparsity: float | None = None
    reached_sparsity: float | None = None
    max_layer_sparsity: float | None = None
    sparsity_search: dict | None = None
    #: the cluster count asked and reached within the budget ({asked, reached, trials, message})
    cluster_search: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Raises ValidationRefused(report) over ``max_drop`` unless ``force``."""
    settings = o.scoring.settings(progress)
    report = core.guarded("compress", lambda: engine.compress(
        o.input_path, o.output_path, clusters=o.clusters, sparsity=o.sparsity, scope=o.scope,
        exclude=o.scoring.exclude, opts=settings))
    return Result.from_report(report)


def render(result: core.Result) -> None:
    r = result.to_dict()
    for s in r["deep_compression"]:
        click.echo(f"{s['stage']:<28} {s['bytes']:>10} bytes  {s['compression_ratio']:6.2f}x")
    common.echo_searches(r)
    common.echo_accuracy(r["accuracy"], "compressed")
    click.echo(f"wrote {r['output']['path']}")


COMMAND = Command(
    name="compress", short_help="Weight sharing (k-means) after optional pruning, with a Deep Compression report.",
    help="Compress MODEL into OUTPUT: prune (optional), cluster each layer's weights, report Deep Compression sizes.",
    arguments=(("input_path", {"metavar": "MODEL"}),
               ("output_path", {"decls": ("-o", "--output"), "help": "Where to write the compressed model."})),
    options=Options, run=run, render=render, result=Result, progress="reading data")

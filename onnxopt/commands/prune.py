"""``onnxopt prune``: magnitude pruning (``--sparsity`` / ``--threshold``) or structured channel
pruning (``--channels``, needs --data), scored against the original within ``--max-drop`` and
committed through the staged write (see onnxopt.compression.engine)."""

from __future__ import annotations

import dataclasses
import os

import click

from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag, group
from onnxopt.compression import engine
from onnxopt.errors import UsageError


@dataclasses.dataclass
class Options:
    input_path: str | os.PathLike
    output_path: str | os.PathLike
    sparsity: float | None = flag(None, "--sparsity", type=float,
                                  help="Magnitude pruning: fraction of weights zeroed, in [0, 1).")
    scope: str = common.scope()
    threshold: float | None = flag(None, "--threshold", type=float, help="Magnitude pruning: zero every weight with |w| < T.")
    channels: float | None = flag(None, "--channels", type=float,
                                  help="Structured pruning: fraction of the channels of each group to remove physically "
                                       "(needs --data).")
    criterion: str = flag("l1", "--criterion", type=click.Choice(list(engine.CRITERIA)),
                          help="--channels importance: mean |activation| x outgoing weight norm, or the filters' L1/L2 norm.")
    latency_guard: bool = flag(True, "--latency-guard/--no-latency-guard",
                               help="--channels: keep a group's removal only when it makes the model faster on --ep.")
    scoring: common.Scoring = group(common.Scoring)


@dataclasses.dataclass
class Result(core.Result):
    command = "prune"

    input: dict
    mode: str
    notes: list
    refit: bool
    ep: str
    output: dict
    validation: dict | None
    written: bool
    accuracy: dict
    seconds: float
    sparsity: float | None = None
    threshold: float | None = None
    scope: str | None = None
    layers: list | None = None
    total_sparsity: float | None = None
    sizes: dict | None = None
    channels: float | None = None
    criterion: str | None = None
    latency_guard: bool | None = None
    groups: list | None = None
    unresolved: list | None = None
    removed_channels: int | None = None
    conv_channels: dict | None = None
    latency: dict | None = None
    asked_sparsity: float | None = None
    reached_sparsity: float | None = None
    max_layer_sparsity: float | None = None
    sparsity_search: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Raises ValidationRefused(report) over ``max_drop`` unless ``force``."""
    if o.sparsity is None and o.threshold is None and o.channels is None:
        raise UsageError("give --sparsity, --threshold or --channels")
    settings = o.scoring.settings(progress)
    exclude = o.scoring.exclude
    if o.channels is not None:
        if o.sparsity is not None or o.threshold is not None:
            raise UsageError("--channels (structured) and --sparsity/--threshold (magnitude) are separate runs")
        fraction = o.channels
        report = core.guarded("prune channels", lambda: engine.prune_channels(
            o.input_path, o.output_path, fraction=fraction, criterion=o.criterion, latency_guard=o.latency_guard,
            exclude=exclude, opts=settings))
    else:
        if o.sparsity is not None and o.threshold is not None:
            raise UsageError("give --sparsity or --threshold, not both")
        report = core.guarded("prune magnitude", lambda: engine.prune_magnitude(
            o.input_path, o.output_path, sparsity=o.sparsity, threshold=o.threshold, scope=o.scope, exclude=exclude,
            opts=settings))
    return Result.from_report(report)


def render(result: core.Result) -> None:
    r = result.to_dict()
    if r["mode"] == "magnitude":
        s = r["sizes"]
        click.echo(f"{r['input']['path']}: sparsity {r['total_sparsity']:.1%} over "
                   f"{sum(x['pruned'] for x in r['layers'])} layers; gzip {common.mb(s['original']['gzip'])} -> "
                   f"{common.mb(s['pruned']['gzip'])}, CSR weights {common.mb(s['pruned']['weights_csr_npz'])}")
        common.echo_searches(r)
    else:
        kept = [g for g in r["groups"] if g.get("accepted")]
        click.echo(f"{r['input']['path']}: {r['removed_channels']} channels removed in {len(kept)} of {len(r['groups'])} "
                   f"groups ({len(r['unresolved'])} unresolved)")
        lat = r.get("latency")
        if lat:
            click.echo(f"latency on {r['ep']} ({lat['threads']} thread): {lat['float_ms']:.3f} -> "
                       f"{lat['pruned_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    common.echo_accuracy(r["accuracy"], "pruned")
    click.echo(f"wrote {r['output']['path']}")


COMMAND = Command(
    name="prune", short_help="Magnitude or structured (channel) pruning, validated against the original.",
    help="Prune MODEL into OUTPUT: --sparsity/--threshold zero small weights, --channels removes channels.",
    arguments=(("input_path", {"metavar": "MODEL"}),
               ("output_path", {"decls": ("-o", "--output"), "help": "Where to write the pruned model."})),
    options=Options, run=run, render=render, result=Result, progress="reading data")

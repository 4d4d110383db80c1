"""``onnxopt convert --fp16``: mixed-precision float16 (see onnxopt.precision.convert), judged by the
prediction-level budget of the lossy commands (``--max-drop``, onnxopt.precision.budget) on the CPU EP
with every fp16 tensor rounded as fp16 kernels do; over budget the fewest nodes are kept float32;
the elementwise fp16 check is reported beside it; staged and committed."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import click

from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag
from onnxopt.errors import UsageError
from onnxopt.precision import convert as fp16_convert
from onnxopt.precision.fp16 import DEFAULT_LIMIT, DEFAULT_OP_BLOCK_LIST


@dataclasses.dataclass
class Options:
    input_path: str | os.PathLike
    output_path: str | os.PathLike
    fp16: bool = flag(True, "--fp16", is_flag=True, default=False,
                      help="Convert to mixed-precision float16 (the only target so far).")
    keep_io_types: bool = flag(True, "--keep-io-types/--no-keep-io-types",
                               help="Keep float32 graph inputs/outputs (Casts at the edges); --no-keep-io-types makes "
                                    "them float16.")
    op_block_list: str | None = flag(None, "--op-block-list",
                                     help="Op types kept float32, comma separated; 'default' stands for the defaults "
                                          f"(e.g. 'default,Softmax'; defaults: {', '.join(DEFAULT_OP_BLOCK_LIST)}).")
    node_block_list: str | None = flag(None, "--node-block-list", help="Node names kept float32, comma separated.")
    limit: float | None = flag(None, "--limit", type=float,
                               help="Largest observed |x| a tensor may reach and stay fp16 (default 65504/4: a margin of 4).")
    calib_limit: int | None = common.calib_batches("Read at most this many --data batches for the ranges.")
    data: str | os.PathLike | None = common.data()
    preprocess: str | None = common.preprocess()
    shapes: Mapping[str, tuple[int, ...]] | None = common.shapes()
    ep: str = common.ep()
    validate_result: bool = flag(True, "--validate/--no-validate",
                                 help="Judge the result on the CPU EP (every fp16 tensor rounded) by --max-drop on the "
                                      "held-out batches (every 4th --data batch; synthesized inputs without --data, "
                                      "judged by cosine), keeping the fewest nodes float32 that meet it; the "
                                      "elementwise check (rtol 1e-2, atol 1e-3 per output) is reported beside it. "
                                      "--no-validate writes the conversion unchecked.")
    max_drop: float = common.max_drop()
    metric: str | None = common.metric()
    class_outputs: Mapping[str, int | None] | None = common.output_kind()
    force: bool = common.force("Write the result even when it misses the budget or the check finds inf/NaN.")


@dataclasses.dataclass
class Result(core.Result):
    command = "convert"
    always = frozenset({"validation"})

    input: dict
    target: str
    keep_io_types: bool
    op_block_list: list
    node_block_list: list
    limit: float
    ranges: dict
    conversion: dict
    notes: list
    convert_seconds: float
    output: dict
    validation: dict | None
    written: bool
    seconds: float
    size_ratio: float | None = None
    #: the budget's verdict: {metric, float, converted, drop, max_drop, held_out, outputs} (None: --no-validate)
    accuracy: dict | None = None
    #: the search for nodes kept float32 when every node fp16 missed the budget (None: no search)
    budget_search: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Raises ValidationRefused(report) when outputs leave the fp16 tolerances and not ``force``."""
    if not o.fp16:
        raise UsageError("convert: choose a target precision (--fp16)")
    if o.ep.lower() != "cpu":
        raise UsageError("convert validates on the CPU EP (--ep cpu); compare on others with 'onnxopt validate'")
    settings = fp16_convert.Settings(
        keep_io_types=o.keep_io_types, op_block_list=o.op_block_list, node_block_list=o.node_block_list, data=o.data,
        preprocess=o.preprocess, shapes=o.shapes, calib_limit=o.calib_limit,
        limit=DEFAULT_LIMIT if o.limit is None else o.limit, validate_result=o.validate_result, force=o.force,
        max_drop=o.max_drop, metric=o.metric, class_outputs=o.class_outputs)
    return Result.from_report(fp16_convert.convert(o.input_path, o.output_path, settings, progress))


def render(result: core.Result) -> None:
    res = result.to_dict()
    c, inp, out, r = res["conversion"], res["input"], res["output"], res["ranges"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["kept_fp32_by_kind"].items()))
    click.echo(f"{inp['path']}: {c['fp16_nodes']} nodes fp16, {c['fp32_nodes']} kept fp32" + (f" ({kinds})" if kinds else "")
               + f"; Casts {inp['casts']} -> {out['casts']}; {common.mb(inp['file_bytes'])} -> "
               f"{common.mb(out['file_bytes'])} ({res['size_ratio']:.2f}x)")
    source = "--data" if r["source"] == "data" else "synthesized inputs (give --data for real ranges)"
    click.echo(f"ranges: {r['tensors']} tensors from {source}, {r['batches']} batch(es); {r['over_limit']} over "
               f"{r['limit']:g}, {r['over_fp16_max']} over 65504")
    search, acc = res.get("budget_search"), res.get("accuracy")
    if search:
        click.echo(next((n for n in res["notes"] if n.startswith("kept ")), ""))
    if acc:
        common.echo_accuracy(acc, "converted")
    _echo_elementwise(res["validation"])


#: outputs outside the elementwise tolerance shown one per line (the rest counted)
ELEMENTWISE_SHOWN = 5


def _echo_elementwise(v: dict | None) -> None:
    """The elementwise check: information beside the budget (hard failures refuse before this is shown)."""
    if v is None:
        click.echo("validation: skipped (--no-validate)")
        return
    outside = [o for o in v["outputs"] if not o["ok"]]
    status = "within" if not outside else f"{len(outside)} output(s) outside"
    click.echo(f"elementwise (CPU EP, every fp16 tensor rounded, rtol 1e-2 atol 1e-3; information, the budget "
               f"decides): {status}, {len(v['outputs'])} output(s) at {common.points_text(v)}, max abs diff "
               f"{v['max_abs']:.3g}")
    for o in outside[:ELEMENTWISE_SHOWN]:
        click.echo(f"  {o['name']}: {o['reason']}")
    if len(outside) > ELEMENTWISE_SHOWN:  # a decoder has dozens of present.* outputs: the report lists them all
        click.echo(f"  ... and {len(outside) - ELEMENTWISE_SHOWN} more output(s) outside (the report's validation.outputs)")


def render_refused(report: dict) -> None:
    acc = report.get("accuracy")
    if acc:
        click.echo(f"  accuracy ({acc['metric']}): drop {acc['drop']:.4g}, --max-drop {acc['max_drop']:g}", err=True)
    for line in (report.get("validation") or {}).get("outputs", []):
        if not line["ok"]:
            click.echo(f"  {line['name']}: {line['reason']}", err=True)


COMMAND = Command(
    name="convert", short_help="Mixed-precision fp16 for GPU EPs (judged by --max-drop on the CPU EP).",
    help="Convert MODEL to mixed-precision fp16 into OUTPUT: tensors whose --data ranges would overflow fp16 stay float32, "
         "and when the result misses --max-drop the fewest nodes that meet it stay float32 too.",
    arguments=(("input_path", {"metavar": "MODEL"}),
               ("output_path", {"decls": ("-o", "--output"), "help": "Where to write the converted model."})),
    options=Options, run=run, render=render, render_refused=render_refused, result=Result, progress="ranges")

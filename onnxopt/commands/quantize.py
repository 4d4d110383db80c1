"""``onnxopt quantize``: static int8 QDQ (default, calibrated on --data), dynamic int8 or int4
weight-only quantization, guarded for latency and accuracy (see onnxopt.quantization).

The settings (this module's :class:`Options`, grouped as NNCF groups its advanced parameters)
become the engine's :class:`~onnxopt.quantization.static.Recipe` (what a run decides from) and
:class:`~onnxopt.quantization.static.RunSettings` (how it runs) here and only here; the usage
checks between settings are made here once, for the CLI and the API alike.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import click

from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag, given, group
from onnxopt.errors import UsageError
from onnxopt.quantization import modes, search, static

PERCENTILE = 99.99


def _recovery(text: str) -> tuple[str, ...]:
    return tuple(r for r in text.split(",") if r and r != "none")


@dataclasses.dataclass
class Calibration:
    data: str | os.PathLike | None = common.data(
        "Calibration data: .npz, a folder of .npy/.npz batches, or an image folder (with --preprocess). Needed by "
        "--mode static; optional for --mode dynamic and --weights int4 (then scoring inputs are synthesized).")
    preprocess: str | None = flag(None, "--preprocess", help="For image-folder --data (see 'optimize --help').")
    method: str | None = flag(None, "--method", shown="percentile",
                              help="Range method: minmax, percentile (percentile{p=99.9} to set p), entropy, mse.")
    #: the percentile of ``method="percentile"`` (the CLI writes it as percentile{p=...})
    percentile: float | None = None
    stats_out: str | os.PathLike | None = flag(None, "--save-stats", type=click.Path(),
                                               help="Save calibration statistics (.npz) for reuse.")
    stats_in: str | os.PathLike | None = flag(None, "--load-stats", type=click.Path(),
                                              help="Use saved statistics instead of calibrating.")
    calib_limit: int | None = common.calib_batches()


@dataclasses.dataclass
class Format:
    mode: str | None = flag(None, "--mode", type=click.Choice(static.MODES),
                            help="static: int8 QDQ, calibrated (default); dynamic: int8 weights per channel, activations "
                                 "quantized at run time (MatMulInteger, DynamicQuantizeMatMul on the CPU EP); weight-only: "
                                 "int4 weights (--weights int4).")
    weights: str | None = flag(None, "--weights", type=click.Choice(("int8", "int4")), shown="int8",
                               help="int4: block-wise 4-bit weight-only MatMuls (MatMulNBits on the CPU EP, int4 "
                                    "DequantizeLinear at opset 21 elsewhere), activations float.")
    block_size: int | None = flag(None, "--block-size", type=int, shown=32,
                                  help="With --weights int4: 32, 64 or 128 weights per block.")
    head_bits: int | None = flag(None, "--head-bits", type=click.Choice(("4", "8")), shown="8", parse=int,
                                 help="With --weights int4: bits of the output head (the weight matmul feeding a graph "
                                      "output: LM head, classifier).")
    rounding: str | None = flag(None, "--rounding", type=click.Choice(("rtn", "gptq")),
                                help="int4 rounding: gptq (error feedback with the input Hessian from --data; the default "
                                     "with --data) or rtn (round to nearest; the default without --data).")
    embeddings: str | None = flag(None, "--embeddings", type=click.Choice(("int8", "int4", "none")), shown="int8",
                                  help="Gather tables (embeddings), weight-only: int8 + DequantizeLinear after the Gather, "
                                       "int4 (with --weights int4 on cpu: GatherBlockQuantized) or none (float).")
    per_channel: bool | None = flag(None, "--per-channel/--per-tensor", shown=True,
                                    help="Weight scales per output channel.")


@dataclasses.dataclass
class Guard:
    ep: str | None = flag(None, "--ep", shown="cpu", help="Target EP: cpu, openvino, cuda, tensorrt.")
    latency_guard: bool | None = flag(None, "--latency-guard/--no-latency-guard", shown=True,
                                      help="Keep in float the layers that run slower quantized on --ep, and write the "
                                           "float model if the result is slower than fp32 (--no-latency-guard: quantize "
                                           "regardless, e.g. for size).")
    cost_model: bool = flag(True, "--cost-model/--no-cost-model",
                            help="Let the latency guard decide clear cases from each layer timed alone, cached per "
                                 "machine (ONNXOPT_CACHE_DIR); --no-cost-model measures every decision in the whole model.")
    exclude: tuple[str, ...] | None = flag(None, "--exclude", multiple=True, help="Keep this node in float (repeatable).")


@dataclasses.dataclass
class Recovery:
    recovery: tuple[str, ...] | None = flag(None, "--recover", shown=",".join(static.DEFAULT_RECOVERY), parse=_recovery,
                                            help="Recovery passes, comma separated: bias-correction, cle, adaround "
                                                 "(or 'none').")


@dataclasses.dataclass
class Search:
    search: bool = flag(False, "--search", is_flag=True,
                        help="Evaluate candidate recipes (method x per-channel/per-tensor x recovery x layers kept float) "
                             "and write the fastest on the accuracy/latency/size Pareto front within --max-drop; the "
                             "recipe is saved (--save-recipe, else OUTPUT.recipe.json).")
    budget: int | None = flag(None, "--budget", type=click.IntRange(min=1),
                              help=f"With --search: build at most this many candidates (default "
                                   f"{static.DEFAULT_SEARCH_BUDGET}).")
    workers: int | None = flag(None, "--workers", type=click.IntRange(min=0), default=0, shown="0",
                               help="With --search: build and score candidates on this many local processes "
                                    "(0: the CPU count, at most 4; the Python API's default is 1); 1 builds them in "
                                    "this process.")
    ray_address: str | None = flag(None, "--ray", is_flag=False, flag_value="local",
                                   help="With --search: build and score candidates as Ray tasks: --ray (a local cluster "
                                        "of --workers CPUs) or --ray=ADDRESS.")


@dataclasses.dataclass
class Options:
    input_path: str | os.PathLike
    output_path: str | os.PathLike
    calibration: Calibration = group(Calibration)
    format: Format = group(Format)
    guard: Guard = group(Guard)
    recover: Recovery = group(Recovery)
    searching: Search = group(Search)
    max_drop: float = common.max_drop()
    metric: str | None = common.metric()
    force: bool = common.force("Write the result even when the accuracy budget is missed.")
    recipe: str | os.PathLike | static.Recipe | None = flag(
        None, "--recipe", type=click.Path(),
        help="Replay a recipe (from --save-recipe or a JSON report): its placement, method, weights and recovery, "
             "without the latency guard or budget search (calibration still runs on --data or --load-stats).")
    recipe_out: str | os.PathLike | None = flag(None, "--save-recipe", type=click.Path(),
                                                help="Write the recipe (JSON) for --recipe.")
    #: output name -> class axis, or None for cosine (the default fidelity decides the others)
    class_outputs: Mapping[str, int | None] | None = common.output_kind()
    threads: int = 1


#: the settings a recipe decides (given with --recipe: a usage error)
RECIPE_SETTINGS = ("method", "ep", "per_channel", "recovery", "exclude", "latency_guard", "mode", "weights",
                   "block_size", "head_bits", "rounding", "embeddings", "percentile")
#: the settings --search tries itself
SEARCHED = ("method", "per_channel", "recovery", "percentile")


def _method(text: str | None, percentile: float | None) -> tuple[str | None, float | None]:
    if text is None:
        return None, percentile
    m = re.fullmatch(r"\s*(\w+)\s*(?:\{\s*p\s*=\s*([0-9.]+)\s*\})?\s*", text)
    if m is None or (m.group(2) and m.group(1) != "percentile"):
        raise UsageError(f"--method '{text}': expected minmax, percentile, percentile{{p=99.9}}, entropy or mse")
    return m.group(1), float(m.group(2)) if m.group(2) else percentile


def recipe_of(o: Options) -> tuple[static.Recipe, bool]:
    """The recipe a run decides from (new from the settings, or the replayed one) and whether it is replayed."""
    if o.recipe is not None:
        recipe = o.recipe if isinstance(o.recipe, static.Recipe) else static.Recipe.load(o.recipe)
        return recipe, True
    c, f, g = o.calibration, o.format, o.guard
    method, percentile = _method(c.method, c.percentile)
    settings: dict[str, Any] = {
        "method": method, "percentile": percentile, "ep": g.ep, "per_channel": f.per_channel,
        "recovery": o.recover.recovery, "exclude": g.exclude, "latency_guard": g.latency_guard,
        "weights": f.weights, "block_size": f.block_size, "rounding": f.rounding, "embeddings": f.embeddings,
        "head_bits": f.head_bits,
        "mode": f.mode or ("weight-only" if f.weights == "int4" else None)}
    given_settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if v is not None}
    return static.Recipe(**given_settings), False


def settings_of(o: Options, replayed: bool, progress: core.ProgressFn | None) -> static.RunSettings:
    """How the run works (data, scoring, files, search), with the usage checks between settings."""
    s = o.searching
    defaults = Options(o.input_path, o.output_path)
    if s.budget is not None and not s.search:
        raise UsageError("--budget counts --search candidates; give --search with it")
    if (s.workers not in (None, 0) or s.ray_address is not None) and not s.search:
        raise UsageError("--workers and --ray spread --search candidates; give --search with them")
    if s.search:
        if replayed:
            raise UsageError("--search and --recipe: a replayed recipe is not searched")
        tried = given(o, defaults, SEARCHED)
        if tried:
            raise UsageError(f"--search tries the methods, weight scales and recovery itself; drop {', '.join(tried)}")
    workers = 1 if s.workers is None else (max(1, min(4, os.cpu_count() or 1)) if s.workers == 0 else s.workers)
    c = o.calibration
    return static.RunSettings(
        data=c.data, preprocess=c.preprocess, max_drop=o.max_drop, metric=o.metric, stats_in=c.stats_in,
        stats_out=c.stats_out, recipe_out=o.recipe_out, force=o.force, calib_limit=c.calib_limit, threads=o.threads,
        class_outputs=o.class_outputs, progress=progress, search=s.search,
        search_budget=static.DEFAULT_SEARCH_BUDGET if s.budget is None else s.budget, search_workers=workers,
        search_ray=s.ray_address, cost_model=o.guard.cost_model)


@dataclasses.dataclass
class Result(core.Result):
    command = "quantize"

    input: dict
    ep: str
    method: str
    percentile: float | None
    per_channel: bool
    weight_bits: int
    mode: str
    activation_type: str
    notes: list
    calibration: dict
    recipe: dict
    accuracy: dict | None
    latency: dict
    wrote_float_model: bool
    output: dict
    validation: dict | None
    written: bool
    seconds: float
    seconds_quantize: float | None = None
    search: dict | None = None
    recipe_file: str | None = None
    rounding: dict | None = None


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    """Quantize; raises ValidationRefused (report attached) when the accuracy budget is missed and
    not ``force`` (nothing is written then); a crash inside is one InternalError line (exit 4)."""
    t_start = time.perf_counter()
    _method(o.calibration.method, o.calibration.percentile)  # the usage errors first, in the CLI's order
    if o.recipe is not None:
        fixed = given(o, Options(o.input_path, o.output_path), RECIPE_SETTINGS)
        if fixed:
            raise UsageError(f"--recipe fixes the placement and settings; drop {', '.join(fixed)}")
    settings = settings_of(o, o.recipe is not None, progress)  # before the recipe file is read
    recipe, replayed = recipe_of(o)

    def work() -> dict:
        metric_fn = static.start(o.input_path, o.output_path, recipe, settings)
        if recipe.mode != "static":
            return modes.run(o.input_path, o.output_path, recipe, settings, metric_fn, replayed, t_start)
        return static.run(o.input_path, o.output_path, recipe, settings, metric_fn, replayed, t_start,
                          search.run_search if settings.search else None)

    return Result.from_report(core.guarded("quantize", work))


def render(result: core.Result) -> None:
    res = result.to_dict()
    r, acc, lat = res["recipe"], res["accuracy"], res["latency"]
    click.echo(f"{res['input']['path']}: {r['quantized_layers']} of {r['quantized_layers'] + len(r['float_layers'])} "
               f"layers {'int4' if r.get('weights') == 'int4' else 'int8'} ({r.get('mode', 'static')}) "
               f"({', '.join(f'{k} {v}' for k, v in sorted(r['kinds'].items())) or 'none'}), "
               f"{len(r['float_layers'])} kept float" + (f" (recipe {r['replayed_from']})" if r.get("replayed_from") else ""))
    common.echo_accuracy(acc, "quantized")
    click.echo(f"latency on {res['ep']} ({lat['threads']} thread): {lat['float_ms']:.3f} -> {lat['quantized_ms']:.3f} ms "
               f"({lat['speedup']:.2f}x)")
    if res["wrote_float_model"]:
        reasons = list(r.get("float_reasons", {}).values())
        if reasons and not any(x.startswith("final check") for x in reasons):
            # what kept them (each reason starts with its step: "latency guard...", "accuracy budget: ...", ...)
            steps = dict.fromkeys(x.split(":")[0].split(" (")[0] for x in reasons)
            click.echo(f"every layer was kept in float ({', '.join(steps)}): wrote the optimized float model")
        else:
            click.echo("quantizing did not make it faster on this EP: wrote the optimized float model")
    found = res.get("search")
    if found:
        chosen = found["candidates"][found["chosen"]]
        front = [found["candidates"][i]["label"] for i in found["front"]]
        click.echo(f"search: {found['evaluated'] - 1} candidates + the float model, Pareto front {len(front)}; chosen "
                   f"#{chosen['id']} {chosen['label']} ({chosen['latency_ms']:.3f} ms, {chosen['bytes']} bytes, "
                   f"score {chosen['accuracy']:.4f})")
        click.echo(f"wrote recipe {res['recipe_file']}")
    click.echo(f"wrote {res['output']['path']}")


COMMAND = Command(
    name="quantize", short_help="Static int8 QDQ quantization from calibration data.",
    help="Quantize MODEL into OUTPUT, guarded for latency and accuracy: static int8 QDQ calibrated on --data (default), "
         "--mode dynamic (int8 weights, activations at run time) or --weights int4 (block-wise weight-only).",
    arguments=(("input_path", {"metavar": "MODEL"}),
               ("output_path", {"decls": ("-o", "--output"), "help": "Where to write the quantized model."})),
    options=Options, run=run, render=render, result=Result, progress="calibrating")

"""``onnxopt bench``: latency (p50/p90/p99/mean/std), throughput, load time and memory per model and
EP, side by side (see onnxopt.benchmark)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import click

from onnxopt import benchmark, runtime
from onnxopt.commands import common, core
from onnxopt.commands.spec import Command, flag
from onnxopt.errors import UsageError


def _batches(text: str) -> tuple[int | None, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UsageError(f"--batch '{text}': expected sizes like 1,8") from None


@dataclasses.dataclass
class Options:
    models: Sequence[str | os.PathLike]
    data: str | os.PathLike | None = common.data()
    preprocess: str | None = common.preprocess()
    shapes: Mapping[str, tuple[int, ...]] | None = common.shapes()
    eps: str | tuple[str, ...] = flag(("cpu",), "--ep", default="cpu", parse=runtime.parse_eps,
                                      help="Execution providers, comma separated: cpu, openvino, cuda, tensorrt, dml, coreml.")
    threads: int | None = flag(1, "--threads", type=int, parse=lambda n: n or None,
                               help="Intra-op threads per session (0 = ORT default).")
    warmup: int = flag(10, "--warmup", type=int, help="Untimed runs per model first.")
    runs: int = flag(100, "--runs", type=int, help="Timed runs per model (round-robin).")
    batches: Sequence[int | None] = flag((None,), "--batch", default=None, parse=_batches,
                                         help="Batch sizes for the first input dim, e.g. 1,8.")


@dataclasses.dataclass
class Result(core.Result):
    command = "bench"

    threads: int
    warmup: int
    runs: int
    results: list
    summary: str


def run(o: Options, progress: core.ProgressFn | None = None) -> Result:
    for path in o.models:
        core.check_model_file(path)
    eps = runtime.parse_eps(o.eps) if isinstance(o.eps, str) else tuple(o.eps)
    results = benchmark.bench(o.models, eps=eps, threads=o.threads, warmup=o.warmup, runs=o.runs,
                              batches=list(o.batches or (None,)), data=o.data, shapes=o.shapes,
                              preprocess=o.preprocess, progress=progress)
    return Result(threads=o.threads or 0, warmup=o.warmup, runs=o.runs, results=[r.to_dict() for r in results],
                  summary=benchmark.summary(results))


def render(result: core.Result) -> None:
    click.echo(result.to_dict()["summary"])


COMMAND = Command(
    name="bench", short_help="Latency, throughput and memory side by side.",
    help="Latency (p50/p90/p99/mean/std), throughput, load time and memory per model and EP, side by side.",
    arguments=(("models", {"metavar": "MODELS...", "nargs": -1, "required": True}),),
    options=Options, run=run, render=render, result=Result, output=None,
    label=lambda kw: ", ".join(map(str, kw["models"])), progress="bench",
    progress_total=lambda o: len(runtime.parse_eps(o.eps) if isinstance(o.eps, str) else o.eps)
    * len(o.batches or (None,)) * len(o.models) * o.runs)

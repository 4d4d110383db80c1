"""Option fields several commands share (each flag written once, here) and small printing helpers."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import click

from onnxopt import generation, runtime
from onnxopt.commands.spec import flag
from onnxopt.errors import UsageError

DATA_HELP = (".npz (arrays by input name), a folder of .npy/.npz batches, or an image folder. Without it, "
             "inputs are synthesized (at most 1 GiB; larger declared inputs need --data).")
LOSSY_DATA_HELP = ("Calibration data (.npz, folder of .npy/.npz batches, image folder): held-out batches score "
                   "the result, the others feed the refit.")
METRIC_HELP = ("Task metric module:function or path/to/file.py:function, called with an ORT session, higher is "
               "better. A module name is imported with the current directory first on sys.path (as python -m does).")
MAX_DROP_HELP = ("Accuracy budget: largest allowed drop of the metric (default: per output, top-1 agreement at every "
                 "position for class scores, cosine otherwise; see README).")


def data(help: str = DATA_HELP) -> Any:
    return flag(None, "--data", help=help, type=click.Path())


def preprocess() -> Any:
    return flag(None, "--preprocess",
                help='For image-folder --data: "resize=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw".')


def shapes() -> Any:
    return flag(None, "--shape", help="Input shape NAME:1x3x224x224 for symbolic dims (repeatable).", multiple=True,
                parse=runtime.parse_shapes)


def ep(default: str = "cpu",
       help: str = "Execution providers, comma separated: cpu, openvino, cuda, tensorrt, dml, coreml.") -> Any:
    return flag(default, "--ep", help=help)


def force(help: str = "Write the result even when validation finds diverging outputs.") -> Any:
    return flag(False, "--force", help=help, is_flag=True)


def max_drop() -> Any:
    return flag(0.01, "--max-drop", help=MAX_DROP_HELP, type=float)


def metric(help: str = METRIC_HELP) -> Any:
    return flag(None, "--metric", help=help)


def calib_batches(help: str = "Read at most this many --data batches.") -> Any:
    return flag(None, "--calib-batches", help=help, type=click.IntRange(min=1))


def exclude(help: str = "Keep this node in float (repeatable).") -> Any:
    return flag((), "--exclude", help=help, multiple=True)


OUTPUT_KINDS = ("classes", "embedding", "regression")


def output_kinds(items: tuple[str, ...]) -> dict[str, int | None]:
    """``--output-kind NAME=classes|embedding|regression`` (repeatable) -> output name -> class axis
    (-1: class scores on the last axis, judged by top-1 agreement) or None (cosine)."""
    out: dict[str, int | None] = {}
    for item in items:
        name, sep, kind = item.rpartition("=")
        if not sep or not name or kind not in OUTPUT_KINDS:
            raise UsageError(f"--output-kind '{item}': expected NAME=classes, NAME=embedding or NAME=regression")
        out[name] = -1 if kind == "classes" else None
    return out


def output_kind() -> Any:
    return flag(None, "--output-kind", multiple=True, parse=output_kinds,
                help="How an output is judged without --metric: NAME=classes (top-1 agreement, class axis last), "
                     "NAME=embedding or NAME=regression (cosine); repeatable. Default: from the graph and the data.")


def scope() -> Any:
    return flag("global", "--scope", type=click.Choice(["global", "layer"]),
                help="--sparsity over all pruned layers together or in each layer.")


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def divergence(first: dict) -> str:
    return (f"first divergence at node '{first['node']}' ({first['op_type']}), value '{first['value_b']}', "
            f"max abs {first['max_abs']:.3g}")


def points_text(v: dict) -> str:
    """'N input point(s)', saying when they are a decoder's prompt and decoding step."""
    compared = [p for p in v.get("points", []) if p["status"] == "compared"]
    decoder = [p for p in compared if p["label"].startswith((generation.PROMPT, generation.STEP))]
    if decoder:
        tokens = max(shape[-1] for p in decoder for name, shape in p["shapes"].items() if len(shape) == 2 and "mask" not in name)
        return f"{len(compared)} input point(s) (a {tokens}-token prompt and a decoding step after it)"
    return f"{len(compared)} input point(s)"


def echo_validation(v: dict | None, what: str = "validation", latency_shown: bool = True) -> None:
    """The one validation line of optimize and convert."""
    if v is None:
        click.echo("validation: skipped (--no-validate)")
        return
    status = "ok" if v["ok"] else "DIVERGED (written because of --force)"
    latency = ""
    if latency_shown and v.get("latency_ref_ms"):
        latency = f", latency {v['latency_ref_ms']:.3f} -> {v['latency_new_ms']:.3f} ms"
    click.echo(f"{what}: {status}, {len(v['outputs'])} output(s) at {points_text(v)}, "
               f"max abs diff {v['max_abs']:.3g}{latency}")


def echo_searches(r: dict) -> None:
    """The lines of the budget searches that wrote less than asked (prune's sparsity, compress's
    sparsity and cluster count)."""
    for key in ("sparsity_search", "cluster_search"):
        message = (r.get(key) or {}).get("message")
        if message:
            click.echo(message)


def echo_accuracy(acc: dict, key: str) -> None:
    """The accuracy line of the lossy commands (``key``: the result's score key)."""
    click.echo(f"accuracy ({acc['metric']}): {acc['float']:.4f} -> {acc[key]:.4f} "
               f"(drop {acc['drop']:.4f}, budget {acc['max_drop']:g})")


@dataclasses.dataclass
class Scoring:
    """How prune and compress score and write a result (the options they share with quantize)."""

    data: str | os.PathLike | None = data(LOSSY_DATA_HELP)
    preprocess: str | None = flag(None, "--preprocess", help="For image-folder --data (see 'optimize --help').")
    max_drop: float = flag(0.01, "--max-drop", type=float,
                           help="Accuracy budget: largest allowed drop of the metric (default metric: see 'quantize --help').")
    metric: str | None = metric("Task metric module:function (see 'quantize --help').")
    ep: str = ep(help="Target EP for scoring and latency.")
    calib_limit: int | None = flag(None, "--calib-batches", type=int, help="Read at most this many --data batches.")
    exclude: tuple[str, ...] = exclude("Leave this node alone (with --channels: every group it is part of); repeatable.")
    refit: bool = flag(True, "--refit/--no-refit",
                       help="Least-squares refit of the pruned / consuming layers on --data against the original.")
    force: bool = force("Write the result even when the accuracy budget is missed.")
    strict: bool = flag(False, "--strict", is_flag=True,
                        help="--sparsity (or --cluster) over the budget: refuse (exit 3) instead of writing the highest "
                             "sparsity (or the fewest clusters) that meets it.")
    class_outputs: dict[str, int | None] | None = output_kind()
    threads: int = 1

    def settings(self, progress: Callable[[int], None] | None) -> Any:
        """The compression engine's run settings (``exclude`` goes to each flow)."""
        from onnxopt.compression import engine  # the lossy engine, for prune and compress only

        runtime.provider(self.ep)
        return engine.Settings(data=self.data, preprocess=self.preprocess, max_drop=self.max_drop, metric=self.metric,
                               ep=self.ep, threads=self.threads, force=self.force, refit=self.refit,
                               calib_limit=self.calib_limit, progress=progress, class_outputs=self.class_outputs,
                               strict=self.strict)

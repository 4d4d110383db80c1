"""What a quantize run decides from (:class:`Recipe`: settings and decisions) and how it runs
(:class:`RunSettings`), with the constants the steps share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from onnxopt import calibrate, pipeline, runtime
from onnxopt.commands import core
from onnxopt.errors import BadInputError, UsageError
from onnxopt.quantization import qdq as qq

logger = logging.getLogger("onnxopt")

PREPARE_PIPELINE = pipeline.DEFAULT_PIPELINE
RECOVERY = ("bias-correction", "cle", "adaround")
DEFAULT_RECOVERY = ("bias-correction", "adaround")
KIND_ORDER = ("depthwise", "pointwise", "conv", "gemm", "attention")
#: int8 must be faster than float by more than this fraction (with confidence) to be kept; a single
#: layer goes back to float only when that is faster by more than it too
LATENCY_MARGIN = 0.03
#: the cost model keeps a kind in int8 unmeasured when its regions save more than the margin plus
#: this fraction of the fp32 time (onnxopt.quantization.latency_cache)
CLEAR = 0.05
#: ... and keeps a layer int8 unmeasured when its region's extra cost is under this fraction of
#: the margin (the rest of the margin absorbs the noise of the measured base time)
SURE = 0.75
#: the layer-by-layer pass runs only when at most this many layers are int8 after the per-kind
#: decisions (each layer costs one comparison); with more it is skipped, not truncated
PER_LAYER_GUARD = 24
#: latency comparison: pairs per block, blocks at least / at most, seconds at most per comparison
PAIRS_PER_BLOCK, MIN_BLOCKS, MAX_BLOCKS, COMPARE_SECONDS = 16, 2, 6, 12.0
#: blocks at most when one layer is tried back in float (one layer rarely pays the margin)
LAYER_BLOCKS = 2
#: a comparison whose interval after the first block lies this far from the threshold stops there
#: (the checks near the threshold are unchanged: ``bench.paired``'s ``early``)
EARLY = 0.1
RECIPE_FORMAT = "onnxopt-recipe/1"
#: warm ORT sessions kept for latency comparisons (each holds its model's weights)
SESSION_CACHE = 3
#: runs of each model when a big float model is compared unpaired (``Quantizer.unpaired``)
UNPAIRED_RUNS = 15
#: recovery batches kept (the non-held-out ones, onnxopt.teacher.is_held_out)
RECOVERY_BATCHES = 8
#: calibration folds the recovery batches' statistics in this many threads while the next batches run
FOLD_WORKERS = 2
#: the sensitivity ranking scores in this many threads (none with a user --metric: user code is
#: called in the main thread), while at most RANK_AHEAD built models wait to be scored
RANK_WORKERS = RANK_AHEAD = 2
DEFAULT_SEARCH_BUDGET = 12  # --search: candidates built at most (onnxopt.quantization.search)
MODES = ("static", "dynamic", "weight-only")
BLOCK_SIZES = (32, 64, 128)

def serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


#: what ORT sessions of a model are made from (bytes, or a ``runtime.Light`` for big or on-disk weights)
session_source = runtime.source_of


def source_key(source: bytes | runtime.Light | str) -> bytes:
    """A key telling sources apart (session caches): the bytes' hash, for a Light the hash of its
    weightless proto and of which arrays it hands over (the same arrays: the same model), for a model
    file its path and modification time."""
    if isinstance(source, str):
        return hashlib.sha1(f"{source}:{os.stat(source).st_mtime_ns}".encode()).digest()
    if isinstance(source, runtime.Light):
        ids = ",".join(f"{k}:{a.__array_interface__['data'][0]}:{a.shape}" for k, a in sorted(source.initializers.items()))
        return hashlib.sha1(source.data + ids.encode()).digest()
    return hashlib.sha1(source).digest()


@dataclasses.dataclass
class Decisions:
    """What a quantize run decides, apart from the settings it decides from: ``float_layers`` (layer
    -> why it stays float), the latency guard's ``latency_decisions``, the budget's ``sensitivity``
    ranking, and ``replayed_from``, the recipe file a replay used."""

    float_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    latency_decisions: list[dict] = dataclasses.field(default_factory=list)
    sensitivity: list[dict] = dataclasses.field(default_factory=list)
    replayed_from: str | None = None


@dataclasses.dataclass
class Recipe:
    """The settings quantize decides from, with the record of what it decided (:class:`Decisions`,
    kept apart); the report's ``"recipe"`` (:meth:`to_dict`, one flat JSON object) and what
    ``--recipe`` replays (:meth:`from_dict`).  Settings: ``ep`` (its ``qq.Profile``: activation type,
    float kinds), range ``method`` and ``percentile``, ``per_channel`` weights, ``weight_bits`` (None:
    from the EP and CPU, see ``qq.weight_qmax``), ``recovery`` passes, user ``exclude`` and whether the
    ``latency_guard`` runs."""

    ep: str = "cpu"
    method: str = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    weight_bits: int | None = None
    recovery: tuple[str, ...] = DEFAULT_RECOVERY
    exclude: tuple[str, ...] = ()
    latency_guard: bool = True
    #: ``static`` (QDQ, calibrated), ``dynamic`` (int8 weights, activations quantized at run time) or
    #: ``weight-only`` (int4 block-wise weights, float activations); see ``onnxopt/quantize_modes.py``
    mode: str = "static"
    weights: str = "int8"
    block_size: int = 32
    #: weight-only: bits of the output head(s) (the weight MatMul feeding a graph output), 8 or 4
    head_bits: int = 8
    #: Gather tables (embeddings) quantized weight-only, in every mode: int8, int4 (weight-only mode) or none
    embeddings: str = "int8"
    #: int4 weight rounding: ``gptq`` (error feedback with the input Hessian, needs data) or ``rtn``;
    #: None: gptq with --data, else rtn (the run fills it in)
    rounding: str | None = None
    #: what the run decided (or the replayed recipe had decided)
    decisions: Decisions = dataclasses.field(default_factory=lambda: Decisions())

    def check(self) -> None:
        """Usage errors (exit 1) for settings no step can run."""
        if self.method not in calibrate.METHODS:
            raise UsageError(f"--method '{self.method}': choose from {', '.join(calibrate.METHODS)}")
        unknown = [r for r in self.recovery if r not in RECOVERY]
        if unknown:
            raise UsageError(f"--recover '{unknown[0]}': choose from {', '.join(RECOVERY)} or none")
        if self.ep not in qq.PROFILES:
            raise UsageError(f"--ep '{self.ep}': quantize targets {', '.join(qq.PROFILES)}")
        if self.weight_bits not in (None, 7, 8):
            raise UsageError(f"recipe weight_bits {self.weight_bits}: 7 or 8")
        if self.mode not in MODES:
            raise UsageError(f"--mode '{self.mode}': choose from {', '.join(MODES)}")
        if self.weights not in ("int8", "int4"):
            raise UsageError(f"--weights '{self.weights}': int8 or int4")
        if (self.weights == "int4") != (self.mode == "weight-only"):
            raise UsageError("--weights int4 is weight-only (activations stay float): leave --mode out or use "
                             "--mode weight-only" if self.weights == "int4" else
                             "--mode weight-only needs --weights int4")
        if self.embeddings not in ("int8", "int4", "none"):
            raise UsageError(f"--embeddings '{self.embeddings}': int8, int4 or none")
        if self.embeddings == "int4" and self.mode != "weight-only":
            raise UsageError("--embeddings int4 goes with --weights int4 (use int8 with this mode)")
        if self.head_bits not in (4, 8):
            raise UsageError(f"--head-bits {self.head_bits}: 4 or 8")
        if self.block_size not in BLOCK_SIZES:
            raise UsageError(f"--block-size {self.block_size}: choose {', '.join(map(str, BLOCK_SIZES))}")
        if self.rounding not in (None, "rtn", "gptq"):
            raise UsageError(f"--rounding '{self.rounding}': rtn or gptq")

    @property
    def profile(self) -> qq.Profile:
        return qq.PROFILES[self.ep]

    @property
    def qmax(self) -> int:
        return qq.weight_qmax(self.ep) if self.weight_bits is None else (127 if self.weight_bits == 8 else 63)

    @property
    def bits(self) -> int:
        """Weight bits as reported: 4, or 8/7 (``qmax``)."""
        return 4 if self.weights == "int4" else (8 if self.qmax == 127 else 7)

    @property
    def build_recovery(self) -> tuple[str, ...]:
        """The recovery applied to each built candidate (``cle`` runs once, on the float model)."""
        return tuple(r for r in self.recovery if r != "cle")

    def excluded(self) -> frozenset:
        return frozenset(self.decisions.float_layers)

    def to_dict(self, the_plan: qq.Plan | None = None) -> dict:
        """JSON form; with the plan built from it, also its placement counts (report keys
        ``quantized``, ``quantized_layers``, ``kinds``)."""
        described = the_plan.describe() if the_plan is not None else {}
        return {**described, "float_layers": sorted(self.decisions.float_layers),
                "recovery": list(self.build_recovery) + (["cle"] if "cle" in self.recovery else []),
                "latency_decisions": self.decisions.latency_decisions, "sensitivity": self.decisions.sensitivity,
                "format": RECIPE_FORMAT, "ep": self.ep, "method": self.method,
                "percentile": self.percentile if self.method == "percentile" else None,
                "per_channel": self.per_channel, "weight_bits": self.bits,
                "activation_type": self.profile.activation, "exclude": list(self.exclude),
                "latency_guard": self.latency_guard, "mode": self.mode, "weights": self.weights,
                "block_size": self.block_size if self.weights == "int4" else None, "embeddings": self.embeddings,
                "head_bits": self.head_bits if self.weights == "int4" else None,
                "rounding": self.rounding,
                "float_reasons": {n: self.decisions.float_layers[n] for n in sorted(self.decisions.float_layers)},
                "replayed_from": self.decisions.replayed_from}

    @classmethod
    def from_dict(cls, d: Mapping, source: str | None = None) -> Recipe:
        """A recipe from :meth:`to_dict`'s form or from a whole JSON quantize report."""
        if isinstance(d, Mapping) and d.get("command") == "quantize" and isinstance(d.get("recipe"), Mapping):
            d = d["recipe"]
        if not isinstance(d, Mapping) or not isinstance(d.get("float_layers"), list):
            raise BadInputError(f"{source or 'recipe'}: not an onnxopt recipe (no 'float_layers' list); "
                                f"use a file written by --save-recipe or a JSON quantize report")
        if d.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise BadInputError(f"{source or 'recipe'}: recipe format '{d['format']}', expected {RECIPE_FORMAT}")
        reasons = d.get("float_reasons") or {}
        return cls(ep=d.get("ep", "cpu"), method=d.get("method", "percentile"),
                   percentile=float(d.get("percentile") or 99.99), per_channel=bool(d.get("per_channel", True)),
                   weight_bits=d.get("weight_bits") if d.get("weights", "int8") == "int8" else None,
                   recovery=tuple(d.get("recovery", DEFAULT_RECOVERY)),
                   exclude=tuple(d.get("exclude", ())), latency_guard=bool(d.get("latency_guard", True)),
                   mode=str(d.get("mode", "static")), weights=str(d.get("weights", "int8")),
                   block_size=int(d.get("block_size") or 32), embeddings=_embeddings(d.get("embeddings", "int8")),
                   head_bits=int(d.get("head_bits") or 8),
                   rounding=d.get("rounding"),
                   decisions=Decisions(float_layers={n: reasons.get(n, "recipe") for n in d["float_layers"]},
                                       latency_decisions=list(d.get("latency_decisions", [])),
                                       sensitivity=list(d.get("sensitivity", [])), replayed_from=source))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(f"--recipe {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | os.PathLike, the_plan: qq.Plan | None = None) -> None:
        text = json.dumps(self.to_dict(the_plan), indent=2, default=str) + "\n"
        tmp = Path(str(path) + ".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as e:
            raise BadInputError(f"--save-recipe {path}: cannot write ({e.strerror or e})") from None


def _embeddings(value) -> str:
    """A recipe's embeddings setting (older recipes wrote a bool)."""
    if isinstance(value, bool):
        return "int8" if value else "none"
    return str(value)


@dataclasses.dataclass
class RunSettings:
    """How a run works (not what it decides): data, scoring, files, threads, progress."""

    data: str | os.PathLike | None
    preprocess: str | None = None
    max_drop: float = 0.01
    metric: str | None = None
    stats_in: str | os.PathLike | None = None
    stats_out: str | os.PathLike | None = None
    recipe_out: str | os.PathLike | None = None
    force: bool = False
    calib_limit: int | None = None
    threads: int = 1
    class_outputs: Mapping[str, int | None] | None = None
    progress: core.ProgressFn | None = None
    #: ``--search``: evaluate candidate recipes (``onnxopt.quantization.search``), at most ``search_budget``
    search: bool = False
    search_budget: int = DEFAULT_SEARCH_BUDGET
    #: where the search builds and scores candidates: ``search_workers`` local processes (1: this
    #: process), or Ray tasks when ``search_ray`` is an address ("local": a local cluster)
    search_workers: int = 1
    search_ray: str | None = None
    #: the latency guard decides clear cases from region timings cached per machine
    #: (``onnxopt.quantization.latency_cache``); False measures every decision in the whole model
    cost_model: bool = True

"""``convert --fp16`` judged by the prediction-level budget of the lossy commands (issue 21).

The elementwise fp16 tolerance (rtol 1e-2 / atol 1e-3 per output, ``onnxopt.precision.convert.Fp16Check``)
refused conversions whose predictions were unchanged (a few class probabilities moved by 0.05).
Here the result is judged as ``quantize`` judges its own: :class:`onnxopt.teacher.Teacher` on the
held-out batches (every 4th ``--data`` batch, :func:`onnxopt.teacher.is_held_out`; without data the
synthesized inputs of the validator, judged by cosine), ``--max-drop`` (default 0.01) and the
default fidelity (top-1 agreement for class outputs, cosine otherwise) or ``--metric``.

Scoring is fp16-faithful: a candidate runs through ``faithful_session`` (every fp16 tensor rounded
as fp16 kernels round it; the plain CPU EP computes fp16 chains in float32 and would hide an
overflow), wrapped in :class:`HalfSession` so the teacher sees float32 inputs and outputs.

Over budget, :func:`rank` measures on one held-out batch, for every fp16 node, the relative (L2)
error of its outputs against the fp32 model's minus the largest error of its inputs (the error the
node *adds*: a subtraction of nearly equal large values or an Exp of a large argument adds much,
a MatMul little), and :func:`fewest` keeps the fewest of the ranked nodes in float32 by a binary
search on their count (as ``quantization.placement.fewest_float`` does for int8 layers).  Keeping a
node float32 keeps the fp16 producers of its float inputs too: a node computing in float32 on
inputs already rounded to fp16 would not undo the rounding that hurt.  Cost: one run with every
tensor as an output, then about log2(fp16 nodes) conversions and scorings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import data as data_mod
from onnxopt import io, runtime
from onnxopt import validation as validate
from onnxopt.errors import BadInputError
from onnxopt.precision import fp16 as cf
from onnxopt.precision.faithful import faithful_session
from onnxopt.teacher import HELD_OUT, BudgetResult, Teacher, is_held_out, load_metric

logger = logging.getLogger("onnxopt")

#: nodes of the ranking listed in the report
RANKING_SHOWN = 10
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class HalfSession:
    """A faithful session seen as the fp32 model's session: float32 feeds are cast to float16 for
    float16 graph inputs (``--no-keep-io-types``), float16 outputs come back as float32, and only
    the graph's own ``outputs`` are listed (not the rounded tensors the faithful session adds)."""

    def __init__(self, sess: Any, outputs: Sequence[str]):
        self.sess, self.outputs = sess, list(outputs)
        self.half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}

    def get_inputs(self) -> Any:
        return self.sess.get_inputs()

    def get_outputs(self) -> list:
        return [o for o in self.sess.get_outputs() if o.name in self.outputs]

    def get_providers(self) -> list[str]:
        return self.sess.get_providers()

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, Any], run_options: Any = None) -> list:
        feeds = {k: np.asarray(v).astype(np.float16) if k in self.half else v for k, v in feeds.items()}
        got = self.sess.run(list(names or self.outputs), feeds, run_options)
        return [g.astype(np.float32) if isinstance(g, np.ndarray) and g.dtype == np.float16 else g for g in got]


def other_batches(path: str | os.PathLike, data: str | os.PathLike, *, preprocess: str | None,
                  limit: int | None) -> Iterator[dict]:
    """The batches of ``data`` that are not held out, streamed (for the teacher's margins)."""
    plain = runtime.session(path, "cpu")
    for i, feeds in enumerate(data_mod.batches(data, plain, preprocess, limit)):
        if not is_held_out(i):
            yield feeds


def held_out_batches(path: str | os.PathLike, data: str | os.PathLike | None, *, preprocess: str | None,
                     shapes: Mapping[str, tuple[int, ...]] | None, limit: int | None) -> tuple[list[dict], list[str]]:
    """(held-out feeds, their labels): every 4th ``data`` batch (up to HELD_OUT; the last batch read
    when there are fewer than 4), else the validator's synthesized points (``validate.synthesized_points``)."""
    plain = runtime.session(path, "cpu")
    if data is None:
        points = validate.synthesized_points(plain, shapes)
        kept = [p for p in points if p.feeds]
        return [p.feeds for p in kept], [p.label for p in kept]
    held: list[dict] = []
    labels: list[str] = []
    last: dict | None = None
    for i, feeds in enumerate(data_mod.batches(data, plain, preprocess, limit)):
        last = feeds
        if is_held_out(i):
            held.append(feeds)
            labels.append(f"data batch {i + 1}")
            if len(held) >= HELD_OUT:
                break
    if not held and last is not None:
        held, labels = [last], ["the last data batch (fewer than 4 batches: none held out)"]
    if not held:
        raise BadInputError(f"{data}: no batch was read")
    return held, labels


@dataclasses.dataclass
class Builder:
    """Converts fresh copies of the (typed) original with the user's lists, plus nodes the budget keeps."""

    original: bytes  # the typed original serialized (weights in an external-data file stay references)
    keep_io_types: bool
    op_block_list: tuple[str, ...]
    node_block_list: tuple[str, ...]
    limit: float
    ranges: Mapping[str, float]
    base_dir: str | None = None  # the folder of the original's external-data weights, when they stay there

    def original_model(self) -> ir.Model:
        """A fresh copy of the original (weights in an external-data file read from there, lazily)."""
        return io.from_proto(onnx.ModelProto.FromString(self.original), self.base_dir)

    def __call__(self, budget: Mapping[str, str] | None = None) -> tuple[ir.Model, cf.Conversion]:
        model = self.original_model()
        done = cf.convert_model(model, keep_io_types=self.keep_io_types, op_block_list=self.op_block_list,
                                node_block_list=self.node_block_list, limit=self.limit, ranges=self.ranges,
                                budget=budget)
        return model, done


def make_teacher(model: ir.Model, source: bytes | runtime.Light, held_out: list[dict], *, metric: str | None, max_drop: float,
                 class_outputs: Mapping[str, int | None] | None, synthesized: bool) -> Teacher:
    """The fp32 reference and the yardstick on the CPU EP (``onnxopt.teacher``)."""
    return Teacher(model, source, held_out, ep="cpu", threads=1, metric=load_metric(metric), metric_name=metric,
                   max_drop=max_drop, class_outputs=class_outputs, synthesized=synthesized)


def score(teacher: Teacher, model: ir.Model | str | os.PathLike) -> float:
    """The teacher's score of ``model`` run fp16-faithfully (NaN when it does not run)."""
    loaded = model if isinstance(model, ir.Model) else ir.load(str(model))
    try:
        sess, _ = faithful_session(loaded)
        return teacher.score_session(HalfSession(sess, [v.name for v in loaded.graph.outputs if v.name]))
    except BadInputError as e:
        logger.debug("fp16 candidate does not run: %s", e)
        return math.nan


def drop(teacher: Teacher, model: ir.Model | str | os.PathLike) -> float:
    """float score - candidate score; infinite for a candidate that fails or scores NaN."""
    d = teacher.float_score - score(teacher, model)
    return d if math.isfinite(d) else math.inf


def _rel_error(got: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    if got is None or ref is None or np.shape(got) != np.shape(ref):
        return None
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(g)):
        return math.inf
    finite = np.isfinite(r)
    norm = float(np.linalg.norm(np.where(finite, r, 0)))
    diff = float(np.linalg.norm(np.where(finite, g - r, 0)))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _source(value: ir.Value, original: set[str], inserted: set[ir.Node]) -> str | None:
    """The original tensor a candidate value holds (through the Casts the conversion inserted; a
    graph output's fp16 value, renamed, through the Cast back to its name)."""
    for use in value.uses():
        out = use.node.outputs[0] if use.node in inserted and use.node.outputs else None
        if value.name not in original and out is not None and out.is_graph_output() and out.name in original:
            return out.name
    while value.name not in original:
        producer = value.producer()
        if producer is None or producer not in inserted or not producer.inputs or producer.inputs[0] is None:
            return None
        value = producer.inputs[0]
    return value.name


def rank(candidate: ir.Model, original: ir.Model, feeds: Mapping[str, np.ndarray]) -> list[dict]:
    """The candidate's fp16 nodes (named, main graph) by the relative error each adds on ``feeds``,
    largest first: ``{"node", "op", "added", "error", "group"}`` (``group``: the node and the fp16
    producers of its float inputs, what keeping it float32 means)."""
    inputs = {i.name for i in original.graph.inputs if i.name}
    orig_names = {o.name for n in original.graph for o in n.outputs if o.name} | inputs
    orig_nodes = {n.name for n in original.graph if n.name}
    inserted = {n for n in candidate.graph if n.name not in orig_nodes}
    wanted = [o.name for n in candidate.graph for o in n.outputs if o.name and o.dtype in FLOATS]
    sess, _ = faithful_session(candidate, extra=wanted)
    got = runtime.run(sess, _half_feeds(sess, feeds), wanted)
    sources = {name: s for n in candidate.graph for v in n.outputs if (name := v.name)
               and (s := _source(v, orig_names, inserted)) is not None}
    ref_names = sorted(set(sources.values()) - inputs)
    ref_sess = runtime.session(runtime.with_outputs_of(runtime.source_of(original), ref_names), "cpu", optimize=False)
    ref = runtime.run(ref_sess, feeds, ref_names)
    fp16_nodes = {n for n in candidate.graph if n.name in orig_nodes and any(o.dtype == cf.HALF for o in n.outputs)}

    def error(v: ir.Value | None) -> float:
        if v is None or v.const_value is not None or v.producer() is None or v.dtype not in FLOATS:
            return 0.0  # weights' rounding is the consuming node's own error; graph inputs are exact
        e = _rel_error(got.get(v.name or ""), ref.get(sources.get(v.name or "", "")))
        return 0.0 if e is None else e

    ranked: list[dict[str, Any]] = []
    for node in fp16_nodes:
        out_err = max((error(o) for o in node.outputs if o.dtype == cf.HALF), default=0.0)
        in_err = max((error(v) for v in node.inputs), default=0.0)
        added = out_err - in_err if math.isfinite(out_err) else math.inf
        ranked.append({"node": node.name, "op": node.op_type, "added": added, "error": out_err,
                       "group": _group(node, fp16_nodes, inserted)})
    ranked.sort(key=lambda r: (-r["added"], -r["error"], r["node"]))
    return ranked


def _half_feeds(sess: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
    return {k: v.astype(np.float16) if k in half else v for k, v in feeds.items()}


def _group(node: ir.Node, fp16_nodes: set[ir.Node], inserted: set[ir.Node]) -> list[str]:
    names = [_name(node)]
    for v in node.inputs:
        while v is not None and v.producer() in inserted:
            producer = v.producer()
            v = producer.inputs[0] if producer is not None and producer.inputs else None
        producer = v.producer() if v is not None else None
        if producer is not None and producer in fp16_nodes and producer.name not in names:
            names.append(_name(producer))
    return names


def _name(node: ir.Node) -> str:
    return node.name or ""


@dataclasses.dataclass
class Search:
    """What the budget search did, for the report."""

    drop_all_fp16: float
    ranked: list[dict]
    kept: dict[str, str]
    builds: int

    def to_dict(self) -> dict:
        shown = [{k: v for k, v in r.items() if k != "group"} | {"keep": r["group"]} for r in self.ranked[:RANKING_SHOWN]]
        return {"drop_all_fp16": self.drop_all_fp16, "ranked_nodes": len(self.ranked), "builds": self.builds,
                "kept_fp32": sorted(self.kept), "ranking": shown}


def _keep(ranked: Sequence[dict], k: int) -> dict[str, str]:
    """Node name -> reason for the first ``k`` ranked nodes and their groups."""
    kept: dict[str, str] = {}
    for i, r in enumerate(ranked[:k], 1):
        for name in r["group"]:
            why = f"accuracy budget: rank {i} ('{r['node']}' adds relative error {r['added']:.3g})"
            kept.setdefault(name, why if name == r["node"] else why + ", one of its inputs' producers")
    return kept


def fewest(build: Callable[[Mapping[str, str]], tuple[ir.Model, cf.Conversion]], teacher: Teacher,
           ranked: Sequence[dict], max_drop: float) -> tuple[int, tuple[ir.Model, cf.Conversion, float], int]:
    """The fewest of the ``ranked`` nodes (worst first) kept float32 so the drop is within
    ``max_drop``: binary search on the count k (k = 0 is known to miss).  Returns k, the (candidate,
    conversion, drop) built for it (all of them when no smaller k holds) and the builds made."""
    best: tuple[ir.Model, cf.Conversion, float] | None = None
    lo, hi, builds = 0, len(ranked), 0
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        cand, done = build(_keep(ranked, mid))
        builds += 1
        d = drop(teacher, cand)
        if d <= max_drop:
            hi, best = mid, (cand, done, d)
        else:
            lo = mid
        del cand
    if best is None:
        cand, done = build(_keep(ranked, hi))
        builds += 1
        best = (cand, done, drop(teacher, cand))
    return hi, best, builds


def fit(build: Builder, teacher: Teacher, candidate: ir.Model, done: cf.Conversion,
        max_drop: float) -> tuple[ir.Model, cf.Conversion, Search | None]:
    """``candidate`` when it meets the budget, else the search's result (None: no search made)."""
    d0 = drop(teacher, candidate)
    if d0 <= max_drop:
        return candidate, done, None
    try:
        ranked = rank(candidate, build.original_model(), teacher.held_out[0])
    except BadInputError as e:  # the candidate does not run: the check says so, nothing to search
        logger.debug("no budget search: %s", e)
        return candidate, done, None
    if not ranked:
        return candidate, done, None
    k, (candidate, done, d), builds = fewest(build, teacher, ranked, max_drop)
    kept = _keep(ranked, k)
    logger.debug("budget search: drop %.4g with every node fp16, %.4g with %d kept fp32", d0, d, len(kept))
    return candidate, done, Search(d0, ranked, kept, builds)


@dataclasses.dataclass
class Decision:
    """The staged check of ``convert``: the elementwise fp16 check (``fp16``, the report's
    ``validation`` block, information) and the budget (``budget``) decide together: the result is
    refused when it misses the budget or when the elementwise check found what no budget excuses
    (``hard``: inf/NaN where the original is finite, a model ORT cannot load or run, a crash)."""

    fp16: Any
    budget: BudgetResult | None

    @property
    def hard(self) -> list[str]:
        return [f"output '{o.name}': {o.reason}" for o in self.fp16.result.outputs
                if not o.ok and "values outside" not in (o.reason or "")]

    @property
    def ok(self) -> bool:
        return not self.hard and (self.budget is None or self.budget.ok)

    def summary(self) -> str:
        if self.hard:
            return "; ".join(self.hard)
        if self.budget is not None and not self.budget.ok:
            return self.budget.summary()
        return self.fp16.summary()

    def to_dict(self) -> dict:
        return self.fp16.to_dict()

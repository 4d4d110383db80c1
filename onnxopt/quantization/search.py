"""``onnxopt quantize --search``: evaluate candidate recipes and write the best within the budget.

Calibration runs once (the statistics, held-out and recovery batches of ``quantize.calibrate_model``
are shared); each candidate is a :class:`onnxopt.quantization.static.Recipe` built and scored with the
existing steps (``Quantizer.build``, ``Quantizer.score``).  The candidates vary

- the range method (percentile, minmax, entropy, mse) and per-channel / per-tensor weights,
- recovery (the default ``bias-correction,adaround``, or none),
- how many layers stay float from the sensitivity ranking (0, 1, 2, ... most sensitive first),

on top of the placement plain ``quantize`` starts from: the EP profile and ``--exclude``
(:func:`quantize.place`) and, with the latency guard on, the guard's float layers
(:func:`quantize.guard`), so the plain command's own result is among the candidates.  The
ranking is measured once, with the default settings on that placement, and only when a setting
misses the budget.

Order (:func:`grid`): settings likeliest to pay first (the default settings, then no recovery,
then the other methods, then per-tensor); for each setting, layers are kept float one more at a
time only while the accuracy budget is missed (at most ``MAX_FLOAT_EXTRA``), so an accurate
setting costs one candidate.  At most ``budget`` candidates are built, in that fixed order.
The float model is always measured too (a candidate with every layer float), so the result is
never slower than fp32 when the guard is on.

Each candidate is scored on accuracy (``--metric`` or the default fidelity, same as ``quantize``),
latency on ``--ep`` and size (serialized bytes).  Latency: every candidate's session is created
in this process, then runs go round-robin (one thread, fixed feeds, the starting model rotating
each round) and the median counts, so a machine that slows down slows all candidates alike.
Builds (quantize + score, and the sensitivity ranking's one-layer builds) run in parallel on
:class:`onnxopt.parallel.Workers` (``--workers`` local processes or Ray tasks with ``--ray``) while
nothing is being timed; :class:`Walk` keeps the result identical to a sequential search.  The
latency guard before and the round-robin latency measurement after run in this process alone.

The Pareto front (:func:`pareto_front`: accuracy up, latency down, size down) is reported; the
chosen candidate (:func:`choose`) is the fastest on the front within ``max_drop``.  Latency is
compared beyond noise (:func:`confidently_faster`): one candidate is faster than another only when
the ~95% interval of their median per-round time ratio lies below ``1 - LATENCY_TIE``; otherwise
they tie, on the front and in the choice, and ties go to the smaller, then the more accurate, then
the earlier candidate.  So candidates that differ only in range method (same graph, same speed)
are chosen by size and accuracy, not by timing noise.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import benchmark as bench
from onnxopt.errors import UsageError
from onnxopt.parallel import Workers
from onnxopt.quantization import qdq as qq
from onnxopt.quantization import static as qm

logger = logging.getLogger("onnxopt")

DEFAULT_BUDGET = qm.DEFAULT_SEARCH_BUDGET
#: at most this many extra layers kept float per setting (beyond the guard's)
MAX_FLOAT_EXTRA = 4
#: candidates whose median latencies are within this fraction of the fastest count as tied
LATENCY_TIE = 0.03
#: latency measurement: warm-up runs per model, rounds at most, seconds at most
WARMUP, ROUNDS, SECONDS = 3, 101, 30.0


# ---------------------------------------------------------------- the front and the choice

def dominates(a: Mapping, b: Mapping) -> bool:
    """``a`` is at least as accurate, as fast and as small as ``b`` and strictly better in one."""
    ge = a["accuracy"] >= b["accuracy"] and a["latency_ms"] <= b["latency_ms"] and a["bytes"] <= b["bytes"]
    gt = a["accuracy"] > b["accuracy"] or a["latency_ms"] < b["latency_ms"] or a["bytes"] < b["bytes"]
    return ge and gt


Faster = Callable[[int, int], bool]


def confidently_faster(samples: Sequence[Sequence[float]], margin: float = LATENCY_TIE) -> Faster:
    """``faster(i, j)``: point i is faster than j by more than ``margin``, with confidence: the
    ~95% order-statistics interval of the median per-round time ratio (rounds are paired: every
    model runs once per round) lies wholly below ``1 - margin`` (as ``Quantizer.compare_latency``)."""
    def faster(i: int, j: int) -> bool:
        _, hi = qm.median_ratio_interval(samples[i], samples[j])
        return hi < 1.0 - margin

    return faster


def pareto_front(points: Sequence[Mapping], faster: Faster | None = None) -> list[int]:
    """Indices of the points no other point dominates (maximize ``accuracy``, minimize
    ``latency_ms`` and ``bytes``), in input order.  Equal points dominate neither other: both stay.
    With ``faster`` (:func:`confidently_faster`), latency counts only where the difference is
    beyond noise: i dominates j when at least as accurate and small, not confidently slower, and
    strictly better in accuracy, size or confidently faster."""
    if faster is None:
        return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]

    def dom(i: int, j: int) -> bool:
        a, b = points[i], points[j]
        if not (a["accuracy"] >= b["accuracy"] and a["bytes"] <= b["bytes"]) or faster(j, i):
            return False
        return a["accuracy"] > b["accuracy"] or a["bytes"] < b["bytes"] or faster(i, j)

    front = [i for i in range(len(points)) if not any(dom(j, i) for j in range(len(points)) if j != i)]
    return front or pareto_front(points)  # a cycle of noisy comparisons: fall back to the medians


def choose(points: Sequence[Mapping], max_drop: float, reference: float, tie: float = LATENCY_TIE,
           faster: Faster | None = None) -> int | None:
    """Index of the fastest point on the front whose ``reference - accuracy <= max_drop``; points
    within ``tie`` (relative) of the fastest median latency, or with ``faster`` those the fastest
    is not confidently faster than, are tied and go to the more accurate, then the smaller, then
    the earlier.  None when no point meets the budget."""
    front = pareto_front(points, faster)
    ok = [i for i in front if reference - points[i]["accuracy"] <= max_drop + 1e-12]
    if not ok:
        return None
    best = min(ok, key=lambda i: (points[i]["latency_ms"], i))
    if faster is None:
        tied = [i for i in ok if points[i]["latency_ms"] <= points[best]["latency_ms"] * (1.0 + tie)]
    else:
        tied = [i for i in ok if not faster(best, i)]
    return min(tied, key=lambda i: (-points[i]["accuracy"], points[i]["bytes"], i))


# ---------------------------------------------------------------- the candidates

@dataclasses.dataclass(frozen=True)
class Setting:
    method: str
    per_channel: bool
    recovery: tuple[str, ...]

    def label(self) -> str:
        return (f"{self.method} {'per-channel' if self.per_channel else 'per-tensor'} "
                f"{'+'.join(self.recovery) or 'no recovery'}")


def grid(per_channel_ok: bool = True) -> list[Setting]:
    """Every setting, likeliest to pay first (deterministic)."""
    rec = qm.DEFAULT_RECOVERY
    out = [Setting("percentile", True, rec), Setting("percentile", True, ()),
           Setting("minmax", True, rec), Setting("entropy", True, rec), Setting("mse", True, rec),
           Setting("percentile", False, rec), Setting("minmax", True, ()), Setting("entropy", True, ()),
           Setting("mse", True, ()), Setting("minmax", False, rec), Setting("entropy", False, rec),
           Setting("mse", False, rec), Setting("percentile", False, ()), Setting("minmax", False, ()),
           Setting("entropy", False, ()), Setting("mse", False, ())]
    return [s for s in out if per_channel_ok or not s.per_channel]


@dataclasses.dataclass
class Candidate:
    id: int
    label: str
    recipe: qm.Recipe
    model: ir.Model | None  # the chosen one's, deserialized from model_bytes
    plan: qq.Plan
    model_bytes: bytes
    accuracy: float
    drop: float
    latency_ms: float = math.nan
    on_front: bool = False
    chosen: bool = False
    is_float: bool = False

    @property
    def bytes(self) -> int:
        return len(self.model_bytes)

    def point(self) -> dict:
        return {"accuracy": self.accuracy, "latency_ms": self.latency_ms, "bytes": self.bytes}

    def to_dict(self, max_drop: float) -> dict:
        r = self.recipe
        return {"id": self.id, "label": self.label,
                "recipe": {"method": r.method, "percentile": r.percentile if r.method == "percentile" else None,
                           "per_channel": r.per_channel, "recovery": list(r.build_recovery),
                           "float_layers": sorted(r.decisions.float_layers), "quantized_layers": len(self.plan.primary())},
                "accuracy": self.accuracy, "drop": self.drop, "meets_budget": self.drop <= max_drop + 1e-12,
                "latency_ms": self.latency_ms, "bytes": self.bytes, "on_front": self.on_front,
                "chosen": self.chosen, "float_model": self.is_float}


# ---------------------------------------------------------------- work done in the workers

@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of search work for :func:`run_job`: ``"adaround"`` (the rounded weights of
    ``setting``'s per_channel and ``qmax``), or ``"build"`` (quantize with ``setting``, every layer
    in ``exclude`` float, and score)."""

    kind: str
    setting: Setting
    percentile: float
    qmax: int
    exclude: frozenset[str] = frozenset()

    @property
    def rounding(self) -> tuple[bool, int]:
        return self.setting.per_channel, self.qmax


def variant(q: qm.Quantizer, job: Job, rounded: Mapping | None) -> qm.Quantizer:
    """``q`` with ``job``'s weights, recovery and ranges; ``rounded``: the adaround weights of its
    rounding (computed here when None and adaround is asked for)."""
    s = job.setting
    v = copy.copy(q)
    v.per_channel, v.recovery, v.qmax = s.per_channel, s.recovery, job.qmax
    v.ranges = q.stats.ranges(s.method, q.full_plan.stats_names(), p=job.percentile)
    v.adaround_weights = dict(rounded) if rounded is not None else None
    return v


def run_job(q: qm.Quantizer, job: Job, rounded: Mapping | None) -> Any:
    """A :class:`Job` on the (worker's copy of the) quantizer: the rounded weights, or
    ``{"bytes": serialized model, "score": ...}``."""
    v = variant(q, job, rounded)
    if job.kind == "adaround":
        return v.rounded_weights
    model, _ = v.build(job.exclude)
    data = qm.serialize(model)
    return {"bytes": data, "score": v.score(data)}


class Evaluator:
    """Runs jobs on :class:`onnxopt.parallel.Workers`, adaround weights computed once per rounding
    (the guard's are reused) and sent with the builds that need them."""

    def __init__(self, q: qm.Quantizer, pool: Workers):
        self.q, self.pool = q, pool
        self.rounded: dict[tuple[bool, int], Mapping] = {}
        if q.adaround_weights is not None:
            self.rounded[(q.per_channel, q.qmax)] = q.adaround_weights

    def builds(self, jobs: Sequence[Job]) -> list[dict]:
        """Each job's model bytes and score, in parallel (adaround first, one job per rounding)."""
        need = sorted({j.rounding for j in jobs if "adaround" in j.setting.recovery} - set(self.rounded))
        if need:
            first = {j.rounding: j for j in jobs}
            todo = [dataclasses.replace(first[r], kind="adaround") for r in need]
            for r, w in zip(need, self.pool.map(run_job, [(j, None) for j in todo])):
                self.rounded[r] = w
        return self.pool.map(run_job, [(j, self.rounded.get(j.rounding) if "adaround" in j.setting.recovery else None)
                                       for j in jobs])


def _recipe_for(base: qm.Recipe, setting: Setting, floats: Mapping[str, str]) -> qm.Recipe:
    decided = qm.Decisions(float_layers=dict(floats), latency_decisions=list(base.decisions.latency_decisions),
                           sensitivity=[dict(s) for s in base.decisions.sensitivity])
    return dataclasses.replace(base, method=setting.method, per_channel=setting.per_channel,
                               recovery=setting.recovery, decisions=decided)


def sensitivity(q: qm.Quantizer, ev: Evaluator, base: qm.Recipe, the_plan: qq.Plan) -> list[dict]:
    """Each int8 layer of ``the_plan`` ranked by the drop it causes alone (worst first), as
    :func:`quantize.budget` does; the layers are measured in parallel."""
    setting = Setting(base.method, base.per_channel, base.build_recovery)
    names = list(the_plan.primary())
    jobs = [Job("build", setting, base.percentile, base.qmax, frozenset(set(q.candidates) - {n})) for n in names]
    ranking = [{"layer": n, "kind": q.candidates[n], "drop": q.teacher.float_score - r["score"]}
               for n, r in zip(names, ev.builds(jobs))]
    ranking.sort(key=lambda s: -s["drop"])
    return ranking


def measure_latency(q: qm.Quantizer, models: Sequence[bytes]) -> list[list[float]]:
    """Per model, its ms per round: all sessions in this process, round-robin runs (every model
    once per round, the first model of a round rotating), one set of feeds, ``q.threads`` threads."""
    sessions, inputs = q.warm_sessions(list(models))  # the guard's warm sessions
    for s, f in zip(sessions, inputs):
        for _ in range(WARMUP):
            s.run(None, f)
    return bench.round_robin(list(zip(sessions, inputs)), ROUNDS, SECONDS, rotate=True, min_rounds=11)


@dataclasses.dataclass
class SearchResult:
    candidates: list[Candidate]
    chosen: Candidate
    float_candidate: Candidate
    ranking: list[dict]
    budget: int
    max_drop: float
    reference: float
    seconds: float
    parallelism: str = "in-process"
    #: builds done beyond the candidates (speculative ones the sequential order did not reach)
    discarded: int = 0

    def to_dict(self) -> dict:
        return {"budget": self.budget, "max_drop": self.max_drop, "reference_accuracy": self.reference,
                "evaluated": len(self.candidates), "chosen": self.chosen.id,
                "front": [c.id for c in self.candidates if c.on_front],
                "ranking": self.ranking, "seconds": self.seconds,
                "parallelism": f"candidates built and scored: {self.parallelism}; latency measured round-robin "
                               "in one process after the builds",
                "discarded_builds": self.discarded,
                "candidates": [c.to_dict(self.max_drop) for c in self.candidates]}


Key = tuple[Setting, int]


class Walk:
    """The candidates in the order of the sequential search (module docstring), replayed over
    the builds known so far.  Builds run in parallel batches: the first unknown builds the walk
    reaches (as many as run at once), assuming (optimistically) that an unknown build meets the
    budget, which ends its setting's chain and so reaches the most later settings.  When every
    build the walk reaches is known, the candidates are exactly those of a sequential run with the
    same budget (one worker: the sequential run itself); speculative builds it did not reach are
    discarded (counted in the report)."""

    def __init__(self, q: qm.Quantizer, recipe: qm.Recipe, start: Mapping[str, str], budget: int, max_drop: float,
                 has_targets: bool):
        self.q, self.recipe, self.start, self.budget, self.max_drop = q, recipe, dict(start), budget, max_drop
        self.has_targets = has_targets
        self.ranking: list[dict] | None = None
        self.known: dict[Key, dict] = {}

    def recipe_for(self, key: Key) -> qm.Recipe:
        setting, k = key
        floats = dict(self.start)
        for rank, s in enumerate((self.ranking or [])[:k], 1):
            floats[s["layer"]] = f"accuracy budget: sensitivity rank {rank} (drop {s['drop']:.4g} with only this layer int8)"
        return _recipe_for(self.recipe, setting, floats)

    def replay(self) -> tuple[list[Key], list[Key], bool]:
        """(candidates in order, builds needed, whether the sensitivity ranking is needed)."""
        built = 0 if self.has_targets else self.budget  # the guard put every layer in float: nothing to vary
        accepted: list[Key] = []
        needed: list[Key] = []
        for setting in grid(self.recipe.per_channel):
            for k in range(MAX_FLOAT_EXTRA + 1):
                if built >= self.budget:
                    return accepted, needed, False
                if k > 0 and self.ranking is None:  # needed before anything after it
                    return accepted, needed, True
                if k > len(self.ranking or []):
                    break
                built += 1
                if not qq.plan(self.q.model, self.recipe.profile, self.recipe_for((setting, k)).excluded()).targets:
                    break  # every layer float: the float model is already a candidate
                if (setting, k) not in self.known:
                    needed.append((setting, k))
                    break
                accepted.append((setting, k))
                if self.q.teacher.float_score - self.known[(setting, k)]["score"] <= self.max_drop:
                    break  # more float layers only cost latency
        return accepted, needed, False


def search(q: qm.Quantizer, recipe: qm.Recipe, max_drop: float, budget: int = DEFAULT_BUDGET, *,
           workers: int = 1, ray_address: str | None = None) -> SearchResult:
    """Evaluate up to ``budget`` candidates (plus the float model), pick one (module docstring).
    ``q`` is the Quantizer of ``recipe`` (the default settings); ``recipe`` gets the starting
    placement and the guard's decisions.  Builds run on ``workers`` local processes or Ray tasks
    (``ray_address``, onnxopt.parallel); the result does not depend on how many."""
    from onnxopt.commands.batch import ray_resources

    t0 = time.perf_counter()
    if budget < 1:
        raise UsageError(f"--budget {budget}: at least 1")
    qm.place(q, recipe)
    if recipe.latency_guard:
        qm.guard(q, recipe)
    q.input_means  # noqa: B018 - bias correction's input means: computed once here, sent to every worker
    base_plan = qq.plan(q.model, recipe.profile, recipe.excluded())
    walk = Walk(q, recipe, recipe.decisions.float_layers, budget, max_drop, bool(base_plan.targets))
    builds = 0
    with Workers(q, workers, ray_address, num_cpus=q.threads, resources=ray_resources({"ep": q.ep})) as pool:
        ev = Evaluator(q, pool)
        while True:
            accepted, needed, need_ranking = walk.replay()
            if need_ranking and not needed:
                walk.ranking = sensitivity(q, ev, recipe, base_plan)
                recipe.decisions.sensitivity = [dict(s) for s in walk.ranking]
                continue
            if not needed:
                break
            needed = needed[:pool.capacity]  # more at once would only speculate further ahead
            jobs = []
            for key in needed:
                r = walk.recipe_for(key)
                jobs.append(Job("build", key[0], r.percentile, r.qmax, frozenset(r.excluded())))
            for key, res in zip(needed, ev.builds(jobs)):
                walk.known[key] = res
            builds += len(jobs)
        parallelism = pool.mode

    all_float = {n: "search: every layer float (the float model)" for n in q.candidates}
    float_recipe = _recipe_for(recipe, Setting(recipe.method, recipe.per_channel, recipe.build_recovery), all_float)
    assert isinstance(q.float_bytes, bytes)  # --search is static int8 only, below LIGHT_ABOVE (load_input)
    float_c = Candidate(0, "float model", float_recipe, q.model, qq.plan(q.model, recipe.profile, frozenset(q.candidates)),
                        q.float_bytes, q.teacher.float_score, 0.0, is_float=True)
    candidates = [float_c]
    for key in accepted:
        r, res = walk.recipe_for(key), walk.known[key]
        c = Candidate(len(candidates), f"{key[0].label()}, +{key[1]} float", r, None,
                      qq.plan(q.model, recipe.profile, r.excluded()), res["bytes"], res["score"],
                      q.teacher.float_score - res["score"])
        candidates.append(c)
        logger.info("search %d: %s: score %.5f (drop %.4g)", c.id, c.label, c.accuracy, c.drop)
    samples = measure_latency(q, [c.model_bytes for c in candidates])
    for c, t in zip(candidates, samples):
        c.latency_ms = float(np.median(t))
    points = [c.point() for c in candidates]
    faster = confidently_faster(samples)
    for i in pareto_front(points, faster):
        candidates[i].on_front = True
    idx = choose(points, max_drop, q.teacher.float_score, faster=faster)
    if idx is None:  # cannot happen: the float model has drop 0
        idx = 0
    chosen = candidates[idx]
    chosen.chosen = True
    if chosen.model is None:
        chosen.model = ir.serde.deserialize_model(onnx.load_model_from_string(chosen.model_bytes))
    ranking = walk.ranking or []
    chosen.recipe.decisions.sensitivity = [dict(s) for s in ranking]
    for s in chosen.recipe.decisions.sensitivity:
        if s["layer"] in chosen.recipe.decisions.float_layers and not chosen.is_float:
            s["kept_float"] = True
    return SearchResult(candidates, chosen, float_c, ranking, budget, max_drop, q.teacher.float_score,
                        time.perf_counter() - t0, parallelism, builds - (len(candidates) - 1))


def run_search(q: qm.Quantizer, recipe: qm.Recipe, max_drop: float, budget: int, *, workers: int = 1,
               ray_address: str | None = None) -> tuple[qm.Recipe, ir.Model, qq.Plan, dict, bool, SearchResult]:
    """:func:`search`, then what ``quantize.run`` writes: the chosen recipe, model, plan, latency
    record (float vs chosen, from the round-robin measurement) and whether it is the float model."""
    result = search(q, recipe, max_drop, budget, workers=workers, ray_address=ray_address)
    c, f = result.chosen, result.float_candidate
    latency = {"float_ms": f.latency_ms, "quantized_ms": c.latency_ms, "verdict": None,
               "ratio": c.latency_ms / f.latency_ms if f.latency_ms else None, "measured": "search round-robin"}
    assert c.model is not None  # search() loads the chosen candidate's model
    return c.recipe, c.model, c.plan, latency, c.is_float, result

"""Steps 3-5 of static quantization (see onnxopt.quantization.static): placement, the latency guard,
the accuracy budget and the final latency check, over a :class:`~onnxopt.quantization.static.Quantizer`."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxopt.errors import BadInputError
from onnxopt.quantization import latency_cache as costmodel
from onnxopt.quantization import qdq as qq
from onnxopt.quantization.recipe import (
    CLEAR,
    KIND_ORDER,
    LATENCY_MARGIN,
    LAYER_BLOCKS,
    PER_LAYER_GUARD,
    RANK_AHEAD,
    RANK_WORKERS,
    SURE,
    Recipe,
    serialize,
    session_source,
)

if TYPE_CHECKING:
    from onnxopt.quantization.static import Quantizer

logger = logging.getLogger("onnxopt")


def place(q: Quantizer, recipe: Recipe) -> None:
    """Step 3: the starting placement in ``recipe.decisions.float_layers``: layer kinds the EP profile runs
    slower in int8, and ``recipe.exclude`` (which no later step puts back in int8)."""
    for name, kind in q.candidates.items():
        if kind in recipe.profile.float_kinds:
            recipe.decisions.float_layers.setdefault(name, f"{kind} starts in float on {recipe.ep} (EP profile: slower in int8)")
    nodes = {n.name for n in q.model.graph}
    for name in recipe.exclude:
        recipe.decisions.float_layers[name] = "--exclude"
        if name not in nodes:
            logger.warning("--exclude '%s': the prepared model has no node of that name", name)


def check_replay(q: Quantizer, recipe: Recipe) -> None:
    """A replayed recipe must name this model's nodes (not another model's)."""
    nodes = {n.name for n in q.model.graph}
    unknown = sorted(set(recipe.decisions.float_layers) - nodes)
    if unknown:
        raise BadInputError(f"recipe {recipe.decisions.replayed_from or ''}: float layer '{unknown[0]}' is not a node of this "
                            f"model ({len(unknown)} unknown; a recipe of another model?)")


# ---------------------------------------------------------------- 4. latency guard

def guard(q: Quantizer, recipe: Recipe) -> None:
    """Step 4: :func:`guard_kinds`, then :func:`guard_layers`, both deciding the clear cases from
    the cost model's region timings (``Quantizer.regions``; none when ``q.cost_model`` is off)."""
    costs = q.regions() if q.cost_model else {}
    guard_kinds(q, recipe, costs)
    guard_layers(q, recipe, costs)


def predict_kind(members: set[str], costs: Mapping[str, costmodel.Region], float_ms: float) -> dict | None:
    """The cost model's verdict on a layer kind, or None when its regions leave it open (or a
    member has no region timing).  ``float``: its layers take less than LATENCY_MARGIN of the fp32
    time, so no int8 form can pay the margin; ``int8``: their int8 regions (pessimistic: each
    pays its own Q/DQ) save more than LATENCY_MARGIN + CLEAR of the fp32 time, none of them
    estimated from MACs.  The record has
    the measured decisions' keys (``float_ms`` the fp32 model's, ``quantized_ms`` and ``ratio``
    predicted) plus ``cost_model``, ``float_share`` and the regions read from the cache or estimated."""
    if not members or any(n not in costs for n in members) or float_ms <= 0:
        return None
    share = sum(costs[n].float_ms for n in members) / float_ms
    saving = sum(costs[n].saving_ms for n in members) / float_ms
    # a region estimated from MACs (not timed) is not pessimistic: it never makes a kind clearly
    # faster, and counts twice toward the share that must stay under the margin
    estimated = sum(costs[n].float_ms for n in members if costs[n].estimated) / float_ms
    record = {"cost_model": True, "float_ms": float_ms, "quantized_ms": float_ms * (1.0 - saving), "ratio": 1.0 - saving,
              "float_share": share, "regions_cached": sum(costs[n].cached for n in members),
              "regions_estimated": sum(costs[n].estimated for n in members)}
    if share + estimated < LATENCY_MARGIN:
        return {**record, "verdict": "cost model: below the margin", "quantized": False}
    if saving > LATENCY_MARGIN + CLEAR and not estimated:
        return {**record, "verdict": "cost model: clearly faster", "quantized": True}
    return None


def guard_kinds(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region] | None = None) -> None:
    """Each layer kind (KIND_ORDER) in int8 vs in float on the target EP: it stays int8 only when
    confidently faster by more than LATENCY_MARGIN (a tie goes to float).  The cost model
    (:func:`predict_kind`) decides the clear kinds without building or running the model.
    ``--exclude`` layers are not tried."""
    user = set(recipe.exclude)
    costs = costs or {}
    fp32_ms = q.float_latency() if costs else 0.0
    for kind in KIND_ORDER:
        members = {n for n, k in q.candidates.items() if k == kind and n not in user}
        if not members:
            continue
        predicted = predict_kind(members, costs, fp32_ms)
        if predicted is not None:
            keep = predicted["quantized"]
            recipe.decisions.latency_decisions.append({"kind": kind, "layers": len(members), **predicted})
            why = (f"latency guard (cost model): {kind} layers are {predicted['float_share']:.1%} of the fp32 time, "
                   f"below the {LATENCY_MARGIN:.0%} margin")
        else:
            excluded = recipe.excluded()
            with_q = serialize(q.build(excluded - members)[0])
            without = serialize(q.build(excluded | members)[0])
            c = q.compare_latency(with_q, without)
            keep = c["verdict"] == "faster"  # a tie goes to float: int8 must pay clearly
            recipe.decisions.latency_decisions.append({"kind": kind, "layers": len(members), "quantized_ms": c["a_ms"],
                                             "float_ms": c["b_ms"], "ratio": c["ratio"], "interval": c["interval"],
                                             "pairs": c["pairs"], "verdict": c["verdict"], "quantized": bool(keep)})
            why = f"latency guard: {kind} layers not faster in int8 on {recipe.ep} ({c['verdict']}, time ratio {c['ratio']:.3f})"
        for name in members:
            if keep:
                recipe.decisions.float_layers.pop(name, None)
            else:
                recipe.decisions.float_layers[name] = why


def guard_layers(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region] | None = None,
                 base: bytes | None = None) -> None:
    """Layer by layer: back to float only when that is clearly faster, since a kind that pays
    overall may hold single layers that do not (e.g. a 1-channel stem).  A layer whose timed int8
    region costs less than SURE x LATENCY_MARGIN of the current placement's measured time more
    than its float region stays int8 without a measurement (going float cannot save the margin:
    its region is pessimistic); the others (regions estimated from MACs included) are measured,
    when at most PER_LAYER_GUARD.  ``base``: the current placement, serialized, when the caller has
    it built."""
    costs = costs or {}
    quantized = [n for n in q.candidates if n not in recipe.decisions.float_layers]
    if not quantized or (not costs and len(quantized) > PER_LAYER_GUARD):
        if quantized:
            logger.info("latency guard: %d int8 layers (> %d), not tried one by one", len(quantized), PER_LAYER_GUARD)
        return
    if base is None:
        base = serialize(q.build(recipe.excluded())[0])
    if costs:  # the base placement's time, measured: the margin is of it
        base_ms = q.latency([base], runs=11)[0]
        quantized = [n for n in quantized if n not in costs or costs[n].estimated
                     or -costs[n].saving_ms >= SURE * LATENCY_MARGIN * base_ms]
        if len(quantized) > PER_LAYER_GUARD:
            logger.info("latency guard: %d int8 layers to try (> %d), not tried one by one", len(quantized), PER_LAYER_GUARD)
            return
    for name in quantized:
        trial = serialize(q.build(recipe.excluded() | {name})[0])
        # back to float only when that is clearly faster; one layer rarely is, so no extra blocks
        c = q.compare_latency(trial, base, max_blocks=LAYER_BLOCKS)
        if c["verdict"] == "faster":
            recipe.decisions.float_layers[name] = f"latency guard: the model is faster with this layer in float on {recipe.ep}"
            base = trial
            recipe.decisions.latency_decisions.append({"layer": name, "quantized_ms": c["b_ms"], "float_ms": c["a_ms"],
                                             "ratio": 1.0 / c["ratio"], "pairs": c["pairs"], "verdict": "float faster",
                                             "quantized": False})


def guard_budgeted(q: Quantizer, recipe: Recipe, costs: Mapping[str, costmodel.Region], candidate: ir.Model,
                   the_plan: qq.Plan, max_drop: float) -> tuple[ir.Model, qq.Plan]:
    """:func:`guard_layers` after the accuracy budget, on the layers the budget left int8 (the plain
    command's order: a layer the budget keeps float is never timed; the budget's candidate is the
    base placement).  Going float only removes rounding, so the budget still holds up to noise: the
    new placement is built and scored, and when it misses ``max_drop`` the guard's moves are undone
    (their decisions say so) and the budget's candidate stays.  Returns the candidate and its plan."""
    before = dict(recipe.decisions.float_layers)
    decisions = len(recipe.decisions.latency_decisions)
    guard_layers(q, recipe, costs, base=serialize(candidate))
    if recipe.decisions.float_layers.keys() == before.keys():
        return candidate, the_plan
    moved, the_plan_moved = q.build(recipe.excluded())
    drop = q.drop(moved)
    if drop <= max_drop:
        return moved, the_plan_moved
    logger.info("latency guard: the layers it moved to float push the drop to %.4g > %g; they stay int8", drop, max_drop)
    recipe.decisions.float_layers = before
    for d in recipe.decisions.latency_decisions[decisions:]:
        d.update(quantized=True, verdict="float faster, but over the accuracy budget")
    return candidate, the_plan


# ---------------------------------------------------------------- 5. accuracy budget, final latency check

def fewest_float(q: Quantizer, excluded: frozenset, ranked: list[str],
                 max_drop: float) -> tuple[int, tuple[ir.Model, qq.Plan, float]]:
    """The fewest of the ``ranked`` layers (worst first) to keep float, besides ``excluded``, so the
    drop is within ``max_drop``: binary search on that count k, which assumes the drop falls as k
    grows (up to noise; the answer's candidate is the one built and scored, and only it is kept in
    memory); k = 0 is known to miss the budget.  Returns k and (candidate, plan, drop); all of
    them when no smaller k holds.  About log2(len(ranked)) builds.  Shared by every mode's budget."""
    best: tuple[ir.Model, qq.Plan, float] | None = None
    lo, hi = 0, len(ranked)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        cand, plan_k = q.build(excluded | set(ranked[:mid]))
        d = q.drop(cand)
        if d <= max_drop:
            hi, best = mid, (cand, plan_k, d)
        else:
            lo = mid
        del cand
    if best is None:  # only k = len(ranked) is left (never built: the loop tries k < hi)
        cand, plan_k = q.build(excluded | set(ranked))
        best = (cand, plan_k, q.drop(cand))
    return hi, best


def sensitivity(q: Quantizer, names: Sequence[str]) -> list[dict]:
    """Each layer of ``names`` with the drop it causes as the only int8 layer, worst first (one
    build and one scoring per layer).

    Pipelined: this thread builds and serializes the next layers' models (Python: it holds the GIL)
    while RANK_WORKERS threads load and score the previous ones (ORT, which releases the GIL while
    it optimizes and runs a model), one when ORT's sessions have more than one thread each.  On
    the 2-core CI machine the small GPT-2's 25 layers take 2.95-3.05 s instead of 4.4-4.9 s one
    after the other.  The scores are those of one after the other: every model has a session of its
    own and the same data.  At most RANK_AHEAD built models wait (memory stays bounded; a model
    shares its float weights with the prepared one).  A user ``--metric`` is called in this thread,
    one model after the other (user code may not be thread-safe)."""
    if q.teacher.metric is not None:
        ranking = [{"layer": n, "kind": q.candidates[n], "drop": q.drop(q.build(frozenset(set(q.candidates) - {n}))[0])}
                   for n in names]
        return sorted(ranking, key=lambda s: -s["drop"])
    drops: dict[str, float] = {}
    pending: collections.deque = collections.deque()
    workers = RANK_WORKERS if q.threads == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxopt-rank") as pool:
        try:
            for name in names:
                alone, _ = q.build(frozenset(set(q.candidates) - {name}))
                pending.append((name, pool.submit(q.score, q.source(alone))))
                del alone
                while len(pending) > RANK_AHEAD:
                    done, future = pending.popleft()
                    drops[done] = q.teacher.float_score - future.result()
            for done, future in pending:
                drops[done] = q.teacher.float_score - future.result()
        finally:
            for _, future in pending:
                future.cancel()
    ranked: list[dict] = [{"layer": n, "kind": q.candidates[n], "drop": drops[n]} for n in names]
    ranked.sort(key=lambda s: -s["drop"])
    return ranked


def budget(q: Quantizer, recipe: Recipe, max_drop: float) -> tuple[ir.Model, qq.Plan, float]:
    """Step 5: build the recipe's placement and score it; over ``max_drop``, rank its int8 layers by
    the drop each causes alone (``recipe.decisions.sensitivity``) and keep the fewest of the worst in float
    that meet the budget (binary search: about log2(layers) builds; all of them when none does).
    Returns the candidate, its plan and its drop."""
    candidate, the_plan = q.build(recipe.excluded())
    drop = q.drop(candidate)
    recipe.decisions.sensitivity = []
    if drop <= max_drop:
        return candidate, the_plan, drop
    del candidate
    recipe.decisions.sensitivity = sensitivity(q, list(the_plan.primary()))
    hi, (candidate, the_plan, drop) = fewest_float(q, recipe.excluded(), [s["layer"] for s in recipe.decisions.sensitivity], max_drop)
    for rank, s in enumerate(recipe.decisions.sensitivity[:hi], 1):
        recipe.decisions.float_layers[s["layer"]] = (f"accuracy budget: sensitivity rank {rank} (drop {s['drop']:.4g} "
                                           f"with only this layer int8)")
        s["kept_float"] = True
    return candidate, the_plan, drop


def final_check(q: Quantizer, recipe: Recipe, candidate: ir.Model, the_plan: qq.Plan,
                decide: bool = True) -> tuple[ir.Model, qq.Plan, dict, bool]:
    """The candidate vs fp32 on the EP (paired runs, margin 0).  With ``decide`` and the latency
    guard on, a candidate not confidently faster gives way to the float model (every layer float).
    Returns the model to write, its plan, the latency record and whether it is the float model."""
    if not the_plan.targets:  # every layer ended in float: the candidate is the prepared float model
        t = q.latency([q.float_bytes], runs=25)[0]
        return q.model, the_plan, {"float_ms": t, "quantized_ms": t, "verdict": None}, True
    c = q.compare_latency(session_source(candidate), q.float_bytes, margin=0.0)
    latency = {"float_ms": c["b_ms"], "quantized_ms": c["a_ms"], "verdict": c["verdict"], "ratio": c["ratio"],
               "interval": c["interval"], "pairs": c["pairs"]}
    if c.get("unpaired"):  # a float model over LIGHT_ABOVE, timed before its session was released
        latency["unpaired_runs"] = c["unpaired"]
    if not (decide and recipe.latency_guard) or c["verdict"] == "faster":
        return candidate, the_plan, latency, False
    logger.warning("the quantized model is not confidently faster than fp32 on %s (%.3f vs %.3f ms); "
                   "writing the float model", recipe.ep, c["a_ms"], c["b_ms"])
    for name in q.candidates:
        recipe.decisions.float_layers.setdefault(name, f"final check: the int8 model was not confidently faster than fp32 "
                                             f"on {recipe.ep} ({c['verdict']}); the float model is written")
    latency["quantized_ms"] = latency["float_ms"]
    return q.model, q.plan(recipe.excluded()), latency, True


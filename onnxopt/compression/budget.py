"""The highest sparsity within the accuracy budget (``prune --sparsity S`` / ``compress --sparsity S``).

The asked sparsity is built and scored first; when it misses ``--max-drop`` (and neither
``--strict`` nor ``--force`` was given) a binary search over the global fraction in (0, S) looks
for the highest one that meets it: at most :data:`STEPS` steps, each a full build (prune, refit,
and for compress the clustering) scored on the held-out batches, fractions on a grid of
:data:`RESOLUTION` (asked 0.50: 0.25, 0.37 or 0.12, ...).  Nothing here knows how a candidate is
built or scored: the callers pass ``build(sparsity)`` and ``drop(candidate)``.

``compress --cluster K`` has its own steps when K values miss the budget (:func:`more_clusters`): the
count doubles up to 256, then the layers clustering moves most stay unclustered (the scorer passed in
has ``drop(model)`` and ``opts``; ``build(k, skip=())`` clusters every layer but ``skip`` to k values).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger("onnxopt")

#: search steps at most (each one prune + refit + score), and the grid of the fractions tried
STEPS, RESOLUTION = 6, 0.01
C = TypeVar("C")


@dataclasses.dataclass
class Reached(Generic[C]):
    """What the search settled on: the candidate written (the asked one when it met the budget or
    nothing lower did), the fractions asked and reached (None: nothing met the budget), every trial
    (``sparsity``, ``drop``, ``ok``) in the order tried, and the line that says so (None when the
    asked sparsity was written as asked)."""

    candidate: C
    asked: float
    reached: float | None
    trials: list[dict]
    message: str | None = None

    def to_dict(self) -> dict:
        return {"asked": self.asked, "reached": self.reached, "trials": self.trials, "message": self.message}


def grid_midpoint(lo: float, hi: float, resolution: float = RESOLUTION) -> float:
    """The grid point at or just below the middle of (lo, hi) (``lo`` or ``hi`` itself when none lies between)."""
    return math.floor((lo + hi) / 2 / resolution + 1e-9) * resolution


def highest_within(asked: float, build: Callable[[float], C], drop: Callable[[C], float], max_drop: float, *,
                   search: bool = True, steps: int = STEPS) -> Reached[C]:
    """``build(asked)``, or when its ``drop`` exceeds ``max_drop`` and ``search``, the highest
    sparsity below ``asked`` whose build meets it (binary search; module docstring)."""
    first = build(asked)
    d = drop(first)
    trials = [{"sparsity": asked, "drop": d, "ok": d <= max_drop}]
    if d <= max_drop or not search:
        return Reached(first, asked, asked if d <= max_drop else None, trials)
    lo, hi = 0.0, asked
    best: tuple[float, C] | None = None
    for _ in range(steps):
        mid = round(grid_midpoint(lo, hi), 6)
        if mid <= lo or mid >= hi:
            break
        candidate = build(mid)
        d = drop(candidate)
        ok = d <= max_drop
        trials.append({"sparsity": mid, "drop": d, "ok": ok})
        logger.info("sparsity %.2f: drop %.4g (%s --max-drop %g)", mid, d, "within" if ok else "over", max_drop)
        if ok:
            lo, best = mid, (mid, candidate)
        else:
            hi = mid
    if best is None:
        lowest = min(t["sparsity"] for t in trials)
        logger.warning("no sparsity tried (down to %.2f) meets --max-drop %g", lowest, max_drop)
        return Reached(first, asked, None, trials)
    message = f"asked {asked:.2f}, reached {best[0]:.2f} within --max-drop {max_drop:g}"
    return Reached(best[1], asked, best[0], trials, message)


def more_clusters(scorer: Any, asked: int, build: Callable[..., Any], candidate: Any) -> tuple[Any, dict]:
    """Never empty-handed: when the clustered candidate misses --max-drop (and neither --strict nor
    --force), the cluster count doubles up to 256 until a build meets it; at 256, the layers whose
    weights clustering moves most (relative error) are left unclustered, the fewest that meet it
    (binary search over that ranking).  Returns (that build or None, the search's record: asked,
    reached, trials, unclustered layers, the one line said).  At most log2(256 / asked) + log2(layers)
    + 1 builds."""
    opts = scorer.opts
    drop = scorer.drop(candidate)
    record: dict = {"asked": asked, "reached": asked, "trials": [{"clusters": asked, "drop": drop}], "message": None,
                    "unclustered": []}
    if drop <= opts.max_drop or opts.strict or opts.force:
        return None, record
    k, built = asked, None
    while k < 256:
        k *= 2
        built = build(k)
        drop = scorer.drop(built[0])
        record["trials"].append({"clusters": k, "drop": drop})
        if drop <= opts.max_drop:
            record["reached"] = k
            record["message"] = f"asked --cluster {asked}, reached {k} within --max-drop {opts.max_drop:g}"
            logger.info("%s (--strict refuses instead)", record["message"])
            return built, record
    built = built or build(256)
    return fewest_unclustered(scorer, asked, build, built, record)


def fewest_unclustered(scorer: Any, asked: int, build: Callable[..., Any], built: Any, record: dict) -> tuple[Any, dict]:
    """:func:`more_clusters`' last step at 256 clusters: rank the layers by how far clustering moves their
    weights, then find the fewest of the worst to leave unclustered so the build meets --max-drop."""
    opts = scorer.opts
    moved = {r["layer"]: float(np.linalg.norm(r["codebook"][r["indices"]].astype(np.float64) - r["dense"])
                               / (np.linalg.norm(r["dense"]) or 1.0)) for r in built[3]}
    ranked = sorted(moved, key=lambda name: -moved[name])
    lo, hi, best = 1, len(ranked), None
    while lo <= hi:  # the smallest n whose build (the n worst left unclustered) meets the budget
        mid = (lo + hi) // 2
        trial = build(256, tuple(ranked[:mid]))
        drop = scorer.drop(trial[0])
        record["trials"].append({"clusters": 256, "unclustered": mid, "drop": drop})
        if drop <= opts.max_drop:
            best, hi = (mid, trial), mid - 1
        else:
            lo = mid + 1
    if best is None:
        record["reached"] = None
        return None, record
    n, trial = best
    record["reached"], record["unclustered"] = 256, ranked[:n]
    record["message"] = (f"asked --cluster {asked}, reached 256 with {n} of {len(ranked)} layer(s) left unclustered "
                         f"within --max-drop {opts.max_drop:g}")
    logger.warning("%s (--strict refuses instead)", record["message"])
    return trial, record

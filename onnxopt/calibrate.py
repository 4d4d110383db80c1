"""Streaming calibration statistics: running min/max and fixed-range histograms.

``collect`` runs the model once per batch through ONNX Runtime with the wanted tensors as extra
outputs and folds each batch into a ``TensorStats`` before the next one is read: activations are
never kept, so memory is O(tensors x bins) whatever the number of batches.

Histograms have a fixed number of bins (default 2048) over a range that only grows.  When a batch
falls outside it, the range is extended to the left by a whole number of bins and the bin width is
multiplied by a power of two, so every old bin maps into exactly one new bin (exact re-binning, no
smearing).  Range methods (``Stats.ranges``) read only the histogram:

- ``minmax``: the observed range;
- ``percentile{p=99.99}``: the p-th / (100-p)-th percentiles (the low end stays at the minimum for
  non-negative tensors);
- ``entropy``: TensorRT's KL-divergence threshold search on the |x| histogram (128 levels for
  signed tensors, 256 for non-negative), stride 8 over the 2048 bins;
- ``mse``: the clip range, scanned over 128 candidates, that minimizes the expected error of 8-bit
  quantization (rounding error inside, clipping error outside).

Statistics are saved to / loaded from ``.npz`` (``Stats.save`` / ``Stats.load``) so a user can
calibrate once and try several recipes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from onnxopt.errors import BadInputError, UsageError

logger = logging.getLogger("onnxopt")

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048
FORMAT = "onnxopt-calibration/1"


@dataclasses.dataclass
class TensorStats:
    """Running statistics of one tensor.  ``hist[i]`` counts values in [lo + i*width, lo + (i+1)*width)."""

    min: float = math.inf
    max: float = -math.inf
    lo: float = 0.0
    width: float = 0.0
    hist: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray, bins: int = DEFAULT_BINS) -> None:
        """Fold one batch in.  Cost: O(x.size) plus O(bins) for a re-bin."""
        x = np.asarray(x)
        if x.size == 0:
            return
        flat = x.reshape(-1).astype(np.float32, copy=False)
        bmin, bmax = float(flat.min()), float(flat.max())
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            raise ValueError("NaN or Inf")
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        if self.hist is None:
            span = bmax - bmin
            self.lo = bmin
            self.width = (span if span > 0 else max(abs(bmin), 1e-6) * 1e-3) / bins * (1 + 1e-6)
            self.hist = np.zeros(bins, np.int64)
        else:
            self._grow(bmin, bmax)
        idx = np.minimum(((flat - self.lo) / self.width).astype(np.int64), len(self.hist) - 1)
        self.hist += np.bincount(np.maximum(idx, 0), minlength=len(self.hist))
        self.count += flat.size

    @property
    def _hist(self) -> np.ndarray:
        """``hist`` for the methods that only run once data arrived (``range`` checks; ``update``
        sets it before growing it): a pure typing cast."""
        return cast(Any, self.hist)

    def _grow(self, bmin: float, bmax: float) -> None:
        """Extend the range to cover [bmin, bmax]: shift left by whole bins, then double the width
        until the top is covered; old bin i goes to new bin (i + shift) // factor."""
        bins = len(self._hist)
        hi = self.lo + bins * self.width
        if bmin >= self.lo and bmax < hi:
            return
        shift = max(0, math.ceil((self.lo - bmin) / self.width))
        new_lo = self.lo - shift * self.width
        factor = 1
        while new_lo + bins * self.width * factor <= max(bmax, hi):
            factor *= 2
        idx = (np.arange(bins) + shift) // factor
        self.hist = np.bincount(idx, weights=self.hist, minlength=bins)[:bins].astype(np.int64)
        self.lo, self.width = new_lo, self.width * factor

    # ------------------------------------------------------------ range methods

    def centers(self) -> np.ndarray:
        return self.lo + (np.arange(len(self._hist)) + 0.5) * self.width

    def range(self, method: str = "minmax", p: float = 99.99, levels: int = 256) -> tuple[float, float]:
        """The clip range [lo, hi] for ``method`` (see module docstring); always contains 0."""
        if self.hist is None:
            raise BadInputError("no calibration data reached this tensor")
        lo, hi = self.min, self.max
        if method == "percentile":
            lo, hi = self._percentile(p)
        elif method == "entropy":
            lo, hi = self._symmetric_clip(self._kl_threshold())
        elif method == "mse":
            lo, hi = self._mse_range(levels)
        elif method != "minmax":
            raise UsageError(f"unknown calibration method '{method}' ({', '.join(METHODS)})")
        return min(lo, 0.0), max(hi, 0.0)

    def _percentile(self, p: float) -> tuple[float, float]:
        cdf = np.cumsum(self._hist) / max(1, self._hist.sum())
        c = self.centers() + self.width / 2  # upper edges
        hi = float(c[min(int(np.searchsorted(cdf, p / 100.0)), len(c) - 1)])
        lo = self.min if self.min >= 0 else float(self.lo + self.width * np.searchsorted(cdf, 1 - p / 100.0))
        return max(lo, self.min), min(hi, self.max)

    def _abs_hist(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, max|x|] with the same number of bins (bin centers re-mapped)."""
        top = max(abs(self.min), abs(self.max), 1e-12)
        bins = len(self._hist)
        idx = np.minimum((np.abs(self.centers()) / top * bins).astype(np.int64), bins - 1)
        return np.bincount(idx, weights=self.hist, minlength=bins), top / bins

    def _kl_threshold(self) -> float:
        """TensorRT-style: the |x| threshold whose 128/256-level quantization of the clipped
        distribution has the least KL divergence from it.  Cost: O(bins^2 / stride)."""
        hist, width = self._abs_hist()
        if len(hist) > 1:  # zero is exact whatever the range: a spike there (ReLU) must not pull the threshold in
            hist[0] = min(hist[0], hist[1])
        levels = 256 if self.min >= 0 else 128
        bins = len(hist)
        if bins <= levels:
            return bins * width
        best, best_i = math.inf, bins
        for i in range(levels, bins + 1, 8):
            ref = hist[:i].astype(np.float64).copy()
            ref[i - 1] += hist[i:].sum()
            nonzero = hist[:i] > 0
            # quantize hist[:i] into `levels` groups, spread each group's mass over its non-zero bins
            groups = np.arange(i) * levels // i
            mass = np.bincount(groups, weights=hist[:i], minlength=levels)
            support = np.bincount(groups, weights=nonzero, minlength=levels)
            q = np.where(nonzero, mass[groups] / np.maximum(support[groups], 1), 0.0)
            p_sum, q_sum = ref.sum(), q.sum()
            if p_sum == 0 or q_sum == 0:
                continue
            pn, qn = ref / p_sum, q / q_sum
            mask = pn > 0
            kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
            if kl < best:
                best, best_i = kl, i
        return best_i * width

    def _symmetric_clip(self, t: float) -> tuple[float, float]:
        return max(self.min, -t), min(self.max, t)

    def _mse_range(self, levels: int) -> tuple[float, float]:
        """Scan clip ranges r*[min, max] (r in (0, 1]) for the least expected quantization MSE."""
        c, w = self.centers(), self._hist.astype(np.float64)
        best, best_r = math.inf, 1.0
        for r in np.linspace(0.2, 1.0, 128):
            lo, hi = min(self.min * r, 0.0), max(self.max * r, 0.0)
            scale = (hi - lo) / (levels - 1) or 1e-12
            clipped = np.clip(c, lo, hi)
            err = np.sum(w * ((c - clipped) ** 2 + scale * scale / 12.0))
            if err < best:
                best, best_r = err, r
        return self.min * best_r, self.max * best_r


@dataclasses.dataclass
class Stats:
    """Statistics of many tensors, plus where they came from."""

    tensors: dict[str, TensorStats]
    batches: int = 0
    bins: int = DEFAULT_BINS
    source: str = ""

    def ranges(self, method: str = "minmax", names: Iterable[str] | None = None, p: float = 99.99) -> dict[str, tuple[float, float]]:
        wanted = self.tensors if names is None else {n: self.tensors[n] for n in names if n in self.tensors}
        return {n: t.range(method, p) for n, t in wanted.items()}

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {}
        tensors: list[dict] = []
        meta = {"format": FORMAT, "batches": self.batches, "bins": self.bins, "source": self.source, "tensors": tensors}
        for i, (name, t) in enumerate(self.tensors.items()):
            tensors.append({"name": name, "min": t.min, "max": t.max, "lo": t.lo, "width": t.width,
                                    "count": t.count})
            if t.hist is not None:
                arrays[f"hist{i}"] = t.hist
        tmp = Path(str(path) + ".tmp.npz")
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"not an {FORMAT} file")
                tensors = {}
                for i, m in enumerate(meta["tensors"]):
                    tensors[m["name"]] = TensorStats(m["min"], m["max"], m["lo"], m["width"], z.get(f"hist{i}"), m["count"])
        except (OSError, ValueError, KeyError) as e:
            raise BadInputError(f"{path}: cannot read calibration statistics: {e}") from None
        return cls(tensors, meta["batches"], meta["bins"], meta.get("source", ""))


def check_finite(feeds: Mapping[str, np.ndarray], where: str) -> None:
    """One BadInputError line when a float input of ``feeds`` holds NaN or Inf (``where``: which batch)."""
    for k, v in feeds.items():
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            raise BadInputError(f"{where}: input '{k}' contains NaN or Inf")


def collect(sess, names: list[str], feeds_iter: Iterable[Mapping[str, np.ndarray]], *,
            bins: int = DEFAULT_BINS, progress: Callable[[int], None] | None = None,
            extra: Sequence[str] = (), on_batch: Callable[[dict[str, np.ndarray]], None] | None = None) -> Stats:
    """Run ``sess`` (a session whose outputs include ``names`` and ``extra``) on every batch of
    ``feeds_iter`` and fold the ``names`` tensors into statistics, calling ``on_batch`` with the
    batch's outputs (``names`` and ``extra``) and ``progress(1)`` after each batch.  Memory: one
    batch's activations (plus what ``on_batch`` keeps) + O(len(names) x bins).

    Bad data is refused with one line: NaN/Inf in an input batch, an empty source; a calibration
    set whose every input is constant gives a warning (the ranges will not represent real data)."""
    from onnxopt import runtime

    stats = {n: TensorStats() for n in names}
    count, varied = 0, False
    first: dict[str, np.ndarray] | None = None
    for feeds in feeds_iter:
        check_finite(feeds, f"calibration batch {count}")
        if first is None:
            first = {k: np.asarray(v).reshape(-1)[:1] for k, v in feeds.items()}
        varied = varied or any(bool(np.ptp(v) > 0) or bool(v.reshape(-1)[0] != first[k][0])
                               for k, v in feeds.items() if v.size)
        outputs = runtime.run(sess, feeds, list(dict.fromkeys([*names, *extra])))
        for n in names:
            try:
                stats[n].update(outputs[n], bins)
            except ValueError:
                raise BadInputError(f"calibration batch {count}: tensor '{n}' became NaN/Inf inside the model") from None
        count += 1
        if on_batch is not None:
            on_batch(outputs)
        if progress is not None:
            progress(1)
    if count == 0:
        raise BadInputError("calibration data is empty: no batch was read")
    if not varied:
        logger.warning("calibration data is constant (every input has one value in all %d batch(es)); "
                       "the ranges will not represent real inputs", count)
    return Stats(stats, count, bins)

"""Latency of one or more models on each execution provider, side by side in one process.

For each EP all sessions are created first (load time and resident-memory growth measured per
session), then warm-up and timed runs go round-robin over the models (run 1 of A, run 1 of B,
run 2 of A, ...) so that drift of a noisy machine affects every model alike.  A timed run
(:func:`timed_run`) is exactly ``sess.run(None, feeds)`` between two ``perf_counter`` calls:
nothing else sits in the loop.  Reported per model: p50/p90/p99/mean/std latency (ms), throughput (samples/s = batch /
mean latency), load time, RSS growth of the session (MB, process RSS after warm-up minus before
the session was created) and the speed-up of the first model over each (p50 ratio).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import psutil

from onnxopt import data as data_mod
from onnxopt import runtime
from onnxopt.errors import BadInputError


@dataclasses.dataclass
class BenchResult:
    model: str
    ep: str
    batch: int | None
    load_ms: float
    rss_mb: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput: float
    speedup_vs_first: float
    times_ms: list[float]

    def to_dict(self, with_times: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not with_times:
            d.pop("times_ms")
        return d


def _warm_up_runtime() -> None:
    """Create and run a one-node session so ORT's one-time initialization (thread pools, allocator
    arenas, kernel registries) is not charged to the first model's load time and memory."""
    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "warm",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    runtime.session(model.SerializeToString()).run(None, {"x": np.zeros(1, np.float32)})


def _rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def _feeds(sess, data, shapes, preprocess, batch: int | None) -> tuple[dict[str, np.ndarray], int | None]:
    if data is not None:
        feeds = next(iter(data_mod.batches(data, sess, preprocess, limit=1)))
    else:
        overrides = dict(shapes or {})
        if batch is not None:  # the first dim of every input, on top of --shape
            for inp in sess.get_inputs():
                if not inp.shape:
                    continue
                first = inp.shape[0]
                if isinstance(first, int) and first >= 0 and first != batch:
                    raise BadInputError(f"--batch {batch}: input '{inp.name}' has a fixed first dim {first}")
                rest = overrides[inp.name][1:] if inp.name in overrides else \
                    tuple(d if isinstance(d, int) and d >= 0 else 1 for d in inp.shape[1:])
                overrides[inp.name] = (batch, *rest)
        feeds = runtime.synthesize(sess, overrides)
    first_dims = {v.shape[0] for v in feeds.values() if v.ndim}
    return feeds, (first_dims.pop() if len(first_dims) == 1 else batch)


def bench(models: Sequence[str | os.PathLike], *, eps: Sequence[str] = ("cpu",), threads: int | None = 1,
          warmup: int = 10, runs: int = 100, batches: Sequence[int | None] = (None,), data=None,
          shapes: Mapping[str, tuple[int, ...]] | None = None, preprocess: str | None = None,
          progress: Callable[[int], None] | None = None) -> list[BenchResult]:
    """See the module docstring.  Cost: len(eps) x len(batches) x len(models) x (warmup + runs) runs."""
    results: list[BenchResult] = []
    _warm_up_runtime()
    for ep in eps:
        for batch in batches:
            sessions, loads, rss, feeds, sizes = [], [], [], [], []
            for m in models:
                gc.collect()
                before = _rss()
                t0 = time.perf_counter()
                sess = runtime.session(m, ep, threads)
                loads.append((time.perf_counter() - t0) * 1e3)
                f, size = _feeds(sess, data, shapes, preprocess, batch)
                runtime.run(sess, f)  # first run through the checked path: an EP failure is one line
                for _ in range(max(0, warmup - 1)):
                    sess.run(None, f)
                rss.append((_rss() - before) / 1e6)
                sessions.append(sess)
                feeds.append(f)
                sizes.append(size)
            times: list[list[float]] = [[] for _ in models]
            for _ in range(runs):
                for i, sess in enumerate(sessions):
                    times[i].append(timed_run(sess, feeds[i]))
                if progress:
                    progress(len(models))
            first_p50 = statistics.median(times[0])
            for m, t, load, r, size in zip(models, times, loads, rss, sizes):
                arr = np.asarray(t)
                p50 = float(np.percentile(arr, 50))
                results.append(BenchResult(
                    str(m), ep, size, load, r, p50, float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
                    float(arr.mean()), float(arr.std()), (size or 1) / (arr.mean() / 1e3), first_p50 / p50, t))
            del sessions
    return results


def timed_run(sess, feeds: Mapping[str, np.ndarray]) -> float:
    """One timed run in ms: exactly ``sess.run`` between two ``perf_counter`` reads."""
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return (time.perf_counter() - t0) * 1e3


def labels(models: list[str]) -> dict[str, str]:
    """Short names for models: the file name, or the path where file names collide."""
    names = [os.path.basename(m) for m in models]
    return {m: (n if names.count(n) == 1 else m) for m, n in zip(models, names)}


def summary(results: list[BenchResult]) -> str:
    """Plain-text table for the CLI."""
    label = labels([r.model for r in results])
    rows = [("model", "ep", "batch", "p50 ms", "p90 ms", "p99 ms", "mean", "std", "samples/s", "load ms", "RSS MB", "vs first")]
    for r in results:
        rows.append((label[r.model], r.ep, str(r.batch or "-"), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                     f"{r.p99_ms:.3f}", f"{r.mean_ms:.3f}", f"{r.std_ms:.3f}", f"{r.throughput:.1f}",
                     f"{r.load_ms:.1f}", f"{r.rss_mb:.1f}", f"{r.speedup_vs_first:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)

"""Latency of one or more models on each execution provider, side by side in one process.

For each batch size all sessions are created first, every model on every EP (load time and
resident-memory growth measured per session), then warm-up and timed runs go round-robin over
them (run 1 of A on cpu, run 1 of B on cpu, run 1 of A on openvino, ..., run 2 of A on cpu, ...)
so that drift of a noisy machine affects every model and every EP alike.  A timed run
(:func:`timed_run`) is exactly ``sess.run(None, feeds)`` between two ``perf_counter`` calls:
nothing else sits in the loop.  Reported per model and EP: p50/p90/p99/mean/std latency (ms),
throughput (samples/s = batch / mean latency), load time, RSS growth of the session (MB, process
RSS after warm-up minus before the session was created), the speed-up of the first model over each
on the same EP (p50 ratio) and, when the CPU EP is benchmarked, the speed-up of the first model on
the CPU EP over each (model, EP) (``speedup_vs_cpu_first``: "int8 on openvino vs fp32 on cpu").

Reproducible numbers:

- ``threads`` binds every EP, not only ORT's CPU EP (``intra_op_num_threads``): EPs with a thread
  pool of their own get it as a provider option (:data:`onnxopt.runtime.THREAD_OPTIONS`, e.g. OpenVINO's
  ``num_of_threads``); each result records the provider options its session was created with.
- Synthesized inputs never run a symbolic dim at a made-up 1 except the first (batch) dim: a model
  with a symbolic spatial or sequence dim and neither ``shapes`` nor ``data`` for that input is
  refused (:class:`~onnxopt.errors.UsageError`), since its latency at width 1 means nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil

from onnxopt import data as data_mod
from onnxopt import runtime
from onnxopt.errors import BadInputError, UsageError

#: Provider option that caps an EP's own thread pool, for EPs that have one (ORT's CPU EP takes
#: ``SessionOptions.intra_op_num_threads``; GPU EPs run their kernels off the CPU).  OpenVINO maps
#: ``num_of_threads`` to its CPU plugin's ``INFERENCE_NUM_THREADS``.


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
    #: p50 of the first model on the CPU EP (same batch) / this p50; None when cpu was not benchmarked.
    speedup_vs_cpu_first: float | None = None
    #: the provider options of this session's EP (thread binding included), as created.
    ep_options: dict[str, str] = dataclasses.field(default_factory=dict)

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


def _symbolic(dim) -> bool:
    return not (isinstance(dim, int) and dim >= 0)


def check_symbolic_dims(inputs, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Refuse to synthesize a symbolic dim other than the first (batch) dim as 1: a latency at
    width 1 means nothing.  ``inputs`` are ORT NodeArgs (name, shape); inputs named in ``shapes``
    are the user's."""
    for inp in inputs:
        if inp.name in (shapes or {}) or not inp.shape:
            continue
        later = [str(d) if isinstance(d, str) else "?" for d in inp.shape[1:] if _symbolic(d)]
        if later:
            example = "x".join(["1"] + [(f"<{d if isinstance(d, str) else 'n'}>" if _symbolic(d) else str(d)) for d in inp.shape[1:]])
            raise UsageError(
                f"input '{inp.name}' {list(inp.shape)}: symbolic dim(s) {', '.join(later)} would run at 1, "
                f"which times nothing real; set them with --shape {inp.name}:{example} (or give --data)")


def _feeds(sess, data, shapes, preprocess, batch: int | None) -> tuple[dict[str, np.ndarray], int | None]:
    if data is not None:
        feeds = next(iter(data_mod.batches(data, sess, preprocess, limit=1)))
    else:
        check_symbolic_dims(sess.get_inputs(), shapes)
        overrides = dict(shapes or {})
        if batch is not None:  # the first dim of every input, on top of --shape
            for inp in sess.get_inputs():
                if not inp.shape:
                    continue
                first = inp.shape[0]
                if isinstance(first, int) and first >= 0 and first != batch:
                    raise BadInputError(f"--batch {batch}: input '{inp.name}' has a fixed first dim {first}")
                rest = overrides[inp.name][1:] if inp.name in overrides else tuple(inp.shape[1:])
                overrides[inp.name] = (batch, *rest)
        feeds = runtime.synthesize(sess, overrides)
    first_dims = {v.shape[0] for v in feeds.values() if v.ndim}
    return feeds, (first_dims.pop() if len(first_dims) == 1 else batch)


def bench(models: Sequence[str | os.PathLike], *, eps: Sequence[str] = ("cpu",), threads: int | None = 1,
          warmup: int = 10, runs: int = 100, batches: Sequence[int | None] = (None,), data=None,
          shapes: Mapping[str, tuple[int, ...]] | None = None, preprocess: str | None = None,
          progress: Callable[[int], None] | None = None) -> list[BenchResult]:
    """See the module docstring.  Cost: len(eps) x len(batches) x len(models) x (warmup + runs) runs.
    Results come EP by EP, then batch by batch, then model by model."""
    eps = tuple(eps)
    by_key: dict[tuple[str, int | None, int], BenchResult] = {}
    _warm_up_runtime()
    for batch in batches:
        slots = [(ep, i, m) for ep in eps for i, m in enumerate(models)]
        sessions, loads, rss, feeds, sizes = [], [], [], [], []
        for ep, _, m in slots:
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
        times: list[list[float]] = [[] for _ in slots]
        for _ in range(runs):
            for k, sess in enumerate(sessions):
                times[k].append(timed_run(sess, feeds[k]))
            if progress:
                progress(len(slots))
        p50s = {(ep, i): statistics.median(t) for (ep, i, _), t in zip(slots, times)}
        for (ep, i, m), sess, t, load, r, size in zip(slots, sessions, times, loads, rss, sizes):
            arr = np.asarray(t)
            p50 = float(np.percentile(arr, 50))
            cpu_first = p50s.get(("cpu", 0))
            by_key[(ep, batch, i)] = BenchResult(
                str(m), ep, size, load, r, p50, float(np.percentile(arr, 90)), float(np.percentile(arr, 99)),
                float(arr.mean()), float(arr.std()), (size or 1) / (arr.mean() / 1e3), p50s[(ep, 0)] / p50, t,
                speedup_vs_cpu_first=None if cpu_first is None else cpu_first / p50,
                ep_options=_ep_options(sess))
        del sessions, sess
    return [by_key[(ep, batch, i)] for ep in eps for batch in batches for i in range(len(models))]


def _ep_options(sess) -> dict[str, str]:
    """The first provider's options as ORT reports them for this session."""
    try:
        name = sess.get_providers()[0]
        return {k: str(v) for k, v in sess.get_provider_options().get(name, {}).items()}
    except Exception:  # noqa: BLE001 - a stand-in session in tests, or an EP without options
        return {}


#: CPU flags that decide which kernels ONNX Runtime / OpenVINO / MLAS pick (x86 and Arm).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")


def machine(cpuinfo: str | None = None) -> dict:
    """What a latency number ran on: CPU model, its SIMD flags (those in :data:`SIMD_FLAGS`, plus
    every flag), logical cores, ONNX Runtime version.  ``cpuinfo`` is /proc/cpuinfo's text
    (read when None; empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    import platform

    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags], "flags": flags,
            "onnxruntime": ort.__version__}


def machine_line(info: dict | None = None) -> str:
    """One line for a benchmark's output: "CPU: <model>, N logical cores, SIMD: avx2 fma ..."."""
    info = info or machine()
    return (f"CPU: {info['cpu']}, {info['logical_cores']} logical cores, SIMD: {' '.join(info['simd']) or 'none listed'}; "
            f"onnxruntime {info['onnxruntime']}")


def timed_run(sess, feeds: Mapping[str, np.ndarray]) -> float:
    """One timed run in ms: exactly ``sess.run`` between two ``perf_counter`` reads (the one timer
    every latency measurement of the project goes through)."""
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return (time.perf_counter() - t0) * 1e3


def round_robin(runs: Sequence[tuple[object, Mapping[str, np.ndarray]]], rounds: int, seconds: float, *,
                rotate: bool = False, min_rounds: int = 1) -> list[list[float]]:
    """Per (session, feeds), its ms per round: every session once per round (the first of a round
    rotating with ``rotate``), in one process; stops after ``rounds``, or past ``seconds`` once
    ``min_rounds`` are done."""
    times: list[list[float]] = [[] for _ in runs]
    deadline = time.perf_counter() + seconds
    n = len(runs)
    for r in range(rounds):
        for k in range(n):
            i = (r + k) % n if rotate else k
            times[i].append(timed_run(*runs[i]))
        if r + 1 >= min_rounds and time.perf_counter() > deadline:
            break
    return times


Z_CONFIDENCE = 2.0  # ~95% two-sided interval for the median ratio (order statistics)


def median_ratio_interval(ta, tb, z: float = Z_CONFIDENCE) -> tuple[float, float]:
    """~95% interval (order statistics, ``z`` standard errors) of the median of the paired time ratios
    ``ta[i] / tb[i]`` (runs paired so machine drift hits both alike); (0, inf) without pairs."""
    n = min(len(ta), len(tb))
    if n == 0:
        return 0.0, float("inf")
    ratios = np.sort(np.asarray(ta[:n], np.float64) / np.maximum(np.asarray(tb[:n], np.float64), 1e-9))
    k = max(0, int(np.floor(n / 2 - z * np.sqrt(n) / 2)))
    return float(ratios[k]), float(ratios[n - 1 - k])


def paired(a: tuple[object, Mapping], b: tuple[object, Mapping], *, threshold: float = 1.0, pairs_per_block: int = 16,
           min_blocks: int = 2, max_blocks: int = 6, seconds: float = float("inf"),
           precision: float | None = None, early: float | None = None) -> dict:
    """Is ``a`` (a warm session and its feeds) faster than ``b`` by the time ratio ``threshold``?

    Runs interleave in pairs (a then b, b then a, alternating, one process, fixed feeds) so a
    machine that slows down slows both alike; each pair gives a ratio t_a / t_b.  After every
    block of ``pairs_per_block`` pairs (at least ``min_blocks``), the median ratio's ~95% interval
    (:func:`median_ratio_interval`) is checked: wholly below ``threshold`` -> ``"faster"``, wholly
    above -> ``"not faster"``; with ``precision``, also stop once the interval is narrower than
    ``precision`` x the median (an estimate precise enough for a cost model: verdict ``"tie"``
    unless the interval decides); still straddling after ``max_blocks`` blocks (or ``seconds``)
    -> ``"tie"``.  With ``early``, the blocks before ``min_blocks`` are checked too, but only
    against ``threshold -/+ early``: a difference far from the threshold stops early, one near it
    is decided exactly as without (the same checks at the same pair counts).  Returns the
    verdict, medians in ms, the median ratio, its interval and the pair count.  Shared by
    quantize's latency guard, its cost model and ``prune --channels``."""
    (sa, fa), (sb, fb) = a, b
    ta: list[float] = []
    tb: list[float] = []
    verdict, lo, hi = "tie", 0.0, float("inf")
    # every block may stop the run, so the interval is widened for the number of looks (Bonferroni: 95%
    # overall); with one z per look, two identical sessions came out "faster" in ~1 of 3 comparisons
    # on a loaded 2-core machine
    looks = max(max_blocks, min_blocks) - min_blocks + 1 + (min_blocks - 1 if early is not None else 0)
    z = statistics.NormalDist().inv_cdf(1.0 - 0.025 / max(1, looks))
    deadline = time.perf_counter() + seconds
    for block in range(max(max_blocks, min_blocks)):
        for i in range(pairs_per_block):
            if i % 2 == 0:
                ta.append(timed_run(sa, fa))
                tb.append(timed_run(sb, fb))
            else:
                tb.append(timed_run(sb, fb))
                ta.append(timed_run(sa, fa))
        if block + 1 < min_blocks:
            if early is not None:
                lo, hi = median_ratio_interval(ta, tb, z)
                if hi < threshold - early or lo > threshold + early:
                    verdict = "faster" if hi < threshold else "not faster"
                    break
            continue
        lo, hi = median_ratio_interval(ta, tb, z)
        if hi < threshold:
            verdict = "faster"
            break
        if lo > threshold:
            verdict = "not faster"
            break
        ratio = float(np.median(np.asarray(ta) / np.maximum(np.asarray(tb), 1e-9)))
        if (precision is not None and hi - lo < precision * ratio) or time.perf_counter() > deadline:
            break
    ratio = float(np.median(np.asarray(ta) / np.maximum(np.asarray(tb), 1e-9)))
    return {"verdict": verdict, "a_ms": float(np.median(ta)), "b_ms": float(np.median(tb)), "ratio": ratio,
            "interval": [lo, hi], "pairs": len(ta)}


def labels(models: list[str]) -> dict[str, str]:
    """Short names for models: the file name, or the path where two different models share one
    (a model listed several times, once per EP or batch, keeps its file name)."""
    models = list(dict.fromkeys(models))
    names = [os.path.basename(m) for m in models]
    return {m: (n if names.count(n) == 1 else m) for m, n in zip(models, names)}


def summary(results: list[BenchResult]) -> str:
    """Plain-text table for the CLI; with several EPs, then one line per (model, EP) against the
    first model on the CPU EP."""
    label = labels([r.model for r in results])
    rows = [("model", "ep", "batch", "p50 ms", "p90 ms", "p99 ms", "mean", "std", "samples/s", "load ms", "RSS MB", "vs first")]
    for r in results:
        rows.append((label[r.model], r.ep, str(r.batch or "-"), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                     f"{r.p99_ms:.3f}", f"{r.mean_ms:.3f}", f"{r.std_ms:.3f}", f"{r.throughput:.1f}",
                     f"{r.load_ms:.1f}", f"{r.rss_mb:.1f}", f"{r.speedup_vs_first:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + cross_ep_lines(results))


def cross_ep_lines(results: list[BenchResult]) -> list[str]:
    """"int8.onnx on openvino vs fp32.onnx on cpu: 2.30x" per (model, EP) off the CPU EP baseline
    (p50 ratio, > 1 = faster than the baseline); nothing with a single EP or without the CPU EP."""
    if len({r.ep for r in results}) < 2:
        return []
    label = labels([r.model for r in results])
    lines: list[str] = []
    for r in results:
        base = next((b for b in results if b.ep == "cpu" and b.batch == r.batch), None)
        if base is None or r.speedup_vs_cpu_first is None or r is base:
            continue
        if not lines:
            lines.append("")
            lines.append("p50 speed-up vs the first model on the cpu EP:")
        batch = f" (batch {r.batch})" if len({b.batch for b in results}) > 1 else ""
        lines.append(f"  {label[r.model]} on {r.ep} vs {label[base.model]} on cpu{batch}: {r.speedup_vs_cpu_first:.2f}x")
    return lines

"""``onnxopt prune`` and ``onnxopt compress``: compression after export, without retraining.

Every flow starts like quantize's (``quantize.prepare``: BatchNorm folded into Conv, cleanup,
named nodes; then shape inference) and ends like it: the result is written beside OUTPUT, scored
there against the prepared fp32 model (the user's ``--metric``, else the per-output fidelity of
``onnxopt.fidelity`` on held-out batches: every 4th ``--data`` batch, up to 8) and renamed into
place only when the drop is within ``--max-drop`` (``core.stage_validate_commit``; exit 3 and
nothing written otherwise, unless ``--force``).

1. **Magnitude** (``prune --sparsity S`` / ``--threshold T``; ``onnxopt.compression.magnitude``):
   the smallest weights of Conv/Gemm/MatMul are zeroed (first and last layer kept; the global
   scope ranks |w| / the layer's RMS and caps every layer at min(0.95, (1 + S) / 2)), then each
   pruned layer, in graph order, is refit on its surviving weights by least squares against the
   teacher, its inputs read from the student as pruned and refit so far
   (``onnxopt.compression.refit``: rows for 8x the fan-in, else a ridge toward the pruned weights;
   ``--no-refit`` to skip).  When S misses ``--max-drop`` the highest sparsity below it that meets
   the budget is written instead (``onnxopt.compression.budget``; ``--strict`` refuses).  The report
   gives per-layer sparsity and refit rows, asked and reached sparsity, and the sizes measured on
   real files: the ONNX file, its gzip, and a CSR file of the weights.
2. **Structured** (``prune --channels F --data DIR``; ``passes/prune_channels.py``): channel
   groups are resolved from the graph; unresolved ones are named with their reason and left
   alone.  Group by group (graph order): rank channels (``--criterion activation``: mean
   |activation| x outgoing weight norm on calibration data; ``l1``/``l2``: filter norms), remove
   the lowest ``F`` (counts rounded to multiples of 8), refit the consumers (streamed ``X^T X``,
   ``X^T Y``), score; a group whose removal breaks ``--max-drop`` is put back; with the latency
   guard a removal is kept only when the model is faster with it (paired runs on ``--ep``, median
   ratio < 1 and not confidently slower, ``quantize.median_ratio_interval``).
3. **Clustering** (``compress --cluster K [--sparsity S]``; ``passes/cluster_weights.py``): after
   optional magnitude pruning (+ refit; over the budget, searched like prune's, each trial
   clustered), each layer's weights are k-means clustered to K values stored as codebook + uint8
   indices (Gather), and the Deep Compression report gives the weight
   storage of the original, after pruning (CSR), after clustering (log2 K bits per index +
   codebook) and after Huffman coding of the indices, each with its ratio to the original.
"""

from __future__ import annotations

import dataclasses
import gzip
import io as _io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import benchmark as bench
from onnxopt import data as data_mod
from onnxopt import io, runtime
from onnxopt.base import name_of, node_name, present, tensor_of
from onnxopt.commands import core
from onnxopt.compression import budget, refit
from onnxopt.compression import channels as pc
from onnxopt.compression import clustering as cw
from onnxopt.compression import magnitude as pm
from onnxopt.errors import BadInputError, UsageError
from onnxopt.quantization import static as quantize
from onnxopt.teacher import BudgetResult, Teacher, is_held_out, load_metric

logger = logging.getLogger("onnxopt")
CRITERIA = ("activation", "l1", "l2")
#: latency guard: pairs per block and blocks at least / at most per comparison
PAIRS, MIN_BLOCKS, MAX_BLOCKS = 16, 2, 6
T = TypeVar("T", bound=tuple)


@dataclasses.dataclass
class Settings:
    """How a run is scored and written (shared by every flow)."""

    data: str | os.PathLike | None = None
    preprocess: str | None = None
    max_drop: float = 0.01
    metric: str | None = None
    ep: str = "cpu"
    threads: int = 1
    force: bool = False
    refit: bool = True
    calib_limit: int | None = None
    progress: Callable[[int], None] | None = None
    #: output name -> class axis, or None for cosine (--output-kind)
    class_outputs: Mapping[str, int | None] | None = None
    #: --sparsity over budget: refuse (True) instead of writing the highest sparsity within it
    strict: bool = False


class Scorer:
    """The compression flows' teacher (onnxopt.teacher.Teacher: the prepared fp32 model, its
    held-out batches, the yardstick and the budget check) with the batches it reads: the held-out
    ones score, the others (streamed again, :meth:`calibration`) refit; and the latency comparison
    of two candidates."""

    def __init__(self, model: ir.Model, opts: Settings):
        metric = load_metric(opts.metric)  # a bad --metric is a usage error before any data is read
        if opts.data is None and opts.refit:
            logger.warning("no --data: the refit needs calibration data like the deployment inputs; skipped "
                           "(and without --metric the result is scored on synthesized inputs only)")
            opts.refit = False
        self.model, self.opts = model, opts
        self.float_bytes = quantize.serialize(model)
        plain = runtime.session(self.float_bytes, "cpu", opts.threads, optimize=False)
        #: synthesized ids stay inside the tables they index (runtime.index_bounds)
        self.index_bounds = runtime.index_bounds(model)
        held_out: list[dict] = []
        #: how many batches :meth:`calibration` yields
        self.calibration_count = 8
        if opts.data is not None:
            feeds: dict = {}
            self.calibration_count = 0
            for i, feeds in enumerate(data_mod.batches(opts.data, plain, opts.preprocess, opts.calib_limit)):
                if is_held_out(i):
                    held_out.append(feeds)
                else:
                    self.calibration_count += 1
                if opts.progress:
                    opts.progress(1)
            if not held_out and feeds:  # fewer than 4 batches: score on the last one read
                held_out = [feeds]
        else:
            runtime.remember_bounds(plain, self.index_bounds)
            held_out = [runtime.synthesize(plain, None, seed=s, quiet=True) for s in range(4)]
        self.teacher = Teacher(model, self.float_bytes, held_out, ep=opts.ep, threads=opts.threads,
                               metric=metric, metric_name=opts.metric, max_drop=opts.max_drop,
                               class_outputs=opts.class_outputs, synthesized=opts.data is None)
        self.held_out = self.teacher.held_out
        if opts.data is not None:  # the calibration batches' margins, for the flip estimate
            self.teacher.learn_from(self.calibration())

    def calibration(self) -> Iterator[dict]:
        """The non-held-out batches, streamed from --data again (synthesized without --data)."""
        if self.opts.data is None:
            plain = runtime.session(self.float_bytes, "cpu", self.opts.threads, optimize=False)
            runtime.remember_bounds(plain, self.index_bounds)
            yield from (runtime.synthesize(plain, None, seed=100 + s, quiet=True) for s in range(8))
            return
        plain = runtime.session(self.float_bytes, "cpu", self.opts.threads, optimize=False)
        for i, feeds in enumerate(data_mod.batches(self.opts.data, plain, self.opts.preprocess, self.opts.calib_limit)):
            if not is_held_out(i):
                yield feeds

    def score(self, model: ir.Model | str | os.PathLike) -> float:
        if isinstance(model, ir.Model):  # weightless on the CPU EP (runtime.Light), as quantize scores
            return self.teacher.score(runtime.light(model) if self.opts.ep == "cpu" else quantize.serialize(model))
        return self.teacher.score(model)

    def drop(self, model: ir.Model | str | os.PathLike) -> float:
        return self.teacher.float_score - self.score(model)

    def check(self, report: dict, what: str = "pruned") -> Callable[[Path], BudgetResult]:
        """Score the staged file; fill ``report["accuracy"]`` (the score under ``what``, and under
        "pruned", the key every lossy flow wrote first)."""
        return self.teacher.check(report, ("pruned",) if what == "pruned" else ("pruned", what), warn_uncertified=True)

    # ---------------------------------------------------------------- latency
    def compare(self, a: bytes, b: bytes, max_blocks: int = MAX_BLOCKS) -> dict:
        """Paired, interleaved runs of ``a`` and ``b`` on the EP (one held-out batch): the median
        time ratio a/b and its ~95% interval (``quantize.median_ratio_interval``); verdict
        "faster" / "slower" when the interval is wholly below / above 1, else "tie"."""
        feeds = self.held_out[0]
        sessions = [runtime.session(m, self.opts.ep, self.opts.threads) for m in (a, b)]
        ins = [{k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        for s, f in zip(sessions, ins):
            for _ in range(3):
                s.run(None, f)
        c = bench.paired((sessions[0], ins[0]), (sessions[1], ins[1]), pairs_per_block=PAIRS, min_blocks=MIN_BLOCKS,
                         max_blocks=max_blocks)
        return {**c, "verdict": {"not faster": "slower"}.get(c["verdict"], c["verdict"])}


# ---------------------------------------------------------------- shared steps

#: quantize's preparation without simplify's size-only rules: its Q/K/V merge (one MatMul + Split)
#: would hide the attention-head groups from ``prune --channels``.
PREPARE_PIPELINE = quantize.PREPARE_PIPELINE.replace("simplify", "simplify{size-rules=false}")


def prepare(input_path: str | os.PathLike, allow_quantized: bool = False) -> tuple[ir.Model, list[str]]:
    """quantize's preparation (refuses quantized models unless ``allow_quantized``, folds BN, names
    nodes) + shape inference."""
    model, _, notes = quantize.prepare(quantize.load_input(input_path, what="pruning or compression"), per_channel=False,
                                       allow_quantized=allow_quantized,
                                       pipeline_spec=PREPARE_PIPELINE)
    try:
        model = ir_common.ShapeInferencePass()(model).model
    except Exception as e:  # noqa: BLE001 - onnx shape inference raises many kinds
        notes.append(f"shape inference failed ({str(e).splitlines()[0]}); channel groups need ranks")
    return model, notes


def warn_unknown(model: ir.Model, exclude: Sequence[str]) -> None:
    """--exclude names that are neither a node nor an initializer of the prepared model."""
    known = {n.name for n in model.graph} | set(model.graph.initializers)
    for name in exclude:
        if name not in known:
            logger.warning("--exclude '%s': the prepared model has no node or weight of that name", name)


def _check_paths(input_path, output_path) -> None:
    if io.same_file(input_path, output_path):
        raise UsageError(f"output {output_path} is the input file; write the result elsewhere")
    io.check_writable(Path(output_path))


def check_sparsity(sparsity: float | None, threshold: float | None = None) -> None:
    if sparsity is not None and not (0.0 <= sparsity < 1.0) or (sparsity is not None and math.isnan(sparsity)):
        raise UsageError(f"--sparsity {sparsity}: must be in [0, 1)")
    if threshold is not None and not threshold >= 0:
        raise UsageError(f"--threshold {threshold}: must be >= 0")


def csr_arrays(w: np.ndarray) -> dict[str, np.ndarray]:
    """CSR of ``w`` viewed as [out, rest]: float values, int16/int32 column indices, int32 row pointers."""
    m = w.reshape(w.shape[0], -1)
    rows_, cols = np.nonzero(m)
    idx_type = np.int16 if m.shape[1] < 32768 else np.int32
    return {"data": m[rows_, cols], "indices": cols.astype(idx_type),
            "indptr": np.r_[0, np.cumsum(np.bincount(rows_, minlength=m.shape[0]))].astype(np.int32)}


def file_sizes(model_path: str | os.PathLike, model: ir.Model, layer_names: set[str]) -> dict:
    """Sizes measured on real bytes: the ONNX file, the file gzip'ed (level 9), and the weights
    written as one .npz (np.savez, uncompressed) with ``layer_names``' weights in CSR and the other
    initializers dense.  Returns bytes."""
    raw = Path(model_path).read_bytes()
    arrays: dict[str, np.ndarray] = {}
    for node in model.graph:
        if node.name in layer_names:
            for k, v in csr_arrays(tensor_of(node.inputs[1]).numpy()).items():
                arrays[f"{name_of(node.inputs[1])}.{k}"] = v
    taken = {k.rsplit(".", 1)[0] for k in arrays}
    for name, init in model.graph.initializers.items():
        if name not in taken and init.const_value is not None:
            arrays[name] = init.const_value.numpy()
    buf = _io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return {"file": len(raw), "gzip": len(gzip.compress(raw, 9)), "weights_csr_npz": buf.getbuffer().nbytes}


def _commit(model: ir.Model, output_path, report: dict, scorer: Scorer, t_start: float, what: str) -> dict:
    def refused(_p: Path, _r) -> None:
        report["seconds"] = time.perf_counter() - t_start

    core.stage_validate_commit(model, output_path, report, check=scorer.check(report, what), force=scorer.opts.force,
                              on_refused=refused, refused=f"{what} model not written")
    return report


# ---------------------------------------------------------------- 1. magnitude

def magnitude_prune(model: ir.Model, scorer: Scorer, *, sparsity: float | None, threshold: float | None,
                    scope: str, exclude: Sequence[str], skip_ends: bool = True) -> tuple[list[dict], dict]:
    """Prune in place, then refit each pruned layer on its support (in graph order, each on the
    student as refit so far).  Returns the per-layer records and the refit notes."""
    warn_unknown(model, exclude)
    records, _ = pm.prune(model, sparsity=sparsity, threshold=threshold, scope=scope, exclude=exclude,
                          skip_ends=skip_ends)
    if not any(r["pruned"] for r in records):
        raise BadInputError("no prunable layer: no Conv, Gemm or MatMul with a constant float weight besides the first "
                            "and last layer (and --exclude)")
    notes: dict[str, str] = {}
    used: dict[str, int] = {}
    if scorer.opts.refit:
        nodes = {n.name: n for n in model.graph}
        for r in records:
            if r["pruned"] and r["zeros"]:
                node = nodes[r["layer"]]
                mask = refit.weight_matrix(node) != 0
                notes.update(refit.refit(model, scorer.float_bytes, [r["layer"]], scorer.calibration(),
                                         masks={r["layer"]: mask}, threads=scorer.opts.threads,
                                         batch_count=scorer.calibration_count, used=used))
    for r in records:
        r["refit"] = notes.get(r["layer"], "")
        if r["pruned"]:
            r["refit_rows"] = used.get(r["layer"], 0)
    return records, notes


def reach_sparsity(scorer: Scorer, asked: float, build: Callable[[float], T]) -> budget.Reached[T]:
    """``build(asked)`` (a tuple whose first item is the model scored), or the highest sparsity below
    that meets --max-drop when it does not (``onnxopt.compression.budget``; not with --strict or
    --force, which keep the asked one)."""
    opts = scorer.opts
    found = budget.highest_within(asked, build, lambda c: scorer.drop(c[0]), opts.max_drop,
                                  search=not (opts.strict or opts.force))
    if found.message:
        logger.info("%s (--strict refuses instead)", found.message)
    return found


def sparsity_report(found: budget.Reached, cap: float) -> dict:
    """The report keys of a --sparsity run: asked and reached fractions, the layer cap, the search."""
    return {"asked_sparsity": found.asked, "reached_sparsity": found.reached, "max_layer_sparsity": cap,
            "sparsity_search": found.to_dict()}


def prune_magnitude(input_path, output_path, *, sparsity: float | None = None, threshold: float | None = None,
                    scope: str = "global", exclude: Sequence[str] = (), opts: Settings) -> dict:
    """``onnxopt prune --sparsity`` / ``--threshold`` (module docstring, 1)."""
    check_sparsity(sparsity, threshold)
    if sparsity is None and threshold is None:
        raise UsageError("give --sparsity, --threshold or --channels")
    if scope not in pm.SCOPES:
        raise UsageError(f"--scope '{scope}': expected global or layer")
    _check_paths(input_path, output_path)
    t_start = time.perf_counter()
    model, notes = prepare(input_path)
    if not pm.layers(model)[0]:
        raise BadInputError("no prunable layer: no Conv, Gemm or MatMul with a constant float weight")
    scorer = Scorer(model, opts)

    def build(s: float | None) -> tuple[ir.Model, list[dict]]:
        candidate = model.clone()
        records, _ = magnitude_prune(candidate, scorer, sparsity=s, threshold=threshold, scope=scope, exclude=exclude)
        return candidate, records

    searched: dict = {}
    if sparsity is not None:
        found = reach_sparsity(scorer, sparsity, build)
        (candidate, records), written = found.candidate, found.reached if found.reached is not None else sparsity
        searched = sparsity_report(found, pm.layer_cap(written) if scope == "global" else written)
    else:
        candidate, records = build(None)
    params = sum(r["params"] for r in records)
    report = core.header("prune", input={"path": str(input_path)}, mode="magnitude", notes=notes, sparsity=sparsity,
                        threshold=threshold, scope=scope, refit=opts.refit, ep=opts.ep, **searched,
                        layers=records, total_sparsity=sum(r["zeros"] for r in records) / max(params, 1))
    _commit(candidate, output_path, report, scorer, t_start, "pruned")
    pruned_names = {r["layer"] for r in records if r["pruned"]}
    with tempfile.TemporaryDirectory(prefix="onnxopt-sizes-") as tmp:  # the prepared original, same serializer
        io.save(model, Path(tmp) / "original.onnx")
        before = file_sizes(Path(tmp) / "original.onnx", model, set())
    after = file_sizes(output_path, candidate, pruned_names)
    report["sizes"] = {"original": before, "pruned": after,
                       "gzip_ratio": before["gzip"] / after["gzip"], "csr_ratio": before["file"] / after["weights_csr_npz"]}
    report["seconds"] = time.perf_counter() - t_start
    return report


# ---------------------------------------------------------------- 2. channels

def activation_importance(model: ir.Model, group: pc.Group, batches: Sequence[Mapping[str, np.ndarray]],
                          threads: int = 1) -> np.ndarray:
    """Per channel: mean |activation| of the tensors the consumers read x outgoing weight norm."""
    names = sorted({name_of(n.inputs[0]) for n in group.consumers})
    sess = runtime.session(runtime.with_outputs(ir.to_proto(model), names), "cpu", threads)
    total = np.zeros(group.channels)
    count = 0
    for feeds in batches:
        got = runtime.run_candidate(sess, feeds, names)
        for name in names:
            axis, block = group.tensors[name]
            a = np.moveaxis(np.abs(got[name]).astype(np.float64), axis, -1)
            offset = group.windows.get(name)
            if offset is not None:
                a = a[..., offset:offset + group.channels]
            a = a.reshape(-1, group.channels, block).mean(axis=(0, 2))
            total += a
            count += 1
    return total / max(count, 1) * pc.outgoing_norms(group)


def importance(model: ir.Model, group: pc.Group, criterion: str, batches, threads: int) -> np.ndarray:
    if criterion == "activation":
        return activation_importance(model, group, batches, threads)
    return pc.weight_norms(group, 1 if criterion == "l1" else 2)


@dataclasses.dataclass
class ChannelPlan:
    fraction: float
    criterion: str = "l1"
    latency_guard: bool = True
    align: int = 8
    exclude: tuple[str, ...] = ()


def try_group(current: ir.Model, gname: str, plan: ChannelPlan, scorer: Scorer, out_index: dict[str, np.ndarray],
              sample: list[dict]) -> tuple[ir.Model, dict, dict[str, np.ndarray]] | None:
    """``current`` with group ``gname``'s lowest channels removed (and consumers refit); None when
    nothing would be removed."""
    trial = current.clone()
    g = {x.name: x for x in pc.find_groups(trial)}[gname]
    n = pc.kept_count(g.channels, plan.fraction, plan.align)
    if n >= g.channels:
        return None
    scores = importance(trial, g, plan.criterion, sample, scorer.opts.threads)
    keep = np.sort(np.argsort(-scores, kind="stable")[:n])
    index = dict(out_index)
    for node in [*g.producers, *g.tied]:  # which of the teacher's output features each still has
        block = g.tensors[name_of(node.outputs[0])][1]
        features = (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)
        index[node_name(node)] = index.get(node_name(node), np.arange(g.channels * block))[features]
    record = {"group": gname, "channels": g.channels, "kept": int(n), "producers": [x.name for x in g.producers],
              "consumers": [x.name for x in g.consumers], "tied": [x.name for x in g.tied]}
    consumers = [node_name(x) for x in g.consumers]
    pc.remove(trial, g, keep)
    if scorer.opts.refit:
        record["refit"] = refit.refit(trial, scorer.float_bytes, consumers, scorer.calibration(), out_index=index,
                                      threads=scorer.opts.threads)
    return trial, record, index


def channel_prune(model: ir.Model, scorer: Scorer, plan: ChannelPlan) -> tuple[ir.Model, list[dict], list[dict]]:
    """Group by group (module docstring, 2).  Returns the result, per-group records and the
    unresolved groups."""
    groups = pc.find_groups(model)
    unresolved = [g.to_dict() for g in groups if g.reason is not None]
    for u in unresolved:
        logger.warning("channel group '%s' left untouched: %s", u["group"], u["reason"])
    excluded = set(plan.exclude)
    todo = [g.name for g in groups if g.reason is None
            and not excluded & {n.name for n in (*g.producers, *g.consumers, *g.tied)}]
    if not todo:
        raise BadInputError("no channel group can be pruned" + (f" ({unresolved[0]['group']}: {unresolved[0]['reason']})"
                                                                  if unresolved else " (no Conv/Gemm/MatMul layers)"))
    sample = _take(scorer.calibration(), 4)
    current, records = model, []
    out_index: dict[str, np.ndarray] = {}
    current_bytes = scorer.float_bytes
    for gname in todo:
        tried = try_group(current, gname, plan, scorer, out_index, sample)
        if tried is None:
            records.append({"group": gname, "accepted": False, "why": "too few channels to remove any"})
            continue
        trial, record, index = tried
        record["drop"] = scorer.drop(trial)
        trial_bytes = quantize.serialize(trial)
        if record["drop"] > scorer.opts.max_drop:
            record.update(accepted=False, why=f"accuracy budget: drop {record['drop']:.4g} > {scorer.opts.max_drop:g}")
        elif plan.latency_guard:
            c = scorer.compare(trial_bytes, current_bytes)
            record["latency"] = c
            ok = c["ratio"] < 1.0 and c["verdict"] != "slower"
            record.update(accepted=ok, why="" if ok else f"latency guard: not faster on {scorer.opts.ep} "
                                                         f"(ratio {c['ratio']:.3f}, {c['verdict']})")
        else:
            record.update(accepted=True, why="")
        logger.info("group %s: %d -> %d channels, drop %.4g: %s", gname, record["channels"], record["kept"],
                    record["drop"], "kept" if record["accepted"] else record["why"])
        if record["accepted"]:
            current, out_index, current_bytes = trial, index, trial_bytes
        records.append(record)
    return current, records, unresolved


def _take(it, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


def prune_channels(input_path, output_path, *, fraction: float, criterion: str = "l1",
                   latency_guard: bool = True, exclude: Sequence[str] = (), opts: Settings) -> dict:
    """``onnxopt prune --channels`` (module docstring, 2)."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--channels {fraction}: must be in (0, 1)")
    if criterion not in CRITERIA:
        raise UsageError(f"--criterion '{criterion}': expected {', '.join(CRITERIA)}")
    if opts.data is None:
        raise UsageError("--channels needs --data (calibration batches for the importance and the refit)")
    _check_paths(input_path, output_path)
    t_start = time.perf_counter()
    model, notes = prepare(input_path)
    scorer = Scorer(model, opts)
    warn_unknown(model, exclude)
    plan = ChannelPlan(fraction, criterion, latency_guard, exclude=tuple(exclude))
    result, records, unresolved = channel_prune(model, scorer, plan)
    accepted = [r for r in records if r.get("accepted")]
    report = core.header("prune", input={"path": str(input_path)}, mode="channels", notes=notes, channels=fraction,
                        criterion=criterion, refit=opts.refit, ep=opts.ep, latency_guard=latency_guard, groups=records,
                        unresolved=unresolved, removed_channels=sum(r["channels"] - r["kept"] for r in accepted),
                        conv_channels={"before": _conv_channels(model), "after": _conv_channels(result)})
    if accepted:
        c = scorer.compare(quantize.serialize(result), scorer.float_bytes)
        report["latency"] = {"float_ms": c["b_ms"], "pruned_ms": c["a_ms"], "speedup": 1.0 / c["ratio"],
                             "verdict": c["verdict"], "interval": c["interval"], "pairs": c["pairs"],
                             "threads": opts.threads}
    else:
        logger.warning("no channel group could be removed within the budget and the latency guard")
    _commit(result, output_path, report, scorer, t_start, "pruned")
    report["seconds"] = time.perf_counter() - t_start
    return report


def _conv_channels(model: ir.Model) -> dict[str, int]:
    return {node_name(n): int(tensor_of(n.inputs[1]).shape.numpy()[0]) for n in model.graph
            if n.op_type == "Conv" and len(n.inputs) > 1 and present(n.inputs[1]).const_value is not None}


# ---------------------------------------------------------------- 3. clustering + Deep Compression

PACKED_DTYPES = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


def _const(v: ir.Value | None) -> ir.TensorProtocol | None:
    return v.const_value if v is not None and v.is_initializer() else None


def _codes(node: ir.Node, t: ir.TensorProtocol, bits: int) -> np.ndarray | None:
    """The stored integer codes of a packed weight (MatMulNBits' uint8 blobs hold two 4-bit codes a byte)."""
    a = t.numpy().reshape(-1)
    if node.op_type == "MatMulNBits" and bits == 4:
        return np.stack([a & 0xF, a >> 4], -1).reshape(-1)
    if node.op_type == "MatMulNBits" and bits != 8:
        return None
    return a.astype(np.int64) - int(a.min()) if a.size else a.astype(np.int64)


def packed_weights(model: ir.Model) -> list[dict]:
    """Weights the model already stores as integers: MatMulNBits' packed blobs (input 1), and 4/8-bit
    initializers that a DequantizeLinear reads directly or through a Gather (quantized embedding
    tables).  Per weight: ``params`` (float values it stands for), ``bits``, ``bytes`` (the packed data
    as stored, plus its scales and zero points), ``float_bytes`` (4 per param) and ``huffman_bytes``
    (codes Huffman-coded + one code-length byte per symbol, plus scales and zero points)."""
    out, seen = [], set()
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            w, aux = node.inputs[1], node.inputs[2:]
            bits = int(node.attributes["bits"].value) if "bits" in node.attributes else 4
            params = int(node.attributes["N"].value) * int(node.attributes["K"].value)
        elif node.op_type == "DequantizeLinear" and node.inputs:
            w, aux = node.inputs[0], node.inputs[1:]
            src = w.producer() if w is not None else None
            if _const(w) is None and src is not None and src.op_type == "Gather":
                w = src.inputs[0]
            t = _const(w)
            if t is None or t.dtype not in PACKED_DTYPES:
                continue
            bits, params = PACKED_DTYPES[t.dtype], int(t.size)
        else:
            continue
        t = _const(w)
        if t is None or name_of(w) in seen:  # w is present: it has a constant
            continue
        seen.add(name_of(w))
        aux_t = [(name_of(a), c) for a in aux if (c := _const(a)) is not None]
        aux_bytes = sum(c.nbytes for _, c in aux_t)
        codes = _codes(node, t, bits)
        hb, symbols = cw.huffman_bits(codes) if codes is not None and codes.size else (8 * t.nbytes, 0)
        out.append({"weight": name_of(w), "op": node.op_type, "bits": bits, "params": params,
                    "aux": [n for n, _ in aux_t], "bytes": int(t.nbytes + aux_bytes), "float_bytes": 4 * params,
                    "huffman_bytes": int(min(symbols + math.ceil(hb / 8), t.nbytes) + aux_bytes)})
    return out


def deep_compression(original: ir.Model, pruned: ir.Model, records: list[dict], bits: int,
                     packed: Sequence[dict] = ()) -> list[dict]:
    """Weight storage per stage (bytes): the fp32 original; after pruning (each layer in CSR when
    smaller than dense); after clustering (log2 K-bit indices + fp32 codebook); after Huffman
    coding of the indices (+ codebook + one code-length byte per symbol).  Every other
    initializer (biases) counts at its size in every stage.  Weights the model already stores
    packed (``packed``: int4/int8, see ``packed_weights``) count at 4 bytes per param in the fp32
    original, then at their packed bytes (an extra stage "as given"), and Huffman-coded in the last."""
    def init_bytes(m: ir.Model) -> dict[str, int]:
        return {k: v.const_value.nbytes for k, v in m.graph.initializers.items() if v.const_value is not None}

    packed_names = {n for p in packed for n in (p["weight"], *p["aux"])}
    given = sum(init_bytes(original).values())
    orig = sum(b for k, b in init_bytes(original).items() if k not in packed_names) + sum(p["float_bytes"] for p in packed)
    clustered = {r["weight"] for r in records}
    rest = sum(b for k, b in init_bytes(pruned).items() if k not in clustered)
    totals = [rest] * 3
    for r in records:
        r["storage"] = layer_storage(r, bits)
        for i, key in enumerate(("pruned", "clustered", "huffman")):
            totals[i] += r["storage"][key]
    totals[2] -= sum(p["bytes"] - p["huffman_bytes"] for p in packed)
    stages = [("original (fp32)", orig), ("pruned (CSR)", totals[0]), (f"clustered ({bits}-bit indices)", totals[1]),
              ("Huffman-coded indices", totals[2])]
    if packed:
        kinds = "/".join(sorted({f"{p['bits']}-bit" for p in packed}))
        stages.insert(1, (f"as given ({kinds} weights packed)", given))
    return [{"stage": s, "bytes": int(b), "compression_ratio": orig / b} for s, b in stages]


def layer_storage(record: dict, bits: int) -> dict[str, int]:
    """One layer's weight bytes per stage (the columns of the paper's per-layer tables)."""
    w = record["dense"]
    hb, symbols = cw.huffman_bits(record["indices"])
    return {"original": int(w.size * 4), "pruned": int(min(sum(a.nbytes for a in csr_arrays(w).values()), w.nbytes)),
            "clustered": int(record["codebook"].nbytes + math.ceil(record["indices"].size * bits / 8)),
            "huffman": int(record["codebook"].nbytes + symbols + math.ceil(hb / 8))}


def compress(input_path, output_path, *, clusters: int, sparsity: float | None = None, scope: str = "global",
             exclude: Sequence[str] = (), opts: Settings) -> dict:
    """``onnxopt compress --cluster K [--sparsity S]`` (module docstring, 3)."""
    bits = int(round(math.log2(clusters))) if clusters > 0 else 0
    if clusters < 2 or clusters > 256 or 2 ** bits != clusters:
        raise UsageError(f"--cluster {clusters}: must be a power of 2 in [2, 256]")
    check_sparsity(sparsity)
    _check_paths(input_path, output_path)
    t_start = time.perf_counter()
    model, notes = prepare(input_path, allow_quantized=True)
    packed = packed_weights(model)
    if not pm.layers(model)[0]:
        already = f" ({len(packed)} weight(s) already stored as integers)" if packed else ""
        raise BadInputError(f"no layer to compress: no Conv, Gemm or MatMul with a constant float weight{already}")
    scorer = Scorer(model, opts)

    def build(s: float) -> tuple[ir.Model, list[dict], ir.Model, list[dict]]:
        return _prune_and_cluster(model, scorer, s, scope, exclude, clusters)

    searched: dict = {}
    written = 0.0
    if sparsity:
        found = reach_sparsity(scorer, sparsity, build)
        candidate, prune_records, pruned_copy, records = found.candidate
        written = found.reached if found.reached is not None else sparsity
        searched = sparsity_report(found, pm.layer_cap(written) if scope == "global" else written)
    else:
        candidate, prune_records, pruned_copy, records = build(0.0)
    built, more = budget.more_clusters(scorer, clusters,
                                 lambda k, skip=(): _prune_and_cluster(model, scorer, written, scope, (*exclude, *skip), k),
                                 candidate)
    if built is not None:
        candidate, prune_records, pruned_copy, records = built
        bits = int(round(math.log2(more["reached"])))
    searched["cluster_search"] = more
    stages = deep_compression(model, pruned_copy, records, bits, packed)
    scores = [scorer.teacher.float_score, scorer.score(pruned_copy), scorer.score(candidate)]
    for stage, score in zip(stages, [scores[0]] * (len(stages) - 3) + [*scores[1:], scores[-1]]):
        stage["score"] = score
    layers_out = [{"layer": r["layer"], "params": r["params"], "clusters": r["clusters"],
                   "sparsity": float(np.mean(r["dense"] == 0)),
                   "huffman_bits_per_weight": cw.huffman_bits(r["indices"])[0] / max(r["params"], 1),
                   "bytes": r["storage"], "compression_ratio": r["storage"]["original"] / max(r["storage"]["huffman"], 1)}
                  for r in records]
    report = core.header("compress", input={"path": str(input_path)}, notes=notes, clusters=clusters, sparsity=sparsity,
                        scope=scope, refit=opts.refit, ep=opts.ep, **searched, layers=layers_out, pruning=prune_records,
                        deep_compression=stages, packed_weights=[{k: v for k, v in p.items() if k != "aux"} for p in packed])
    _commit(candidate, output_path, report, scorer, t_start, "compressed")
    report["sizes"] = {"file": Path(output_path).stat().st_size,
                       "gzip": len(gzip.compress(Path(output_path).read_bytes(), 9))}
    report["seconds"] = time.perf_counter() - t_start
    return report


def _prune_and_cluster(model: ir.Model, scorer: Scorer, sparsity: float, scope: str, exclude: Sequence[str],
                       clusters: int) -> tuple[ir.Model, list[dict], ir.Model, list[dict]]:
    """A copy of ``model`` magnitude-pruned to ``sparsity`` (none at 0) and refit, then clustered;
    with its pruning records, the pruned copy before clustering, and the clustering records (each
    with its layer's ``weight`` name and ``dense`` weight before clustering)."""
    candidate = model.clone()
    prune_records: list[dict] = []
    if sparsity:
        prune_records, _ = magnitude_prune(candidate, scorer, sparsity=sparsity, threshold=None, scope=scope,
                                           exclude=exclude)
    pruned_copy = candidate.clone()
    dense = {la.name: (la.weight.name, tensor_of(la.weight).numpy()) for la in pm.layers(candidate)[0]}
    clusterer = cw.ClusterWeights(clusters, tuple(exclude))
    clusterer(candidate)
    records = clusterer.records
    for r in records:
        r["weight"], r["dense"] = dense[r["layer"]]
    return candidate, prune_records, pruned_copy, records

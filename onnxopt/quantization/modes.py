"""``quantize --mode dynamic`` and ``quantize --weights int4`` (mode ``weight-only``): the transformer
modes, over the same :class:`~onnxopt.quantization.static.Recipe`, accuracy budget, final latency check and
staged write as static quantization (``onnxopt/quantize.py``).

1. **Prepare**: :func:`quantize.prepare` (refuses quantized models, default graph pipeline, opset
   >= 13), then ``gemm-to-matmul`` so every weight matmul is a MatMul the quantizers reach
   (TorchScript exports write ``nn.Linear`` as Gemm); weight-only at ``--ep`` other than cpu: opset
   upgraded to 21 (int4 DequantizeLinear).
2. **Inputs**, no calibration statistics: with ``--data``, every 4th batch (up to 8) is held out for
   scoring and up to 8 others feed the input Hessians of GPTQ rounding; without it, inputs are
   synthesized as ``validate`` does (seed 0, a variation with other symbolic dims and values, two
   more seeds), and int4 rounding is to nearest.
3. **Build** (:meth:`WeightQuantizer.build`, ``onnxopt/quantization/weights.py``): dynamic: every weight
   MatMul -> DynamicQuantizeLinear + MatMulInteger (int8 per column; 7-bit where MLAS's u8s8 kernel
   would saturate, see ``quantize_qdq.weight_qmax``) + scale Mul, which ORT fuses into
   DynamicQuantizeMatMul; a fused com.microsoft Attention (``fuse-transformer``) -> QAttention;
   weight-only: MatMulNBits (cpu) or int4 DequantizeLinear + MatMul, blocks of
   ``--block-size`` along K (the output head 8-bit: dynamic int8 on cpu, 8-bit blocks elsewhere),
   rounding ``gptq`` (error feedback through the inverse input Hessian,
   ``recover.error_feedback``, on a fixed per-block grid) or ``rtn``; embeddings (Gather tables,
   ``--embeddings``): int8 + DequantizeLinear (default), int4 GatherBlockQuantized (weight-only on
   cpu), or none.
4. **Budget** (:func:`budget`): over ``--max-drop`` the layers (MatMuls, embeddings, fused Attention)
   are ranked by their relative output error (:func:`layer_errors`, one float run) and the fewest
   worst kept float found by binary search (~log2(layers) builds).  No per-layer latency guard: dynamic int8 is one
   whole-model comparison (:func:`quantize.final_check`: not confidently faster than fp32 -> the
   float model is written, unless ``--no-latency-guard``); weight-only is for size, its latency is
   measured and reported, never decisive.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import data as data_mod
from onnxopt import generation, io, pipeline, runtime
from onnxopt import validation as validate
from onnxopt.base import constant, drop_unused_initializers, name_of, node_name
from onnxopt.errors import BadInputError, UsageError
from onnxopt.passes.gemm_to_matmul import GemmToMatMul
from onnxopt.quantization import qdq as qq
from onnxopt.quantization import recovery as recover
from onnxopt.quantization import static as qm
from onnxopt.quantization import weights as qw
from onnxopt.teacher import HELD_OUT, is_held_out

logger = logging.getLogger("onnxopt")

#: extra synthesized scoring batches (seeds) beyond validate's primary point and its variation
SYNTHESIZED_SEEDS = (2, 3)
#: batches (besides the held-out ones) whose input Hessians GPTQ uses: GPTQ needs many more rows than
#: the K of a layer (with few, it fits the calibration subspace and rounds worse than nearest)
ROUNDING_BATCHES = 64
#: free disk beside the output, as a multiple of the float weights, for the float copy (``float_on_disk``):
#: the copy, the output (at most as big) and a margin
DISK_FACTOR = 2.2
#: seeds of the synthesized prompts (and decoding steps) of a decoder with a cache (``generation``)
DECODER_SEEDS = (0, 1, 2, 3)
#: their symbolic dims (sequence lengths of a transformer: 1 would exercise little)
SYNTHESIZED_DIM = 8


def int4_format(ep: str) -> str:
    """MatMulNBits on the CPU EP; int4 DequantizeLinear (opset 21) + MatMul elsewhere."""
    return "nbits" if ep == "cpu" else "qdq"


def prepare(model: ir.Model, recipe: qm.Recipe) -> tuple[ir.Model, list[str]]:
    """Step 1; returns the prepared model (every node named) and notes for the report."""
    model, _, notes = qm.prepare(model, True)
    converted = GemmToMatMul()(model)
    model = pipeline.run(model, pipeline.parse("cleanup")).model  # the Gemms' old weights
    if converted.changed["Gemm -> MatMul"]:
        notes.append(f"{converted.changed['Gemm -> MatMul']} Gemm converted to MatMul + Add (weight matmuls reached)")
    if converted.changed["Transpose(W) materialized"]:
        notes.append(f"{converted.changed['Transpose(W) materialized']} MatMul by Transpose(W) given a transposed weight "
                     f"copy (a tied LM head: with int8 embeddings the quantized table is shared by the Gather and the head)")
    for reason, n in converted.skipped.items():
        notes.append(f"{n} Gemm left as is ({reason})")
    if recipe.mode == "weight-only" and int4_format(recipe.ep) == "qdq":
        opset = model.opset_imports.get("", 0)
        if opset < 21:
            try:
                model = ir.from_proto(onnx.version_converter.convert_version(ir.to_proto(model), 21))
            except Exception as e:  # noqa: BLE001 - the converter raises many kinds
                raise BadInputError(f"int4 DequantizeLinear needs opset 21; upgrading from {opset} failed: "
                                    f"{str(e).splitlines()[0]}") from None
            notes.append(f"opset upgraded {opset} -> 21 for int4 DequantizeLinear")
    seen: set[str] = set()
    for i, node in enumerate(model.graph):  # gemm-to-matmul named its nodes; keep every name unique
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model, notes


def inputs(float_bytes: runtime.Source, opts: qm.RunSettings, model: ir.Model | None = None) -> tuple[list[dict], list[dict], dict]:
    """Step 2: (held-out scoring batches, rounding batches, the report's ``calibration`` entry);
    ``model``: the prepared model ``float_bytes`` serializes (its index bounds for synthesized ids)."""
    # a model file: memory-mapped, not repacked (this session is never timed)
    sess = runtime.session(float_bytes, "cpu", opts.threads, optimize=False, prepack=not isinstance(float_bytes, str))
    if model is not None:
        runtime.remember_bounds(sess, runtime.index_bounds(model))
    if opts.data is None:
        points = validate.synthesized_points(sess, seeds=DECODER_SEEDS)  # raises, naming --data, when none runs
        longer = {i.name: tuple(d if isinstance(d, int) and d >= 0 else SYNTHESIZED_DIM for d in i.shape)
                  for i in sess.get_inputs()}
        decoder = points[0].label.startswith(generation.PROMPT)  # prompts and decoding steps: enough as they are
        for seed in () if decoder else SYNTHESIZED_SEEDS:
            try:
                feeds = runtime.synthesize(sess, longer, seed=seed, quiet=True)
                runtime.run(sess, feeds)
            except BadInputError:  # the model does not run with these dims: validate's points suffice
                continue
            points.append(validate.Point(f"synthesized, seed {seed}, symbolic dims {SYNTHESIZED_DIM}", feeds))
        held = [p for p in points if p.feeds]
        return [p.feeds for p in held], [], {"batches": 0, "held_out": len(held), "tensors": 0, "bins": 0,
                                             "synthesized": [p.label for p in held]}
    held_out: list[dict] = []
    rounding: list[dict] = []
    read = 0
    for i, feeds in enumerate(data_mod.batches(opts.data, sess, opts.preprocess, opts.calib_limit)):
        read += 1
        if is_held_out(i):
            held_out.append(feeds)
        elif len(rounding) < ROUNDING_BATCHES:
            rounding.append(feeds)
        if len(held_out) >= HELD_OUT and len(rounding) >= ROUNDING_BATCHES:
            break
    if not held_out:
        held_out = rounding[-1:]
    if not held_out:
        raise BadInputError(f"{opts.data}: no batch was read")
    return held_out, rounding, {"batches": read, "held_out": len(held_out), "tensors": 0, "bins": 0, "source": str(opts.data)}


class WeightQuantizer(qm.Quantizer):
    """A :class:`quantize.Quantizer` whose candidates are the weight MatMuls (kind ``matmul``) and
    embedding Gathers (kind ``embedding``) and whose build is dynamic int8 or int4 weight-only;
    scoring, latency comparison, budget and final check are the static mode's."""

    def __init__(self, model: ir.Model, float_bytes: runtime.Source, held_out: list[dict], rounding_set: list[dict],
                 recipe: qm.Recipe, *, metric: Callable | None = None, metric_name: str | None = None,
                 max_drop: float | None = None, class_outputs=None, threads: int = 1,
                 synthesized: bool = False, timing_batch: int | None = None):
        self.model, self.float_bytes, self.held_out, self.recovery_set = model, float_bytes, held_out, rounding_set
        self.timing_batch = timing_batch  # a decoder's 1-token step among held_out (``Quantizer.init_scoring``)
        self.profile, self.per_channel, self.ep, self.threads = recipe.profile, True, recipe.ep, threads
        self.recovery = ()
        self.qmax, self.embeddings = recipe.qmax, recipe.embeddings
        self.int4, self.block, self.rounding = recipe.weights == "int4", recipe.block_size, recipe.rounding
        self.fmt = int4_format(recipe.ep)
        self.matmuls = qw.weight_matmuls(model)
        #: the output head(s) stay at 8 bits in weight-only mode (``recipe.head_bits``)
        self.node_bits = {name: recipe.head_bits for name in qw.output_heads(model, self.matmuls)} if self.int4 else {}
        self.candidates = {name: "matmul" for name in self.matmuls}
        if not self.int4:  # fused com.microsoft Attention (fuse-transformer) -> QAttention
            self.candidates.update({node_name(n): "attention" for n in model.graph if qw.fused_attention(n).succeeded})
        if recipe.embeddings != "none":
            self.candidates.update({node_name(n): "embedding" for n in model.graph if qw.embedding_gather(n).succeeded})
        self.init_scoring(metric, metric_name, max_drop, class_outputs, synthesized)

    def plan(self, exclude=frozenset()) -> qq.Plan:
        targets = [n for n in self.candidates if n not in exclude]
        return qq.Plan(targets, {n: self.candidates[n] for n in targets}, {}, {}, frozenset(exclude))

    @functools.cached_property
    def rounded(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """GPTQ int4 codes by weight name (``rtn``: filled by the first build, round to nearest, and
        reused by the next ones): error feedback over K with the input Hessian on the rounding
        batches, grid fixed per block (:func:`qw.block_grid`)."""
        if not self.int4 or self.rounding != "gptq":
            return {}
        # a matmul whose K the block does not divide stays float: no Hessian for it
        nodes = [n for n in self.model.graph if n.name in self.matmuls and not self.matmuls[node_name(n)][0] % self.block]
        hess = recover.hessians(nodes, self.recovery_set, self.float_bytes, exact=False)
        out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for node in nodes:
            w, bits = node.inputs[1], self.node_bits.get(node_name(node), 4)
            key = f"{name_of(w)}/{bits}"
            if key in out or node.name not in hess or (bits == 8 and self.fmt == "nbits"):  # that head runs dynamic
                continue
            arr = constant(w).astype(np.float64)
            scale, zero = qw.block_grid(arr, self.block, bits)
            codes = recover.error_feedback(arr, np.repeat(scale, self.block, 0), hess[node.name], 2 ** bits - 1,
                                            np.repeat(zero, self.block, 0), 0)
            out[key] = (codes.astype(np.uint8), scale, zero)
        return out

    def build(self, exclude=frozenset(), recovery=None) -> tuple[ir.Model, qq.Plan]:
        model = self.model.clone()
        exclude = frozenset(exclude)
        if self.int4:
            # an 8-bit head on the CPU EP runs as dynamic int8 (MLAS's int8 GEMM): 8-bit MatMulNBits was
            # measured 1.6x slower than fp32 on the benchmark's GPT-2 (LM head 256 x 8192), dynamic 0.91x
            heads = frozenset(n for n, b in self.node_bits.items() if b == 8) if self.fmt == "nbits" else frozenset()
            qw.QuantizeInt4(self.block, self.fmt, exclude | heads, self.rounded, self.node_bits)(model)
            dynamic = qw.QuantizeDynamic(self.qmax, exclude | (frozenset(n.name for n in self.model.graph) - heads))
            if heads - exclude:  # only the heads (not e.g. a fused Attention, which int4 mode leaves float)
                dynamic(model)
        else:
            dynamic = qw.QuantizeDynamic(self.qmax, exclude)
            dynamic(model)
        if self.embeddings != "none":
            four = self.embeddings == "int4" and self.fmt == "nbits"
            # a table tied to a dynamic int8 head (int8 embeddings) is stored once, shared with that head
            shared = {} if four else qw.tied_tables(model, dynamic.weights, exclude)
            qw.QuantizeEmbeddings(4 if four else 8, self.block, exclude, shared)(model)
        # drop the float weights the passes replaced (all they leave unused; the cleanup pipeline costs far more)
        drop_unused_initializers(model.graph)
        return model, self.plan(exclude)


def layer_errors(q: WeightQuantizer, rows: int = 2048) -> dict[str, float]:
    """Sensitivity proxy per candidate, from one float run (no build): the relative output error
    ``|X W - q(X) q(W)| / |X W|`` of each weight MatMul on its captured input rows (activations
    quantized as DynamicQuantizeLinear would in dynamic mode; weights on the mode's grid), and the
    relative rounding error of each embedding table or fused Attention weight."""
    nodes = {n.name: n for n in q.model.graph}
    names = sorted({name_of(nodes[n].inputs[0]) for n, k in q.candidates.items() if k == "matmul"})
    sess = runtime.session(runtime.with_outputs_of(q.float_bytes, names), "cpu", q.threads, optimize=False,
                           prepack=not isinstance(q.float_bytes, str))
    acts = runtime.run_candidate(sess, q.held_out[0], names)
    del sess  # its copy of the weights: not held while each weight is read below
    out = {}
    for name, kind in q.candidates.items():
        weight = nodes[name].inputs[0 if kind == "embedding" else 1]
        out[name] = _layer_error(q, nodes[name], kind, constant(weight), acts, rows)
        qw.release(weight)
    return out


def _layer_error(q: WeightQuantizer, node: ir.Node, kind: str, w: np.ndarray, acts: dict, rows: int) -> float:
    """:func:`layer_errors` of one candidate, over column chunks of ``weights.CHUNK_BYTES`` in float64
    (every grid is per column: the same error as over the whole weight, without float64 copies of a
    151,936-column head)."""
    name = node.name or ""
    k = w.shape[0]
    if q.int4 and kind == "matmul" and k % q.block:  # stays float: the block does not divide K
        return 0.0
    x = x_q = None
    if kind == "matmul":
        x = acts[name_of(node.inputs[0])].reshape(-1, k)[:rows].astype(np.float64)
        x_q = x
        if not q.int4:  # uint8 per tensor, as DynamicQuantizeLinear
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            step = (hi - lo) / 255 or 1.0
            x_q = (np.clip(np.round(x / step) + np.round(-lo / step), 0, 255) - np.round(-lo / step)) * step
    err = norm = 0.0
    cols = max(1, qw.CHUNK_BYTES // (8 * max(k, 1)))
    for c in range(0, w.shape[1], cols):
        part = np.asarray(w[:, c:c + cols], np.float64)
        if q.int4 and kind == "matmul" and q.node_bits.get(name, 4) == 4:
            scale, zero = qw.block_grid(part, q.block)
            wq = qw.block_dequantize(qw.block_round(part, scale, zero, q.block), scale, zero, q.block)
        else:
            codes, s = qw.int8_columns(part, 127 if kind == "embedding" else q.qmax)
            wq = codes * s.astype(np.float64)
        if x is None or x_q is None:  # a table's (or a fused Attention weight's) own rounding error
            err += float(((wq - part) ** 2).sum())
            norm += float((part ** 2).sum())
        else:
            ref = x @ part
            err += float(((x_q @ wq - ref) ** 2).sum())
            norm += float((ref ** 2).sum())
    return float(np.sqrt(err) / (np.sqrt(norm) or 1.0))


def budget(q: WeightQuantizer, recipe: qm.Recipe, max_drop: float) -> tuple[ir.Model, qq.Plan, float]:
    """Step 4, fast: build and score the placement; over ``max_drop``, rank the candidates by
    :func:`layer_errors` (one float run, no builds) and binary-search the fewest most-error layers
    to keep in float so the budget holds (about log2(layers) builds, where ranking by the drop of
    each layer alone, as static mode does, costs one build per layer; assumes the drop shrinks as
    more layers go float).  ``recipe.decisions.sensitivity`` lists the ranking with its proxy errors."""
    base = recipe.excluded()
    candidate, the_plan = q.build(base)
    drop = q.drop(candidate)
    recipe.decisions.sensitivity = []
    if drop <= max_drop:
        return candidate, the_plan, drop
    errors = layer_errors(q)
    ranked = sorted((n for n in the_plan.primary()), key=lambda n: -errors[n])
    recipe.decisions.sensitivity = [{"layer": n, "kind": q.candidates[n], "relative_error": errors[n]} for n in ranked]
    hi, best = qm.fewest_float(q, base, ranked, max_drop)
    for rank, s in enumerate(recipe.decisions.sensitivity[:hi], 1):
        recipe.decisions.float_layers[s["layer"]] = (f"accuracy budget: relative error rank {rank} "
                                           f"({s['relative_error']:.3g}); the {hi} worst kept float")
        s["kept_float"] = True
    return best


def run(input_path: str | os.PathLike, output_path: str | os.PathLike, recipe: qm.Recipe, opts: qm.RunSettings,
        metric_fn: Callable | None, replayed: bool, t_start: float) -> dict:
    """Steps 1-4 and the staged write; returns the report (``quantize.run``'s shape)."""
    if opts.search:
        raise UsageError(f"--search explores static recipes; not with --mode {recipe.mode}")
    if opts.stats_in is not None or opts.stats_out is not None:
        raise UsageError(f"--mode {recipe.mode} collects no calibration statistics (--load-stats/--save-stats)")
    model = qm.load_input(input_path, lazy=True)
    t0 = time.perf_counter()
    model, notes = prepare(model, recipe)
    with contextlib.ExitStack() as scratch:
        model, float_bytes = float_on_disk(model, output_path, scratch)  # the prepared arrays go here
        return _run(model, float_bytes, notes, input_path, output_path, recipe, opts, metric_fn, replayed, t0, t_start)


def float_on_disk(model: ir.Model, output_path: str | os.PathLike,
                  scratch: contextlib.ExitStack) -> tuple[ir.Model, runtime.Source]:
    """(the prepared float model, what its ORT sessions are made from).  Weights over
    ``runtime.LIGHT_ABOVE``: the model is written to a scratch folder beside the output (its weights in
    one external-data file, streamed) and read back lazily, so the arrays the preparation made (merged
    MatMuls, a transposed head) are freed, every weight is read from that file when a build needs it
    (and unmapped after, ``weights.release``), and float sessions load the file by path (ORT reads the
    weights itself: one copy, never a protobuf or arrays of ours handed over).  The folder goes when
    ``scratch`` closes (the caller drops its reference to ``model`` by rebinding it to the result; a
    context manager would keep it alive in its arguments).  Smaller models: unchanged, ``session_source``."""
    size = io.weight_bytes(model)
    if size <= runtime.LIGHT_ABOVE:
        return model, qm.session_source(model)
    folder = Path(output_path).resolve().parent
    io.remove_stale_staging(folder)
    free = shutil.disk_usage(folder).free
    if free < DISK_FACTOR * size:  # the copy and the output must both fit: keep the arrays in memory instead
        logger.warning("%s: %.1f GB free, the float copy needs %.1f GB beside the output: its weights stay in "
                       "memory (peak memory about twice as high)", folder, free / 1e9, size / 1e9)
        return model, qm.session_source(model)
    tmp = scratch.enter_context(tempfile.TemporaryDirectory(prefix=io.staging_prefix() + "float-", dir=folder))
    path = Path(tmp) / "float.onnx"
    ir.save(model, str(path), external_data="float.onnx.data")
    return io.load(path), str(path)


def _run(model: ir.Model, float_bytes: runtime.Source, notes: list[str], input_path: str | os.PathLike,
         output_path: str | os.PathLike, recipe: qm.Recipe, opts: qm.RunSettings, metric_fn: Callable | None,
         replayed: bool, t0: float, t_start: float) -> dict:
    """:func:`run` after step 1."""
    matmuls = qw.weight_matmuls(model)
    undivided: dict[str, tuple[int, int]] = {}
    if not matmuls and not any(qw.fused_attention(n).succeeded for n in model.graph):
        raise BadInputError("nothing to quantize: no MatMul or Gemm with a constant float32 2-D weight in the main graph")
    if recipe.weights == "int4":
        problem, undivided = qw.check_block_size(recipe.block_size, matmuls)
        if problem:
            raise BadInputError(problem)
        if undivided:  # those stay float (the build declines them, with the reason); the rest go int4
            name, (k, _) = next(iter(undivided.items()))
            logger.warning("%d of %d weight matmuls stay float: --block-size %d does not divide their K (e.g. K=%d of "
                           "'%s')", len(undivided), len(matmuls), recipe.block_size, k, name)
            notes.append(f"{len(undivided)} weight matmul(s) kept float: --block-size {recipe.block_size} does not "
                         f"divide their K")
    held_out, rounding_set, calibration = inputs(float_bytes, opts, model)
    if recipe.weights == "int4":
        if recipe.rounding == "gptq" and not rounding_set:
            raise UsageError("--rounding gptq needs --data (the input Hessians come from it)")
        recipe.rounding = recipe.rounding or ("gptq" if rounding_set else "rtn")
    step = next((i for i, label in enumerate(calibration.get("synthesized", [])) if label.startswith(generation.STEP)), None)
    q = WeightQuantizer(model, float_bytes, held_out, rounding_set, recipe, metric=metric_fn, metric_name=opts.metric,
                        max_drop=opts.max_drop, class_outputs=opts.class_outputs, threads=opts.threads,
                        synthesized=opts.data is None, timing_batch=step)
    for name, (k, _) in undivided.items():
        recipe.decisions.float_layers.setdefault(name, f"--block-size {recipe.block_size} does not divide K={k}")
    if replayed:
        qm.check_replay(q, recipe)
        candidate, the_plan = q.build(recipe.excluded())
    else:
        qm.place(q, recipe)
        candidate, the_plan, _ = budget(q, recipe, opts.max_drop)
    decide = not replayed and recipe.mode == "dynamic"
    candidate, the_plan, latency, wrote_float = qm.final_check(q, recipe, candidate, the_plan, decide=decide)
    if wrote_float:  # the float model as the default pipeline leaves it (no transposed weight copies)
        candidate = qm.prepare(qm.load_input(input_path, lazy=True), True)[0]
    report = qm.quantize_report(input_path, recipe, notes, calibration, the_plan, latency, wrote_float, opts.threads)
    report["seconds_quantize"] = time.perf_counter() - t0
    return qm.commit(q, recipe, candidate, the_plan, output_path, report, opts, replayed, t_start)

"""Default fidelity of a lossy model to its float original: judge each output by what a user consumes.

Lossy commands (``quantize``; later prune/compress) compare a candidate to the float model on
held-out batches.  Without a task metric (``--metric``) the score must not be blind to predictions:
a mean cosine of 0.994 hid a 6,625-class CTC recognizer losing 9.5 points of line exact-match,
because a few flipped arg-maxes barely move a vector of probabilities.  So each output gets a rule
(``rules``), chosen from the graph and confirmed on the reference data:

1. **Class scores -> top-1 agreement at every position.**  A float output is a class-score output
   when it is *proven* to be one:

   - it is made by ``Softmax`` or ``LogSoftmax`` (class axis = the op's axis), possibly through ops
     that only move or relabel values without mixing classes: Identity, Cast, Dropout, Transpose
     (the axis follows the permutation), and Reshape/Flatten/Squeeze/Unsqueeze when the class axis
     is the last one (it must still be the last one: checked on the data below);
   - or by ``Sigmoid`` over a ``Gemm``/``MatMul`` (+ bias) head: the matmul's output-feature axis
     (the last) holds one score per class.  Any other Sigmoid (a conv map, a size-1 last axis) is a
     per-element yes/no score: its rule is the agreement of the ``p > 0.5`` decisions;
   - or it is *declared* by name: an output whose name contains one of the words ``logits``,
     ``logit``, ``scores``, ``probs``, ``probabilities``, ``log_probs``, ``logprobs`` (exporters' and
     users' names for class scores, e.g. ``output_names=["logits"]``), class axis last;
   - or the caller declares it (``declared={name: axis}``; ``axis=None`` forces the cosine rule).

   The claim is *confirmed on the float reference before use*: Softmax rows must sum to 1 (1e-3)
   and LogSoftmax rows must log-sum-exp to 0 (1e-3) along the chosen axis at every position, and
   the class axis must have at least 2 entries.  When the check fails the output falls back to
   rule 3 and the report says why.

   The score is the fraction of positions (every index of the other axes: batch, time step,
   anchor, pixel) where the candidate's arg-max over the class axis is a top-1 class of the
   reference (a tie in the reference accepts any of its maxima; a NaN in the candidate's row is a
   disagreement), pooled over all held-out batches.

2. **Integer / bool outputs** (labels, indices, masks): the fraction of elements that are equal.
3. **Any other float output**: cosine similarity of the flattened outputs, pooled over the
   batches (``sum <r,g> / sqrt(sum |r|^2 sum |g|^2)``); its SNR in dB is reported too.

Every rule scores 1.0 for the float model itself, so one budget reads the same on all of them:
the model's fidelity is its *worst* output, and ``--max-drop 0.01`` means top-1 agreement >= 99%
of positions for class outputs and cosine >= 0.99 for the others.

Agreements are counts over a sample, so each comes with a 95% (Wilson) interval.  Judged against a
budget (``Fidelity(rules, max_drop)``), an agreement counts by its **lower bound** whenever the
sample is large enough to certify the budget at all (a perfect sample of n positions certifies
1 - max_drop: n >= ~380 for 0.01); then "agreement >= 0.99" holds for the data the sample stands
for, not only for the sample (3 flips in 512 held-out positions is 0.994 but only shows >= 0.983;
the 1,000-class glyph_crnn flipped 1.3% of its test positions then).  A smaller sample cannot
certify even a perfect candidate, so it is judged by the point estimate and the caller warns.
Either way the estimate is only as good as how much the held-out data look like deployment data
(on a model's own training lines it is optimistic).
Cost: O(output size) per batch; nothing is kept but per-output sums.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.base import name_of, present, producer_of
from onnxopt.errors import UsageError

logger = logging.getLogger("onnxopt")

#: ops that move or relabel values without mixing the classes of one position
LAYOUT_OPS = frozenset({"Identity", "Cast", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
#: words in an output name that declare class scores (split on non-letters, lower case)
CLASS_WORDS = frozenset({"logits", "logit", "scores", "probs", "probabilities", "log_probs", "logprobs"})
CONFIRM_TOL = 1e-3
TOP1, DECISION, EXACT, COSINE = "top-1", "decision", "exact", "cosine"


@dataclasses.dataclass
class Rule:
    """How one output is judged.  ``axis``: class axis for top-1 (negative = from the end);
    ``check``: what the reference must satisfy along it ("softmax", "logsoftmax" or None)."""

    name: str
    metric: str
    reason: str
    axis: int | None = None
    check: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "metric": self.metric, "axis": self.axis, "reason": self.reason}


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _score_producer(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from ``value`` through LAYOUT_OPS; return the Softmax/LogSoftmax/Sigmoid found, or
    the last node of a softmax written out (:func:`_written_out`), or None; and the layout ops
    between it and ``value`` in forward order."""
    chain: list[ir.Node] = []
    node = value.producer()
    while node is not None and node.domain in ("", "ai.onnx") and node.op_type in LAYOUT_OPS and node.inputs \
            and node.inputs[0] is not None:
        if node.op_type == "Cast" and "to" in node.attributes and \
                node.attributes["to"].as_int() not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            return None, []
        chain.append(node)
        node = node.inputs[0].producer()
    if node is None or node.domain not in ("", "ai.onnx") or (node.op_type not in SCORE_OPS and _written_out(node) is None):
        return None, []
    return node, chain[::-1]


def _follow(axis: int, rank: int | None, chain: list[ir.Node]) -> tuple[int | None, str]:
    """The class axis after ``chain``: absolute when the rank is known, else negative; None when lost."""
    for node in chain:
        if node.op_type == "Transpose":
            perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
            if perm is None:
                if rank is None:
                    return None, "a Transpose without perm on an input of unknown rank"
                perm = tuple(range(rank))[::-1]
            a = axis + len(perm) if axis < 0 else axis
            axis, rank = list(perm).index(a), len(perm)
        elif node.op_type in SHAPE_OPS:
            last = axis == -1 or (rank is not None and axis == rank - 1)
            if not last:
                return None, f"{node.op_type} '{node.name}' reshapes a class axis that is not the last one"
            out_rank = _rank(node.outputs[0])
            axis, rank = (-1, None) if out_rank is None else (out_rank - 1, out_rank)
    return axis, ""


def _axes_of(node: ir.Node) -> list[int] | None:
    """A Reduce* node's axes (attribute before opset 18, constant input after); None when unknown."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
    return None


def _exp_of(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(x, axis) when ``value`` is ``Exp(x)`` or ``Exp(x - ReduceMax(x, axis))``, x any tensor."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Exp" or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    sub = x.producer()
    if sub is not None and sub.op_type == "Sub" and sub.inputs[1] is not None:
        mx = sub.inputs[1].producer()
        if mx is not None and mx.op_type == "ReduceMax" and mx.inputs[0] is sub.inputs[0]:
            axes = _axes_of(mx)
            if axes is not None and len(axes) == 1:
                return present(sub.inputs[0]), axes[0]
    return x, 0


def _written_out(node: ir.Node | None) -> tuple[str, int] | None:
    """("softmax" | "logsoftmax", class axis) when ``node`` ends a softmax written out in basic ops
    (tf2onnx and hand-written graphs): ``Div(Exp(x'), ReduceSum(Exp(x'), axis))`` or
    ``Sub(x', Log(ReduceSum(Exp(x'), axis)))``, with x' = x or x - ReduceMax(x, axis).  The class axis
    is the ReduceSum's single axis (the data confirms it, as for Softmax)."""
    if node is None or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2 or node.op_type not in ("Div", "Sub"):
        return None
    den = node.inputs[1].producer() if node.inputs[1] is not None else None
    if node.op_type == "Sub":
        if den is None or den.op_type != "Log" or den.inputs[0] is None:
            return None
        den = den.inputs[0].producer()
    if den is None or den.op_type != "ReduceSum" or den.inputs[0] is None:
        return None
    axes = _axes_of(den)
    exp = _exp_of(den.inputs[0])
    if axes is None or len(axes) != 1 or exp is None:
        return None
    if node.op_type == "Div" and node.inputs[0] is not den.inputs[0]:  # the same Exp on both sides
        return None
    if node.op_type == "Sub":
        exp_node = den.inputs[0].producer()
        if exp_node is None or exp_node.inputs[0] is not node.inputs[0]:  # x' - log(sum(exp(x')))
            return None
    return ("softmax" if node.op_type == "Div" else "logsoftmax"), axes[0]


def _linear_head(value: ir.Value) -> bool:
    """``value`` is made by Gemm/MatMul (+ a bias Add), through layout ops: a linear head's output."""
    node = value.producer()
    while node is not None and node.op_type in LAYOUT_OPS and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is not None and node.op_type == "Add":
        node = next((i.producer() for i in node.inputs if i is not None and i.producer() is not None
                     and producer_of(i).op_type in ("Gemm", "MatMul")), None)
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in ("Gemm", "MatMul")


def _is_matmul_head(node: ir.Node) -> bool:
    """Sigmoid input made by Gemm/MatMul, possibly plus a constant bias."""
    x = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if x is not None and x.op_type == "Add":
        x = next((i.producer() for i in x.inputs if i is not None and i.producer() is not None
                  and producer_of(i).op_type in ("Gemm", "MatMul")), None)
    return x is not None and x.op_type in ("Gemm", "MatMul")


def _declared_by_name(name: str) -> str | None:
    low = name.lower()
    for word in sorted(CLASS_WORDS, key=len, reverse=True):
        if re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", low):
            return word
    return None


def _softmax_rule(model: ir.Model, name: str, producer: ir.Node, chain: list[ir.Node], via: str) -> Rule:
    """The top-1 rule of an output made by Softmax/LogSoftmax, written as one op or out in basic ops."""
    written = _written_out(producer)
    if written is not None:
        kind, axis = written
        label = f"a {'Softmax' if kind == 'softmax' else 'LogSoftmax'} written out ({producer.op_type} of Exp/ReduceSum)"
    else:
        kind = producer.op_type.lower()
        default = -1 if _opset(model) >= 13 else 1
        axis = producer.attributes["axis"].as_int() if "axis" in producer.attributes else default
        label = producer.op_type
    rank = _rank(producer.outputs[0])
    if axis < 0 and rank is not None:
        axis += rank
    new_axis, why = _follow(axis, rank, chain)
    if new_axis is None:
        return Rule(name, COSINE, f"made by {label}{via}, but {why}")
    return Rule(name, TOP1, f"made by {label}(axis={axis}){via}: class scores", new_axis, kind)


def _rule(model: ir.Model, value: ir.Value, name: str) -> Rule:
    producer, chain = _score_producer(value)
    via = "".join(f" -> {n.op_type}" for n in chain)
    if producer is not None and producer.op_type != "Sigmoid":
        return _softmax_rule(model, name, producer, chain, via)
    if producer is not None:  # Sigmoid
        rank = _rank(producer.outputs[0])
        if _is_matmul_head(producer):
            new_axis, _ = _follow(-1 if rank is None else rank - 1, rank, chain)
            if new_axis is not None:
                return Rule(name, TOP1, f"made by Sigmoid over a Gemm/MatMul head{via}: one score per class", new_axis)
        return Rule(name, DECISION, f"made by Sigmoid{via} (not over a matmul head): per-element p > 0.5 decisions")
    word = _declared_by_name(name)
    if word is not None:
        raw = _linear_head(value)  # raw scores: their values count where top-1 cannot be certified
        return Rule(name, TOP1, f"named '{word}': declared class scores, class axis last"
                                + ("; raw scores of a linear head" if raw else ""), -1, "raw" if raw else "")
    if _linear_head(value):
        return Rule(name, TOP1, "a linear head's output: judged as class logits, class axis last (say "
                                f"--output-kind {name}=embedding or =regression to judge it by cosine)", -1, "logits")
    return Rule(name, COSINE, "no Softmax/LogSoftmax/Sigmoid producer, no class-score name and no linear head: "
                              "cosine (SNR reported), or top-1 if the data show probabilities", check="probabilities")


def rules(model: ir.Model, declared: Mapping[str, int | None] | None = None) -> dict[str, Rule]:
    """Output name -> Rule (module docstring).  Only the graph is read; ``Fidelity`` confirms the
    class axis on the reference data before a top-1 rule is used."""
    declared = declared or {}
    unknown = sorted(set(declared) - {name_of(v) for v in model.graph.outputs})
    if unknown:
        raise UsageError(f"--output-kind names {', '.join(repr(n) for n in unknown)}, not an output of the model "
                         f"(outputs: {', '.join(name_of(v) for v in model.graph.outputs)})")
    out: dict[str, Rule] = {}
    for value in model.graph.outputs:
        name = name_of(value)
        dtype = value.dtype
        if dtype is not None and dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16,
                                               ir.DataType.BFLOAT16):  # exact whatever is declared
            out[name] = Rule(name, EXACT, f"{dtype.name.lower()} output: labels/indices are compared exactly")
        elif name in declared:
            axis = declared[name]
            out[name] = Rule(name, COSINE, "declared not class scores") if axis is None else \
                Rule(name, TOP1, f"declared class scores (class axis {axis})", axis)
        else:
            out[name] = _rule(model, value, name)
            if out[name].check == "logits":
                logger.warning("output '%s' is a linear head's: judged as class logits (top-1 agreement, and cosine "
                               "when lower); say --output-kind %s=embedding or =regression to judge it by cosine",
                               name, name)
    return out


def for_synthesized(the_rules: Mapping[str, Rule]) -> dict[str, Rule]:
    """``the_rules`` for held-out inputs that are synthesized, not data: a class flip on noise inputs
    means nothing (their logits' margins are not the data's), so top-1 and decision rules become
    cosine (SNR reported); exact rules stay.  Said in one warning line recommending --data."""
    out = {}
    demoted = []
    for name, rule in the_rules.items():
        if rule.metric in (TOP1, DECISION) or rule.check == "probabilities":
            out[name] = Rule(name, COSINE, f"{rule.reason}; but the held-out inputs are synthesized (no --data): "
                                           f"cosine instead of class flips on noise")
            if rule.metric != COSINE:
                demoted.append(name)
        else:
            out[name] = rule
    if demoted:
        logger.warning("no --data: output(s) %s judged by cosine on synthesized inputs (class flips on noise mean "
                       "nothing); give --data to judge predictions", ", ".join(f"'{n}'" for n in demoted))
    return out


@dataclasses.dataclass
class _Acc:
    agree: float = 0.0
    positions: int = 0
    dot: float = 0.0
    rr: float = 0.0
    gg: float = 0.0
    noise: float = 0.0
    equal_inf: bool = True
    #: top-1: the reference's top-2 margin at each held-out position, and the summed squared output
    #: noise over the class scores (``noise_n`` entries), for the flip estimate
    margins: list = dataclasses.field(default_factory=list)
    noise_sq: float = 0.0
    noise_n: int = 0


class Fidelity:
    """Accumulates reference/candidate output pairs batch by batch; ``scores()`` per output."""

    def __init__(self, the_rules: Mapping[str, Rule], max_drop: float | None = None,
                 margins: Mapping[str, np.ndarray] | None = None):
        self.rules = {k: dataclasses.replace(v) for k, v in the_rules.items()}
        #: the budget, when scores should be judged against it (agreements by their lower bound)
        self.max_drop = max_drop
        #: per top-1 output, the reference's top-2 margins at positions outside the held-out batches (the
        #: calibration batches: margins are the float model's, not fitted, so they may come from there)
        self.extra_margins = dict(margins or {})
        self.acc: dict[str, _Acc] = {k: _Acc() for k in the_rules}
        self.confirmed: set[str] = set()

    def confirm(self, name: str, ref: np.ndarray) -> None:
        """Demote a top-1 rule to cosine when the reference contradicts it (module docstring)."""
        rule = self.rules[name]
        if name in self.confirmed:
            return
        if rule.metric == COSINE and rule.check == "probabilities":
            self._promote_probabilities(name, rule, ref)
            return
        if rule.metric != TOP1:
            return
        axis = present(rule.axis)  # a top-1 rule carries its class axis
        problem = None
        if not np.issubdtype(ref.dtype, np.floating) or ref.ndim == 0:
            problem = "the output is not a float array with a class axis"
        elif not -ref.ndim <= axis < ref.ndim:
            problem = f"axis {axis} does not exist in an output of rank {ref.ndim}"
        elif ref.shape[axis] < 2:
            problem = f"its class axis has {ref.shape[axis]} entry"
        elif rule.check == "softmax":
            err = float(np.max(np.abs(ref.astype(np.float64).sum(axis=axis) - 1.0))) if ref.size else 0.0
            problem = None if err <= CONFIRM_TOL else f"its rows along axis {axis} do not sum to 1 (off by {err:.3g})"
        elif rule.check == "logsoftmax":
            r = ref.astype(np.float64)
            m = r.max(axis=axis, keepdims=True)
            lse = (m + np.log(np.exp(r - m).sum(axis=axis, keepdims=True))) if r.size else m
            err = float(np.max(np.abs(lse))) if r.size else 0.0
            problem = None if err <= CONFIRM_TOL else f"its rows along axis {axis} do not log-sum-exp to 0 (off by {err:.3g})"
        if problem is not None:
            self.rules[name] = Rule(name, COSINE, f"{rule.reason}; but on the data {problem}: cosine instead")
            logger.info("fidelity: output '%s': %s", name, self.rules[name].reason)
        else:
            rule.reason += f"; confirmed on the data ({ref.shape[axis]} classes)"
            rule.axis = axis % ref.ndim
        self.confirmed.add(name)

    def _promote_probabilities(self, name: str, rule: Rule, ref: np.ndarray) -> None:
        """An output the graph does not explain is judged by top-1 when the reference shows class
        probabilities: float, non-negative, rows along the last axis (>= 2 entries) summing to 1."""
        self.confirmed.add(name)
        if not np.issubdtype(ref.dtype, np.floating) or ref.ndim == 0 or ref.shape[-1] < 2 or not ref.size:
            return
        r = ref.astype(np.float64)
        if float(r.min()) < -CONFIRM_TOL or float(np.max(np.abs(r.sum(axis=-1) - 1.0))) > CONFIRM_TOL:
            return
        self.rules[name] = Rule(name, TOP1, f"rows along the last axis are probabilities on the data (non-negative, "
                                            f"summing to 1; {ref.shape[-1]} classes): class scores", ref.ndim - 1)
        logger.info("fidelity: output '%s': %s", name, self.rules[name].reason)

    def add(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> None:
        for name, rule in list(self.rules.items()):
            r = np.asarray(ref[name])
            self.confirm(name, r)
            rule = self.rules[name]
            a = self.acc[name]
            g = np.asarray(got[name]) if name in got else None
            if g is None or r.shape != g.shape:  # a missing output or a different shape agrees nowhere
                a.positions += max(1, r.size)
                a.equal_inf = False
                continue
            if np.issubdtype(r.dtype, np.floating):
                r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
                finite = np.isfinite(r64) & np.isfinite(g64)
                if not finite.all():  # NaN/Inf must sit at the same places with the same values
                    a.equal_inf &= bool(np.array_equal(r64[~finite], g64[~finite], equal_nan=True))
                rf, gf = r64[finite], g64[finite]
                # elementwise products, not BLAS dot: a multi-threaded BLAS on a busy machine made these
                # dots ~35x slower (18 vs 0.5 ms per GPT-2 logits batch), the top cost of quantize's budget
                a.dot += float((rf * gf).sum())
                a.rr += float((rf * rf).sum())
                a.gg += float((gf * gf).sum())
                a.noise += float(((rf - gf) ** 2).sum())
            if rule.metric == TOP1:
                axis = present(rule.axis)  # a top-1 rule carries its class axis
                rc = np.moveaxis(r, axis, -1).reshape(-1, r.shape[axis])
                gc = np.moveaxis(g, axis, -1).reshape(-1, g.shape[axis])
                pick = np.argmax(np.nan_to_num(gc, nan=-np.inf), axis=1)
                ok = (rc[np.arange(len(rc)), pick] >= rc.max(axis=1)) & ~np.isnan(gc).any(axis=1)
                a.agree += float(ok.sum())
                a.positions += len(rc)
                a.margins.append(top2_margins(rc))
                diff = gc.astype(np.float64) - rc
                finite = np.isfinite(diff)
                a.noise_sq += float((diff[finite] ** 2).sum())
                a.noise_n += int(finite.sum())
            elif rule.metric == DECISION:
                a.agree += float(((r > 0.5) == (g > 0.5)).sum())
                a.positions += r.size
            elif rule.metric == EXACT:
                a.agree += float((r == g).sum())
                a.positions += r.size

    def results(self) -> list[dict]:
        """Per output: rule (metric, axis, reason), ``score`` (1.0 = identical predictions), plus
        cosine, SNR dB and agreement where defined."""
        out = []
        for name, rule in self.rules.items():
            a = self.acc[name]
            den = np.sqrt(a.rr * a.gg)
            cosine = (a.dot / den if den else float(a.rr == a.gg)) if a.equal_inf else 0.0
            snr = (10 * np.log10(a.rr / a.noise) if a.noise else float("inf")) if a.rr else None
            agreement = a.agree / a.positions if a.positions else None
            interval = wilson(a.agree, a.positions) if agreement is not None else None
            judged = None
            if rule.metric == COSINE:
                score = float(cosine)
            elif agreement is None:
                score = 1.0
            elif self.max_drop is not None and certifies(a.positions, self.max_drop):
                score, judged = present(interval)[0], "95% lower bound"  # set with agreement
            elif self.max_drop is not None and rule.metric == TOP1 and a.positions:
                # too few positions to certify: not a lucky point estimate, but the flips the margins and
                # the measured output noise predict, when they predict more
                margins = np.concatenate([*a.margins, self.extra_margins.get(name, np.zeros(0))])
                estimate = 1.0 - flip_rate(margins, math.sqrt(a.noise_sq / a.noise_n) if a.noise_n else 0.0)
                score = min(agreement, estimate)
                judged = ("margin estimate" if estimate < agreement else "point estimate") + \
                    " (too few positions to certify the budget)"
            else:
                score, judged = agreement, "point estimate" + (" (too few positions to certify the budget)"
                                                               if self.max_drop is not None else "")
            if rule.check == "raw" and rule.metric == TOP1 and judged != "95% lower bound" and cosine < score:
                # too few positions to certify top-1: the raw scores' values count too (the trained digits
                # MobileNet clustered to 16 values: logits cosine 0.94, no flip on 32 training positions,
                # 2.2% flips on the eval split)
                score, judged = float(cosine), "cosine (lower than top-1, which too few positions cannot certify)"
            if rule.check == "logits" and rule.metric == TOP1 and cosine < score:
                # a linear head only presumed to be class logits: its values count too (an embedding or
                # regression head is not free to change everywhere but at its argmax)
                score, judged = float(cosine), "cosine (lower than top-1; a linear head's values count too)"
            out.append({**rule.to_dict(), "score": float(score), "agreement": agreement, "positions": a.positions,
                        "agreement_interval": interval, "judged_by": judged,
                        "cosine": float(cosine) if rule.metric != EXACT else None,
                        "snr_db": None if snr is None or rule.metric == EXACT else (float(snr) if np.isfinite(snr) else None)})
        return out

    def score(self) -> float:
        """The worst output's score."""
        return min((r["score"] for r in self.results()), default=1.0)


def top2_margins(scores: np.ndarray) -> np.ndarray:
    """Each row's top-1 minus top-2 score (rows of ``scores``, classes along the last axis; a NaN row
    counts as a tie).  Cost: O(rows x classes)."""
    r = np.asarray(scores, np.float64)
    if r.ndim != 2 or r.shape[1] < 2 or not r.size:
        return np.zeros(0)
    top2 = np.partition(r, -2, axis=1)[:, -2:]
    return np.nan_to_num(top2[:, 1] - top2[:, 0], nan=0.0)


def flip_rate(margins: np.ndarray, sigma: float) -> float:
    """The expected fraction of top-1 flips: a position with top-2 margin m flips with probability
    P(noise difference > m) = erfc(m / (2 sigma)) / 2, sigma the RMS of ``got - ref`` over the class
    scores (the difference of two entries' noise has sigma * sqrt(2)).  The margins should come from
    as many positions as there are (every batch of the data, not only the held-out ones): the flips
    come from the few positions with small margins, which a small sample misses (the near-tied logits
    of a random-init decoder: 32 held-out positions predicted 0.6% flips, 128 positions 1.6%, 256 fresh
    positions measured 2.7%)."""
    m = np.asarray(margins, np.float64)
    if sigma <= 0.0 or not m.size:
        return 0.0
    return float(np.mean([0.5 * math.erfc(x / (2.0 * sigma)) for x in m]))


def wilson(successes: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion: how well ``n`` held-out positions pin the
    agreement down (0 flips in 32 positions only shows agreement >= 0.89)."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z / den * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float(max(0.0, center - half)), float(min(1.0, center + half))]


def certifies(n: int, max_drop: float) -> bool:
    """Whether ``n`` positions can show agreement >= 1 - max_drop at all: the lower bound of a
    perfect sample (n of n) reaches it (n >= ~380 for 0.01)."""
    return n > 0 and 1.0 - wilson(n, n)[0] <= max_drop


def uncertified(results: list[dict], max_drop: float) -> list[dict]:
    """Agreement outputs that meet ``1 - max_drop`` on the held-out positions but whose interval
    reaches below it: too few positions to be sure (the caller warns)."""
    return [r for r in results if r["agreement"] is not None and r["score"] >= 1 - max_drop
            and r["agreement_interval"][0] < 1 - max_drop]


def describe(results: list[dict]) -> str:
    """One line for logs and the report's metric name, e.g. ``top-1 agreement (probs)``."""
    names = {TOP1: "top-1 agreement", DECISION: "decision agreement", EXACT: "exact agreement", COSINE: "cosine"}
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(f"{names[r['metric']]}{', 95% lower bound' if r.get('judged_by') == '95% lower bound' else ''}",
                          []).append(r["name"])
    # a decoder has dozens of present.* outputs: at most three names per metric, then how many more
    return ", ".join(f"{label} ({', '.join(n[:3])}{f' and {len(n) - 3} more' if len(n) > 3 else ''})"
                     for label, n in groups.items())

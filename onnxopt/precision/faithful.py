"""The fp16-faithful CPU-EP session (:func:`faithful_session`): every float16 tensor rounded as fp16
kernels round it, which ``convert --fp16``'s checks and its budget search score candidates with."""

from __future__ import annotations

import os
from collections.abc import Iterable

import onnx_ir as ir

from onnxopt import runtime, shapes


def faithful_session(model: ir.Model | str | os.PathLike, threads: int = 1, extra: Iterable[str] = ()):
    """A CPU-EP session that rounds every float16 tensor (in every graph) to fp16 as fp16 kernels
    would, and the names of the main graph's float16 tensors (also outputs, to count inf/NaN);
    ``extra``: more main-graph values to return (the budget search reads float32 ones too).

    The CPU EP has few fp16 kernels: it computes the others in float32 between Casts it inserts,
    then removes Cast pairs, so a chain of fp16 ops runs in float32 and an overflow a GPU would
    produce never shows.  Two Identities (which have native fp16 kernels) after each float16 tensor,
    with ORT's graph optimizations off (they would remove them), keep each value rounded: one alone
    between two ops computed in float32 is an "isolated fp16 node" that ORT's cast insertion
    computes in float32 too (measured on ORT 1.32: h + 1500 - 1500 came back unrounded)."""
    model = _retyped(ir.load(str(model)) if not isinstance(model, ir.Model) else model)
    fp16 = []
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        for out in node.outputs:
            if out.dtype != ir.DataType.FLOAT16 or not out.uses() or node.graph is None:
                continue
            keep = ir.Node("", "Identity", [out], name=f"{out.name}__fp16_round", num_outputs=1)
            keep.outputs[0].name, keep.outputs[0].dtype = f"{out.name}__fp16_round1", out.dtype
            again = ir.Node("", "Identity", [keep.outputs[0]], name=f"{out.name}__fp16_round2", num_outputs=1)
            again.outputs[0].name, again.outputs[0].dtype = f"{out.name}__fp16_rounded", out.dtype
            for use in list(out.uses()):
                if use.node is not keep:
                    use.node.replace_input_with(use.idx, again.outputs[0])
            node.graph.insert_after(node, [keep, again])
            if node.graph is model.graph and out.name:
                fp16.append(out.name)
    source = runtime.with_outputs_of(runtime.source_of(model), list(dict.fromkeys([*fp16, *extra])))
    return runtime.session(source, "cpu", threads, optimize=False), fp16


def _retyped(model: ir.Model) -> ir.Model:
    """A copy whose main-graph value types come from onnx type inference (``shapes.infer``, which
    ignores the stored value_info that other converters leave stale); declared types fill what
    inference cannot."""
    copy = ir.from_proto(ir.to_proto(model))
    inferred = shapes.infer(copy, ort_fallback=False)
    for node in copy.graph:
        for v in node.outputs:
            dtype = inferred.dtype(v)
            if dtype is not None:
                v.dtype = dtype
    return copy

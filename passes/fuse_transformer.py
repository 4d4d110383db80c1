"""fuse-transformer: ONNX Runtime's transformer fusions (onnxruntime.transformers), validated like every pass."""

from __future__ import annotations

import collections
import logging

import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from onnxopt import io
from onnxopt.base import FunctionalOptPass, op_histogram
from onnxopt.errors import UsageError

logger = logging.getLogger(__name__)


class FuseTransformer(FunctionalOptPass):
    """Fuse attention, LayerNorm, GELU and bias patterns into ORT's com.microsoft ops.

    Runs ``onnxruntime.transformers.optimizer.optimize_model`` (the maintained successor of
    onnxruntime-tools) with ``opt_level=0``: only its Python pattern fusions, never ORT's
    EP-specific graph levels.  ``model-type`` is one of its model types (bert, gpt2, vit, ...;
    another name is a usage error when the pass is built);
    ``num-heads``/``hidden-size`` 0 lets it detect them.  The result uses com.microsoft ops that
    ONNX Runtime runs (CPU and GPU), so it is ORT-specific: not in the default pipeline.  Declines
    models whose weights exceed 2 GB (the optimizer works on an in-memory protobuf) and reports
    the fused-op counts.  The optimizer's own log lines go to its loggers at their levels (onnxopt
    does not change other libraries' logging).  The validator checks the result like any other pass.
    Cost: the optimizer's pattern matching, about O(nodes).
    """

    name = "fuse-transformer"

    def __init__(self, model_type: str = "bert", num_heads: int = 0, hidden_size: int = 0):
        super().__init__()
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        if model_type not in MODEL_TYPES:
            raise UsageError(f"fuse-transformer: unknown model-type '{model_type}' "
                             f"(known: {', '.join(sorted(MODEL_TYPES))})")
        self.model_type = model_type
        self.num_heads = num_heads
        self.hidden_size = hidden_size

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.transformers.optimizer import optimize_model

        skipped: collections.Counter = collections.Counter()
        if io.weight_bytes(model) > io.EXTERNAL_DATA_THRESHOLD:
            skipped["weights over 2 GB: onnxruntime.transformers needs an in-memory protobuf"] += 1
            return self.result(model.clone(), collections.Counter(), skipped)
        work = model.clone()  # loading its weights below must not touch the caller's model
        ir_external_data.load_to_model(work)
        before = op_histogram(work)
        optimized = optimize_model(ir.to_proto(work), model_type=self.model_type, num_heads=self.num_heads,
                                   hidden_size=self.hidden_size, opt_level=0)
        new = ir.serde.deserialize_model(optimized.model)
        after = op_histogram(new)
        changed = collections.Counter({f"{op} created": n - before.get(op, 0)
                                       for op, n in after.items() if n > before.get(op, 0)})
        if not changed:
            return self.result(work, collections.Counter(), skipped)
        return self.result(new, changed, skipped)


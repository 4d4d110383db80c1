"""fuse-conv-bn: fold an inference BatchNormalization into the Conv/ConvTranspose before it."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from onnxopt.base import OptPass, add_initializer, is_standard, substitute


class FuseConvBatchNorm(OptPass):
    """Fold BatchNormalization (inference) into the preceding Conv/ConvTranspose's weights and bias.

    Pattern: ``y = BatchNormalization(Conv(x, W[, B]), scale, bias, mean, var)``.
    Check (declines with a reason): both nodes standard-domain; the Conv output feeds only the BN
    and is not a graph output; W, B and all BN parameters are constant initializers that no user
    can override; BN is in inference mode (one output, training_mode absent or 0, spatial != 0);
    ConvTranspose only with group=1.  Rewrite: ``W' = W * s`` along the output-channel axis and
    ``B' = (B - mean) * s + bias`` with ``s = scale / sqrt(var + eps)``, computed in float64 and
    stored in W's dtype as new initializers (W may be shared); the BN is removed and, when its
    output was a graph output, the Conv output takes its name, type and dims.
    Contract: outputs within float rounding (rtol 1e-4 / atol 1e-5 for fp32).  Cost: O(nodes + weights).
    Recurses into subgraphs.
    """

    name = "fuse-conv-bn"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        for bn in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if bn.op_type != "BatchNormalization" or not is_standard(bn) or bn.graph is None:
                continue
            conv = bn.inputs[0].producer() if bn.inputs and bn.inputs[0] is not None else None
            if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or not is_standard(conv):
                continue
            reason = _check(conv, bn)
            if reason:
                skipped[reason] += 1
                continue
            _rewrite(conv, bn)
            changed[f"BatchNormalization fused into {conv.op_type}"] += 1
        return self.result(model, changed, skipped)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _check(conv: ir.Node, bn: ir.Node) -> str | None:
    conv_out = conv.outputs[0]
    if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
        return "conv output has other users"
    if conv.graph is not bn.graph:
        return "conv and BN in different graphs"
    if len(bn.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return "BN running statistics outputs are used (training)"
    training = bn.attributes.get("training_mode")
    if training is not None and training.as_int() != 0:
        return "BN in training mode"
    spatial = bn.attributes.get("spatial")
    if spatial is not None and spatial.as_int() == 0:
        return "BN with spatial=0"
    if len(bn.inputs) != 5 or not all(_constant(v) for v in bn.inputs[1:]):
        return "BN parameters are not constant"
    if len(conv.inputs) < 2 or not _constant(conv.inputs[1]):
        return "conv weight is not constant"
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and not _constant(conv.inputs[2]):
        return "conv bias is not constant"
    weight = conv.inputs[1].const_value
    if weight.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
        return "conv weight is not floating point"
    group = conv.attributes.get("group")
    if conv.op_type == "ConvTranspose" and group is not None and group.as_int() != 1:
        return "grouped ConvTranspose"
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1]
    if any(v.const_value.size != channels for v in bn.inputs[1:]):
        return "BN parameter size does not match conv output channels"
    return None


def _rewrite(conv: ir.Node, bn: ir.Node) -> None:
    graph = bn.graph
    w_value = conv.inputs[1]
    weight = w_value.const_value.numpy()
    scale, bias, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:])
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    s = scale / np.sqrt(var + eps)
    axis = 0 if conv.op_type == "Conv" else 1
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_w = (weight.astype(np.float64) * s.reshape(shape)).astype(weight.dtype)
    old_b = (conv.inputs[2].const_value.numpy().astype(np.float64)
             if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros_like(s))
    new_b = ((old_b - mean) * s + bias).astype(weight.dtype)

    base = conv.name or w_value.name
    w_init = add_initializer(graph, f"{base}_bnfused_weight", new_w)
    b_init = add_initializer(graph, f"{base}_bnfused_bias", new_b)
    conv.replace_input_with(1, w_init)
    if len(conv.inputs) > 2:
        conv.replace_input_with(2, b_init)
    else:
        conv.resize_inputs(3)
        conv.replace_input_with(2, b_init)

    substitute(bn, conv.outputs[0])  # _check made sure the conv output has no other user

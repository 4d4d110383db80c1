"""cleanup: the exporter-leftover sweep every model gets first."""

from __future__ import annotations

import collections

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from onnxopt.base import OptPass, count_initializers, count_nodes, is_standard, substitute
from onnxopt.rewrites import ort_hazards


class Cleanup(OptPass):
    """Remove dead nodes, unused initializers, initializer-backed inputs, Identity, inference Dropout; lift Constant nodes.

    Contract: outputs bit-identical; graph inputs/outputs keep their names, types and dims
    (an initializer-backed input disappears from the input list, where it is a default a user
    could override - onnxsim and onnxslim do the same); plain graph inputs are never removed,
    even unused.  A model of IR version < 4 (where every initializer *had* to be listed as an
    input, so listing says nothing about intent) is raised to IR 4 first - the only difference
    between the two is that IR 4 lets initializers be unlisted - so its weights become constants
    that fold-constants, dedup and fuse passes can use (with ``remove-initializer-inputs=false``
    the model keeps its IR version, its inputs and its Constant nodes).  Constant nodes (all
    value_* kinds) become initializers in the graph they live in.  Dropout goes when its mask is unused and training_mode is absent or a
    constant false.  Identity/Dropout whose output is a graph output is removed only when its
    input is made by a node of the same graph (the producer is renamed); otherwise kept, with a
    reason.  Recurses into If/Loop/Scan bodies; custom-domain nodes are kept unless dead.
    Cost: O(nodes + initializers).
    """

    name = "cleanup"

    def __init__(self, remove_initializer_inputs: bool = True):
        super().__init__()
        self.remove_initializer_inputs = remove_initializer_inputs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed: collections.Counter = collections.Counter()
        skipped: collections.Counter = collections.Counter()
        if self.remove_initializer_inputs and model.ir_version < 4:
            changed[f"IR version {model.ir_version} -> 4 (initializers need not be inputs)"] += 1
            model.ir_version = 4

        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if not is_standard(node) or node.graph is None:
                continue
            if node.op_type == "Constant":
                reason = _lift_constant(node) if model.ir_version >= 4 else \
                    "IR version < 4 needs initializers listed as inputs"
                if reason:
                    skipped[f"Constant kept: {reason}"] += 1
                else:
                    changed["constants lifted"] += 1
            elif node.op_type == "Identity":
                reason = _bypass(node)
                if reason:
                    skipped[f"Identity kept: {reason}"] += 1
                else:
                    changed["Identity removed"] += 1
            elif node.op_type == "Dropout":
                reason = _dropout_is_inference(node) or _bypass(node)
                if reason:
                    skipped[f"Dropout kept: {reason}"] += 1
                else:
                    changed["Dropout removed"] += 1

        if self.remove_initializer_inputs and model.ir_version >= 4:
            before = len(model.graph.inputs)
            common_passes.RemoveInitializersFromInputsPass()(model)
            changed["initializer-backed inputs removed"] = before - len(model.graph.inputs)

        nodes_before = count_nodes(model)
        inits_before = count_initializers(model)
        common_passes.RemoveUnusedNodesPass()(model)  # main-graph initializers only
        for graph in model.graphs():
            if graph is model.graph:
                continue
            for value in list(graph.initializers.values()):
                if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                    del graph.initializers[value.name]
        changed["dead nodes removed"] = nodes_before - count_nodes(model)
        changed["unused initializers removed"] = inits_before - count_initializers(model)
        changed["Div(1, x) before a Mul as Reciprocal (ORT's DivMulFusion drops its rank)"] = \
            ort_hazards.reciprocal_for_unit_division(model)
        return self.result(model, changed, skipped)


_CONSTANT_ATTRS = {
    "value": (ir.AttributeType.TENSOR, None),
    "value_float": (ir.AttributeType.FLOAT, ir.DataType.FLOAT),
    "value_floats": (ir.AttributeType.FLOATS, ir.DataType.FLOAT),
    "value_int": (ir.AttributeType.INT, ir.DataType.INT64),
    "value_ints": (ir.AttributeType.INTS, ir.DataType.INT64),
}


def _lift_constant(node: ir.Node) -> str | None:
    """Turn a Constant node into an initializer of its graph; the reason when it cannot.

    Ours rather than onnx-ir's LiftConstantsToInitializersPass because that one raises halfway
    through the graph on a malformed or sparse Constant instead of leaving it alone."""
    out = node.outputs[0]
    if out.is_graph_output():
        return "its output is a graph output"
    if len(node.attributes) != 1:
        return "malformed (not exactly one value attribute)"
    (name, attr), = node.attributes.items()
    kind = _CONSTANT_ATTRS.get(name)
    if kind is None:
        return f"{name} is not lifted"
    if attr.type != kind[0]:
        return f"malformed ({name} holds {attr.type.name})"
    if name == "value":
        tensor = attr.as_tensor()
    else:
        tensor = ir.tensor(attr.value, dtype=kind[1])
    graph = node.graph
    if out.name in graph.initializers:
        return "an initializer already has its name"
    value = ir.Value(name=out.name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape.numpy()),
                     const_value=tensor, metadata_props=out.metadata_props.copy())
    out.replace_all_uses_with(value)
    graph.remove(node, safe=True)
    graph.register_initializer(value)
    return None


def _dropout_is_inference(node: ir.Node) -> str | None:
    """None when the Dropout is a no-op at inference, else the reason it is not provably one."""
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "its mask output is used"
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        training = node.inputs[2].const_value
        if training is None or training.numpy().item():
            return "training_mode is not a constant false"
    return None


def _bypass(node: ir.Node) -> str | None:
    """Make users of node.outputs[0] read node.inputs[0] instead and remove the node."""
    if not node.inputs or node.inputs[0] is None:
        return "no input"
    return substitute(node, node.inputs[0])

"""Pipeline text, fixed-point runs, --verify-each naming the pass that broke outputs."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import pipeline, registry
from onnxopt.base import OptPass
from onnxopt.errors import UsageError
from tests.helpers import MODELS


def test_parse_pipeline_text():
    specs = pipeline.parse("cleanup, fold-constants{size-limit=4096; input-limit=1e6},dedup")
    assert [s.name for s in specs] == ["cleanup", "fold-constants", "dedup"]
    assert specs[1].options == {"size-limit": 4096, "input-limit": 1000000}
    assert str(specs[1]) == "fold-constants{size-limit=4096,input-limit=1000000}"
    assert pipeline.parse("cleanup{remove-initializer-inputs=false}")[0].options == {"remove-initializer-inputs": False}


@pytest.mark.parametrize("text, message", [
    ("cleanup,,dedup", "empty pass name"),
    ("cleanup,bogus", "unknown pass 'bogus' (known: cleanup, fold-constants, dedup"),
    ("fold-constants{nope=1}", "has no option 'nope' (options: size-limit, input-limit)"),
    ("fold-constants{size-limit=big}", "'size-limit=big' must be a int"),
    ("fold-constants{size-limit}", "must be key=value"),
    ("fold-constants{size-limit=1", "unbalanced"),
    ("Cleanup", "cannot parse"),
])
def test_parse_errors(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline.parse(text)


class ScaleFirstWeight(OptPass):
    """Test-only pass that breaks the model: multiplies the first float initializer by 10 (once)."""

    name = "break-weights"

    def call(self, model):
        for value in model.graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT \
                    and not value.meta.get("broken"):
                value.const_value = ir.tensor(value.const_value.numpy() * 10, name=value.name)
                value.meta["broken"] = True
                return self.result(model, collections.Counter({"weights scaled": 1}))
        return self.result(model, collections.Counter())


@pytest.fixture
def registered():
    """Adds passes through the registry's public API for one test, removes them afterwards."""
    added = []

    def add(name, cls):
        registry.register(name, cls)
        added.append(name)
    yield add
    for name in added:
        registry.unregister(name)


@pytest.fixture
def with_breaking_pass(registered):
    registered("break-weights", ScaleFirstWeight)


def test_validation_refuses_broken_result(cli, model_copy, tmp_path, with_breaking_pass):
    model = model_copy("cnn_bn_depthwise.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = cli("optimize", model, "-o", out, "-p", "cleanup,break-weights", "--report", rep, "--strict")
    assert result.exit_code == 3
    assert "optimized model not written" in result.stderr and "logits: max abs" in result.stderr
    assert not out.exists()
    report = json.loads(rep.read_text())
    assert report["written"] is False and not report["validation"]["ok"]
    assert report["validation"]["outputs"][0]["max_abs"] > 1e-3
    # the report names the node where the divergence starts: the first layer reading the scaled weight
    first = report["layerwise"]["first_divergence"]
    assert first["op_type"] == "Conv" and f"first divergence at node '{first['node']}'" in result.stderr
    assert [p["status"] for p in report["validation"]["points"]] == ["compared", "compared"]
    # --force writes it anyway, and says so
    result = cli("optimize", model, "-o", out, "-p", "cleanup,break-weights", "--force")
    assert result.exit_code == 0 and out.exists() and "DIVERGED" in result.output


def test_a_pass_that_breaks_the_outputs_is_rolled_back(cli, model_copy, tmp_path, with_breaking_pass):
    """Never empty-handed: without --strict the pass that changed the outputs is found (every pass
    checked), left out, and the other passes' result written, validated, exit 0, one warning line
    naming it; the report lists it.  The written model equals the pipeline without it."""
    model = model_copy("cnn_bn_depthwise.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = cli("optimize", model, "-o", out, "-p", "default,break-weights", "--report", rep)
    assert result.exit_code == 0, result.output
    assert "pass 'break-weights' changed the outputs" in result.stderr and "--strict refuses" in result.stderr
    report = json.loads(rep.read_text())
    assert [r["pass"] for r in report["rolled_back"]] == ["break-weights"] and report["validation"]["ok"]
    assert "break-weights" not in report["pipeline"] and report["written"]
    plain = tmp_path / "plain.onnx"
    assert cli("optimize", model, "-o", plain, "-p", "default").exit_code == 0
    import hashlib

    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(plain.read_bytes()).digest()


def test_verify_each_names_the_pass(cli, model_copy, tmp_path, with_breaking_pass):
    model = model_copy("exporter_opset11.onnx")
    result = cli("optimize", model, "-o", tmp_path / "o.onnx", "-p", "cleanup,fold-constants,break-weights,dedup",
                 "--verify-each")
    assert result.exit_code == 3
    assert "pass 'break-weights' changed the outputs" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_fixed_point_iteration_lets_passes_enable_each_other():
    """fold-constants exposes dead initializers that only a later cleanup removes."""
    from onnxopt import io
    model = io.load(next(m for m in MODELS if m.name == "control_flow.onnx"))
    result = pipeline.run(model, pipeline.parse("fold-constants,cleanup"))
    assert result.converged and result.iterations >= 2
    names = [r.name for r in result.records if r.modified]
    assert "fold-constants" in names and "cleanup" in names
    last = [r for r in result.records if r.iteration == result.iterations]
    assert not any(r.modified for r in last)


def test_max_iterations_reports_non_convergence(registered):
    class AlwaysChanges(OptPass):
        """Test-only: claims a change every time."""
        name = "always"

        def call(self, model):
            return self.result(model, collections.Counter({"nothing really": 1}))

    registered("always", AlwaysChanges)
    graph = ir.Graph([], [], nodes=[], name="g")
    # two passes that keep re-enabling each other (a pass is skipped only when nothing changed
    # since its own last run, so one self-changing pass alone would be treated as idempotent)
    result = pipeline.run(ir.Model(graph, ir_version=8), pipeline.parse("always,always"), max_iterations=3)
    assert not result.converged and result.iterations == 3 and len(result.records) == 6


def test_symbolic_dims_warn_once_per_input(cli, model_copy, tmp_path):
    result = cli("optimize", model_copy("cnn_dynamic.onnx"), "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "symbolic dims" in line]
    assert warnings == ["onnxopt: warning: input 'image' has symbolic dims batch, height, width: "
                        "using 1 for each (set them with --shape image:1x3x1x1)"]
    assert "warning" not in cli("-q", "optimize", model_copy("cnn_dynamic.onnx"), "-o", tmp_path / "p.onnx").stderr


def test_symbolic_dims_of_many_inputs_warn_in_one_line(cli, tmp_path):
    """Six inputs with symbolic dims (a decoder's caches are synthesized as a prompt instead, see
    test_generation): one line naming the dims and an example, not one per input."""
    from onnx import TensorProto as T
    from onnx import helper as h

    names = [f"x{i}" for i in range(6)]
    nodes = [h.make_node("Sum", names, ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, ["batch", "n"]) for n in names],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", "n"])])
    path = tmp_path / "many.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    result = cli("optimize", path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "symbolic dims" in line]
    assert warnings == ["onnxopt: warning: 6 inputs have symbolic dims batch, n: using 1 for each "
                        "(set them with --shape, e.g. --shape x0:1x1)"], warnings


class Crashes(OptPass):
    """Test-only: raises like a buggy pass would."""

    name = "crashes"

    def call(self, model):
        raise ZeroDivisionError("simulated bug")


def test_a_crashing_pass_is_one_line_exit_4(cli, model_copy, tmp_path, registered):
    registered("crashes", Crashes)
    out = tmp_path / "o.onnx"
    result = cli("optimize", model_copy("control_flow.onnx"), "-o", out, "-p", "cleanup,crashes")
    assert result.exit_code == 4 and not out.exists()
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "pass 'crashes' failed (ZeroDivisionError: simulated bug)" in errors[0]
    assert "Traceback" not in result.stderr


class BreakReshape(OptPass):
    """Test-only: gives the first Reshape an impossible constant target."""

    name = "break-reshape"

    def call(self, model):
        from onnxopt.base import add_initializer
        for node in model.graph:
            if node.op_type == "Reshape" and not node.meta.get("broken"):
                node.replace_input_with(1, add_initializer(model.graph, "bad_shape", np.array([7, 5, 3], np.int64)))
                node.meta["broken"] = True
                return self.result(model, collections.Counter({"broken": 1}))
        return self.result(model, collections.Counter())


def test_candidate_that_cannot_run_is_refused(cli, model_copy, tmp_path, registered):
    registered("break-reshape", BreakReshape)
    out = tmp_path / "o.onnx"
    result = cli("optimize", model_copy("exporter_opset11.onnx"), "-o", out, "-p", "cleanup,break-reshape", "--strict")
    assert result.exit_code == 3 and not out.exists()
    assert "the optimized model fails on ONNX Runtime" in result.stderr
    result = cli("optimize", model_copy("exporter_opset11.onnx"), "-o", out, "-p", "cleanup,break-reshape")
    assert result.exit_code == 0 and out.exists() and "pass 'break-reshape' changed the outputs" in result.stderr


def test_plugin_passes_come_from_the_entry_point_group(tmp_path, monkeypatch):
    """A package declaring ``[project.entry-points."onnxopt.passes"]`` adds a pass by name; a
    plugin cannot shadow a built-in one, and a broken plugin is a one-line usage error."""
    (tmp_path / "myplugin_mod.py").write_text(
        "import collections\nfrom onnxopt.base import OptPass\n"
        "class Noop(OptPass):\n    \"\"\"Plugin pass: changes nothing.\"\"\"\n    name = 'plugin-noop'\n"
        "    def call(self, model):\n        return self.result(model, collections.Counter())\n")
    dist = tmp_path / "myplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[onnxopt.passes]\nplugin-noop = myplugin_mod:Noop\n"
                                           "cleanup = myplugin_mod:Noop\nbroken = myplugin_mod:Missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin-noop" in registry.names() and registry.names().count("cleanup") == 1
    assert registry.get("plugin-noop").__name__ == "Noop"
    assert registry.get("cleanup").__module__ == "onnxopt.passes.cleanup"
    assert [str(s) for s in pipeline.parse("cleanup,plugin-noop")] == ["cleanup", "plugin-noop"]
    with pytest.raises(UsageError, match="pass 'broken' from plugin 'myplugin_mod:Missing' cannot be loaded"):
        registry.get("broken")
    with pytest.raises(UsageError, match="already registered"):
        registry.register("cleanup", registry.get("plugin-noop"))


def test_a_broken_rule_inside_a_pass_is_rolled_back_alone(cli, model_copy, tmp_path, monkeypatch):
    """Inside a pass made of named rules (simplify) the bisection narrows to the rule: the result keeps
    every other rule (byte-identical to simplify without the broken one) and the report names both."""
    import hashlib

    from onnxopt.base import Match, substitute
    from onnxopt.passes import simplify

    def _relu_dropped(node, ctx):
        """Relu dropped (a broken rule)"""
        return Match.ok() if substitute(node, node.inputs[0]) is None else Match.fail("kept")

    rules = {k: list(v) for k, v in simplify.RULES.items()}
    rules["Relu"] = rules.get("Relu", []) + [_relu_dropped]
    monkeypatch.setattr(simplify, "RULES", rules)
    model = model_copy("cnn_bn_depthwise.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = cli("optimize", model, "-o", out, "--report", rep)
    assert result.exit_code == 0, result.output
    assert "pass 'simplify', rule 'relu_dropped' changed the outputs" in result.stderr
    report = json.loads(rep.read_text())
    assert report["rolled_back"][0]["rule"] == "relu_dropped" and "skip=relu_dropped" in report["pipeline"]
    monkeypatch.undo()
    plain = tmp_path / "plain.onnx"
    assert cli("optimize", model, "-o", plain).exit_code == 0
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(plain.read_bytes()).digest()

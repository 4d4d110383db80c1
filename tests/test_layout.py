"""The code's shape as the command framework promises it: no import cycle among the project's
modules (imports inside functions count), no public function over 12 parameters, no function over
80 lines, no file over 700 lines in onnxopt/ and passes/, every module in passes/ registers a pass,
and every command's Options/flags/Result line up with the CLI, batch and the report schema."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from onnxopt import commands, registry
from onnxopt.commands import spec
from tests.helpers import ROOT

PACKAGES = {"onnxopt": ROOT / "onnxopt", "onnxopt.passes": ROOT / "passes"}
#: over the limits still (none)
KNOWN: set[str] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts]) if parts else package] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file, inside functions too (``from pkg
    import mod`` -> pkg.mod); not those under ``if TYPE_CHECKING:``, which never run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]:
        guard.body = []  # imports for annotations only never run
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                target = f"{base}.{a.name}"
                if target in known:
                    out.add(target)
                elif base in known:
                    out.add(base)
    return out - {name}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a module's own package __init__ runs first anyway: an edge to it is no cycle of this module's making
    graph = {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_sizes_and_parameters():
    problems = []
    for _name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 700:
            problems.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > 80:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            count -= bool(a.args) and a.args[0].arg in ("self", "cls")
            if count > 12 and not node.name.startswith("_"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {count} parameters")
    assert set(problems) <= KNOWN, "\n".join(sorted(set(problems) - KNOWN))


def test_every_pass_module_registers_a_pass():
    registered = {registry.get(n).__module__ for n in registry.names()}
    for path in (ROOT / "passes").glob("*.py"):
        if path.name != "__init__.py":
            assert f"onnxopt.passes.{path.stem}" in registered, path.name


def test_no_flag_declared_twice_and_batch_takes_exactly_the_commands_flags():
    for name in commands.NAMES:
        decls = [d for _, _, fl in spec.flags_of(commands.get(name).options) for d in fl.decls]
        assert len(decls) == len(set(decls)), name
    batch = commands.get("batch")
    passed = {p.name for p in commands.passthrough_params(batch)}
    for name in commands.BATCHED:
        for _, _, fl in spec.flags_of(commands.get(name).options):
            own = {d for _, _, f in spec.flags_of(batch.options) for d in f.decls}
            assert f"pass__{fl.key}" in passed or any(d in own for d in fl.decls), (name, fl.decls)


@pytest.mark.parametrize("name", [n for n in commands.NAMES if n != "inspect"])
def test_report_schema_matches_the_result_types(name):
    """docs/report.schema.json names every key a command's Result declares (required ones as
    required) and no key it does not: the schema is checked against the types."""
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    branch = next(b["then"] for b in schema["allOf"] if b["if"]["properties"]["command"]["const"] == name)
    required, optional = commands.get(name).result.keys()
    props = set(schema["properties"]) | set(branch.get("properties", {}))
    assert set(required) | set(optional) <= props | {"tool", "version", "command"}, \
        sorted(set(required) | set(optional) - props)
    assert set(branch.get("properties", {})) <= set(required) | set(optional), \
        sorted(set(branch.get("properties", {})) - set(required) - set(optional))
    assert set(branch.get("required", [])) <= set(required), sorted(set(branch.get("required", [])) - set(required))


def test_generated_docs_are_current():
    """docs/commands/*.md option tables and docs/report.schema.json's branches are what the Options
    and Result types generate (python -m onnxopt.commands.docs rewrites them)."""
    from onnxopt.commands import docs

    assert docs.main(["--check", "--root", str(ROOT)]) == 0


def test_batch_takes_exactly_the_commands_own_flags(cli, tmp_path):
    """batch --command X accepts X's flags (turned back into X's arguments, --per-tensor included) and
    refuses another command's flag with a usage error naming X's options; nothing runs then."""
    src = ROOT / "models" / "exporter_opset11.onnx"
    r = cli("batch", src, "-o", tmp_path / "out", "--command", "prune", "--method", "minmax")
    assert r.exit_code == 1 and "prune" in r.output and "'method' is not an option" in r.output, r.output
    assert not (tmp_path / "out" / "summary.json").exists()
    args = spec.to_args(commands.get("quantize").options, {"per_channel": False, "max_drop": 0.5, "exclude": ["a", "b"]})
    assert args == ["--per-tensor", "--max-drop", "0.5", "--exclude", "a", "--exclude", "b"]


def test_batch_passthrough_keeps_types_and_short_flags(cli, tmp_path):
    """Another command's flags keep their click types in batch (a bad --runs is a usage error before
    any model runs) and their short names (-p); a manifest key may name a pair's off flag."""
    src = ROOT / "models" / "exporter_opset11.onnx"
    r = cli("batch", src, "-o", tmp_path / "a", "--command", "bench", "--runs", "abc")
    assert r.exit_code == 1 and "--runs" in r.output
    r = cli("batch", src, "-o", tmp_path / "b", "-p", "cleanup")
    assert r.exit_code == 0, r.output
    import json

    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["models"][0]["options"] == {"pipeline": "cleanup"}
    quantize = commands.get("quantize").options
    assert spec.to_args(quantize, {"per_tensor": True, "no-latency-guard": True}) == ["--per-tensor", "--no-latency-guard"]
    assert spec.to_args(quantize, {"per_channel": True, "latency_guard": False}) == ["--per-channel", "--no-latency-guard"]


def test_api_keeps_its_keywords_and_defaults(tmp_path):
    """api.inspect's cost_shapes (positional too), quantize --search in-process from the API (the
    CLI's --workers default 0 is the CPU count), a Python-only setting counted as given."""
    from onnxopt import api
    from onnxopt.commands import quantize as q

    info = api.inspect(ROOT / "models" / "digits_cnn.onnx", {})
    assert info["cost"]["macs"] > 0 and api.inspect(ROOT / "models" / "digits_cnn.onnx")["command"] == "inspect"
    o = q.Options("a.onnx", "b.onnx", searching=q.Search(search=True))
    assert q.settings_of(o, False, None).search_workers == 1
    o = q.Options("a.onnx", "b.onnx", searching=q.Search(search=True, workers=0))
    assert q.settings_of(o, False, None).search_workers >= 1
    o = q.Options("a.onnx", "b.onnx", calibration=q.Calibration(percentile=99.9))
    assert spec.given(o, q.Options("a.onnx", "b.onnx"), q.RECIPE_SETTINGS) == ["percentile"]


def test_a_bad_metric_is_a_usage_error_before_the_data_is_read(cli, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    r = cli("prune", ROOT / "models" / "digits_cnn.onnx", "-o", tmp_path / "p.onnx", "--sparsity", "0.3",
            "--metric", "nocolon", "--data", bad)
    assert r.exit_code == 1 and "--metric" in r.output, r.output

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxopt.cli import main
from tests.helpers import ROOT


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (the >2 GB model)")


os.environ["ONNXOPT_STRICT_RESULTS"] = "1"  # a report key its Result type does not declare fails a test


@pytest.fixture(autouse=True, scope="session")
def _region_cache(tmp_path_factory):
    """quantize's cost model caches region timings per machine (onnxopt.quantization.latency_cache): the suite
    starts from an empty cache of its own, never the user's, and shares it between tests (and the
    CLI subprocesses they start) as one machine would."""
    path = tmp_path_factory.mktemp("onnxopt-cache")
    old = os.environ.get("ONNXOPT_CACHE_DIR")
    os.environ["ONNXOPT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ONNXOPT_CACHE_DIR", None)
    else:
        os.environ["ONNXOPT_CACHE_DIR"] = old


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow (writes a >2 GB model)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def isa(monkeypatch):
    """Pin the ISA-dependent weight width (quantize's ``weight_qmax``) for one test, whatever the CPU:
    ``isa("no-vnni")`` gives 7-bit CPU-EP weights (exact on every x86 CPU), ``isa("vnni")`` 8-bit.
    A test whose decisions depend on the weight width states the way it expects through this."""

    def pin(way: str) -> None:
        assert way in ("vnni", "no-vnni"), way
        monkeypatch.setenv("ONNXOPT_VNNI", "1" if way == "vnni" else "0")

    return pin


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture
def model_copy(tmp_path):
    """Copy a committed model into tmp_path (so tests never touch models/)."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copy(ROOT / "models" / name, dest)
        return dest

    return copy

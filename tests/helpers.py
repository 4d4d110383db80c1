"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODELS = sorted((ROOT / "models").glob("*.onnx"))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def ort_run(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_types(path_or_model) -> list[str]:
    model = onnx.load(str(path_or_model)) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return [n.op_type for n in model.graph.node]


def count_graph_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of a protobuf graph and all its subgraphs (benchmarks count files other tools wrote)."""
    n = 0
    for node in graph.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += count_graph_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                n += sum(count_graph_nodes(g) for g in a.graphs)
    return n


def chromium_screenshot(page: Path, tmp_path: Path, size: tuple[int, int] = (1200, 1600)):
    """Render ``page`` in headless Chromium; the screenshot as an RGB PIL image (asserts it exists)."""
    import subprocess

    from PIL import Image
    shot = tmp_path / "shot.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           f"--window-size={size[0]},{size[1]}", Path(page).as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-500:]
    with Image.open(shot) as img:
        return img.convert("RGB")


def unwritable_dir(base: Path) -> Path | None:
    """A directory where creating a file really fails: ``base/ro`` chmod-ed read-only (chmod it
    back to 0o700 when done), or sysfs/procfs when running as root; None when there is none."""
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    for candidate in (ro, Path("/sys"), Path("/proc")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    return None


def external_copy(tmp_path: Path, name: str, monkeypatch=None) -> Path:
    """models/<name>.onnx saved into tmp_path/model/ with its weights in <name>.onnx.data; with
    ``monkeypatch``, the working folder becomes tmp_path/elsewhere (bytes naming the data file would be
    resolved against it, not the model's folder)."""
    src = tmp_path / "model" / f"{name}.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(ROOT / "models" / f"{name}.onnx")), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location=f"{name}.onnx.data", size_threshold=1024)
    if monkeypatch is not None:
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
    return src

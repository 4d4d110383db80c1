"""A compact CNN whose layers' weight scales differ by 100x (built with onnx.helper in milliseconds),
for magnitude pruning: one global threshold on |w| would empty the small-scale layers.

Conv(3->16) -> Conv(16->32, x0.1) -> Conv(32->32, stride 2, x10) -> Conv(32->64, x0.1) ->
Conv(64->64, stride 2, x10) -> GlobalAveragePool -> Gemm(64->10) = ``logits``, each Conv followed
by Relu (and, with ``bn``, the second by a BatchNormalization that prepare folds into it).  The
scales cancel pairwise through the Relus (Relu(a z) = a Relu(z) for a > 0), so the function is a
fixed random teacher with He-initialized weights whose stored magnitudes are 100x apart.  Inputs
``image`` [n, 3, 16, 16]: smooth random gratings plus noise (:func:`images`), the same for every
call with the same seed.  Used by tests/test_prune_budget.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

#: (output channels, stride, weight scale) per Conv; the first is the first layer (kept dense by prune)
CONVS = ((16, 1, 1.0), (32, 1, 0.1), (32, 2, 10.0), (64, 1, 0.1), (64, 2, 10.0))
CLASSES, SIZE = 10, 16
#: spread of the log of the weights' scale (0: Gaussian weights)
TAIL = 1.2


def build(seed: int = 0, bn: bool = True) -> onnx.ModelProto:
    """The model (module docstring); ``seed`` draws the weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, src, cin = [], [], "image", 3
    for i, (cout, stride, scale) in enumerate(CONVS):
        w = _heavy_tailed(rng, (cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        b = 0.05 * rng.standard_normal(cout)
        inits += [nh.from_array((w * scale).astype(np.float32), f"conv{i}.w"),
                  nh.from_array((b * scale).astype(np.float32), f"conv{i}.b")]
        nodes.append(h.make_node("Conv", [src, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], name=f"conv{i}",
                                 pads=[1, 1, 1, 1], strides=[stride, stride]))
        out = f"c{i}"
        if bn and i == 1:
            gamma = rng.uniform(0.7, 1.3, cout)
            var = rng.uniform(0.5, 2.0, cout) * scale ** 2
            mean = 0.05 * scale * rng.standard_normal(cout)
            beta = 0.05 * scale * rng.standard_normal(cout)
            for name, v in (("gamma", gamma * np.sqrt(var)), ("beta", beta), ("mean", mean), ("var", var)):
                inits.append(nh.from_array(v.astype(np.float32), f"bn{i}.{name}"))
            nodes.append(h.make_node("BatchNormalization", [out, f"bn{i}.gamma", f"bn{i}.beta", f"bn{i}.mean",
                                                            f"bn{i}.var"], [f"n{i}"], name=f"bn{i}"))
            out = f"n{i}"
        nodes.append(h.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
        src, cin = f"r{i}", cout
    nodes += [h.make_node("GlobalAveragePool", [src], ["pooled"], name="pool"),
              h.make_node("Flatten", ["pooled"], ["flat"], name="flatten")]
    # the head sees standardized features (mean and spread on sample inputs), so every class occurs
    flat = _run(nodes, inits, "flat", cin, images(256, seed + 7))
    wf = rng.standard_normal((CLASSES, cin)) * np.sqrt(3.0 / cin) / np.maximum(flat.std(0), 0.1 * np.median(flat.std(0)) + 1e-6)
    inits += [nh.from_array(wf.astype(np.float32), "fc.w"), nh.from_array((-wf @ flat.mean(0)).astype(np.float32), "fc.b")]
    nodes.append(h.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    return _model(nodes, inits, "logits", CLASSES)


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance weights with the heavy tails of trained ones (a Gaussian scale mixture:
    most weights small, a few large), so magnitude pruning removes little of each layer's energy."""
    w = rng.standard_normal(shape) * np.exp(TAIL * rng.standard_normal(shape))
    return w / np.sqrt(np.mean(w ** 2))


def _model(nodes: list, inits: list, output: str, width: int) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "heterogeneous", [h.make_tensor_value_info("image", T.FLOAT, ["n", 3, SIZE, SIZE])],
                         [h.make_tensor_value_info(output, T.FLOAT, ["n", width])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


def _run(nodes: list, inits: list, output: str, width: int, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(_model(nodes, inits, output, width).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0].astype(np.float64)


def images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` inputs [n, 3, 16, 16] float32: two random gratings (frequency, phase, colour) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    out = np.zeros((n, 3, SIZE, SIZE))
    for _ in range(2):
        fy, fx = rng.uniform(-0.6, 0.6, (2, n, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        wave = np.sin(fy * yy + fx * xx + phase)
        out += rng.uniform(0.2, 1.0, (n, 3, 1, 1)) * wave[:, None]
    return (out + 0.1 * rng.standard_normal(out.shape)).astype(np.float32)


def write_data(folder: str | Path, batches: int = 16, batch_size: int = 16, seed: int = 0) -> Path:
    """``batches`` files ``batch_0000.npz`` ... of :func:`images` (a different seed per batch)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(batches):
        np.savez(folder / f"batch_{b:04d}.npz", image=images(batch_size, seed * 1000 + b))
    return folder

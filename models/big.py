"""A >2 GB model with external data, written without holding its weights in memory.

``python -m models.big OUT.onnx [--gb 2.2]``: a chain of 4096x4096 fp32 MatMuls (64 MiB each)
with exporter leftovers (Identity, Constant, one duplicated and one unused weight) whose
weights stream to ``OUT.onnx.data`` 64 MiB at a time.  Used by the slow test and the note's numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

from models.build import _make_model

DIM = 4096


def build(path: str | Path, gigabytes: float = 2.2) -> dict:
    path = Path(path)
    data_name = path.name + ".data"
    n = max(2, int(gigabytes * 1e9 // (DIM * DIM * 4)))
    nbytes = DIM * DIM * 4
    inits, nodes = [], []
    prev = "x"
    with open(path.parent / data_name, "wb") as f:
        for i in range(n + 1):  # the extra one is never used
            block = (np.random.default_rng(i).standard_normal((DIM, DIM)) * (1.0 / DIM) ** 0.5).astype(np.float32)
            f.write(block.tobytes())
            t = T()
            t.name, t.data_type = f"w{i}", T.FLOAT
            t.dims.extend([DIM, DIM])
            t.data_location = T.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
    dup = T()
    dup.CopyFrom(inits[0])
    dup.name = "w0_copy"  # same bytes as w0: dedup merges it
    inits.append(dup)
    for i in range(n):
        w = "w0_copy" if i == n - 1 else f"w{i}"
        nodes.append(h.make_node("MatMul", [prev, w], [f"m{i}"]))
        nodes.append(h.make_node("Identity", [f"m{i}"], [f"id{i}"]))
        prev = f"id{i}"
    nodes.append(h.make_node("Constant", [], ["scale"], value=onnx.numpy_helper.from_array(np.array(0.5, np.float32))))
    nodes.append(h.make_node("Mul", [prev, "scale"], ["y"]))
    graph = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, ["batch", DIM])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", DIM])], inits)
    model = _make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="models/big.py")
    onnx.save(model, str(path))
    return {"matmuls": n, "nodes": len(nodes), "data_bytes": (n + 1) * nbytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--gb", type=float, default=2.2)
    a = p.parse_args(argv)
    print(build(a.out, a.gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())

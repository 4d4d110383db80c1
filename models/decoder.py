"""Build an LLM-size decoder export on demand: ``python -m models.decoder OUT.onnx --preset qwen2-0.5b``.

A Qwen2-style ``Qwen2ForCausalLM`` (grouped-query attention with q/k/v biases, rotary position
embeddings, RMSNorm, SiLU MLP, tied input/output embeddings as Qwen2-0.5B has them), random init
with a fixed seed, fp32, exported with past key values by either exporter of
``models/transformers.py`` (``--exporter dynamo``: opset 18; ``ts``: TorchScript, opset 17) with the
interface of its ``llama`` exports: inputs ``input_ids`` [batch, seq], ``attention_mask``
[batch, total], ``past_{key,value}_{i}`` [batch, kv_heads, past, head_dim]; outputs ``logits``
[batch, seq, vocab] and ``present_{key,value}_{i}`` [batch, kv_heads, total, head_dim].  Every
weight of 1 kB or more lies in one file beside the model, ``OUT.onnx.data``.

Presets (``PRESETS``; fp32 weight bytes as :func:`weight_bytes` counts them):

- ``qwen2-0.5b``: Qwen2-0.5B's shape, 24 layers, hidden 896, 14/2 heads, MLP 4864, vocab 151,936
  (494M parameters, 1.98 GB),
- ``qwen2-0.5b-34l``: the same with 34 layers (643M parameters, 2.57 GB: past the 2 GB protobuf limit),
- ``tiny``: 2 layers, hidden 64, 4/2 heads, MLP 128, vocab 1,000 (for fast tests).

The results are a few GB and never committed.  The CLI first checks free disk (2.5x the weight
bytes) and available memory (3x).  ``--check`` instead runs one decode step of an existing export
in onnxruntime.  :func:`feeds` makes inputs for a prompt or a decode step of either export.
Needs ``pip install -e .[models]``.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from models.transformers import EXPORTERS, UNSTABLE_METADATA, _quiet

QWEN2_05B = dict(hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
PRESETS = {
    "qwen2-0.5b": dict(layers=24, **QWEN2_05B),
    "qwen2-0.5b-34l": dict(layers=34, **QWEN2_05B),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000),
}
MAX_POS = 32768
DISK_FACTOR, RAM_FACTOR = 2.5, 3.0


def parameters(*, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> int:
    """Parameter count of the tied-embedding Qwen2 decoder of this shape."""
    kv = kv_heads * (hidden // heads)
    attn = hidden * (hidden + 2 * kv) + (hidden + 2 * kv) + hidden * hidden  # q/k/v with biases, o
    return vocab * hidden + layers * (attn + 3 * hidden * intermediate + 2 * hidden) + hidden


def weight_bytes(**shape) -> int:
    return 4 * parameters(**shape)


def _module(torch, *, layers, hidden, heads, kv_heads, intermediate, vocab):
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS,
                      rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_sliding_window=False, bos_token_id=0, eos_token_id=0)

    class Decoder(torch.nn.Module):  # models.transformers._decode, for any layer count
        def __init__(self):
            super().__init__()
            self.model = Qwen2ForCausalLM(cfg)

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=cfg)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))

    return Decoder().eval()


def _interface(torch, layers):
    """Input/output names, TorchScript dynamic axes, dynamo dynamic shapes (models.transformers._decoder_interface)."""
    pasts = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    presents = [p.replace("past", "present") for p in pasts]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in pasts} | {n: {0: "batch", 2: "total"} for n in presents}
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=4096)
    past, total = torch.export.Dim("past", max=MAX_POS), torch.export.Dim("total", max=MAX_POS + 4096)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in pasts))
    return ["input_ids", "attention_mask", *pasts], ["logits", *presents], axes, dynamic


def build(out: Path, *, layers: int, hidden: int = 896, heads: int = 14, kv_heads: int = 2, intermediate: int = 4864,
          vocab: int = 151936, exporter: str = "dynamo", seed: int = 0) -> dict:
    """Export the decoder of this shape to ``out`` with its weights in ``out.name + ".data"``."""
    import torch

    assert exporter in EXPORTERS, exporter
    _quiet()
    start = time.perf_counter()
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)
    torch.manual_seed(seed)  # the same weights for both exporters
    shape = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab)
    module = _module(torch, **shape)
    nparams = sum(p.numel() for p in module.parameters())
    inputs, outputs, axes, dynamic = _interface(torch, layers)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    args = (torch.from_numpy(rng.integers(0, vocab, (2, 8))), torch.ones(2, 12, dtype=torch.int64),
            *(torch.randn(2, kv_heads, 4, head_dim) for _ in range(2 * layers)))
    with torch.no_grad():
        if exporter == "dynamo":  # writes out.onnx.data itself; only the graph is rewritten below
            torch.onnx.export(module, args, str(out), dynamo=True, opset_version=18, input_names=inputs,
                              output_names=outputs, dynamic_shapes=dynamic, external_data=True, verbose=False)
            del module, args
            model = onnx.load(str(out), load_external_data=False)
        else:  # past 2 GB torch writes one file per tensor: export into a scratch folder, gather into one
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".decoder-") as tmp:
                torch.onnx.export(module, args, f"{tmp}/model.onnx", dynamo=False, opset_version=17,
                                  input_names=inputs, output_names=outputs, dynamic_axes=axes)
                del module, args
                gc.collect()
                model = onnx.load(f"{tmp}/model.onnx")  # the one copy of the weights left in memory
            onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            model = onnx.load(str(out), load_external_data=False)  # drops the weights now on disk
    gc.collect()
    for node in model.graph.node:  # where this ran: rebuilds stay byte-identical
        kept = [p for p in node.metadata_props if p.key not in UNSTABLE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    model.metadata_props.add(key="source", value=f"models/decoder.py {exporter} {shape} seed={seed}")
    onnx.save(model, str(out))
    return {"path": str(out), "exporter": exporter, "parameters": nparams, "layers": layers,
            "bytes": out.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "nodes": len(model.graph.node), "seconds": round(time.perf_counter() - start, 1)}


_NUMPY = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.FLOAT: np.float32,
          onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BOOL: np.bool_}


def feeds(path, *, batch: int = 1, prompt: int = 8, past: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the export at ``path``: a prompt of ``prompt`` tokens after ``past`` cached ones (past=0:
    empty caches; prompt=1, past=N: a decode step).  Names, dtypes, heads and head size come from the graph."""
    graph = onnx.load(str(path), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    rng = np.random.default_rng(seed)
    out = {}
    for i in graph.input:
        t = i.type.tensor_type
        dtype = _NUMPY[t.elem_type]
        if i.name == "input_ids":
            out[i.name] = rng.integers(0, vocab, (batch, prompt)).astype(dtype)
        elif i.name == "attention_mask":
            out[i.name] = np.ones((batch, past + prompt), dtype)
        elif i.name == "position_ids":
            out[i.name] = np.tile(np.arange(past, past + prompt, dtype=dtype), (batch, 1))
        else:  # past_{key,value}_{i}: [batch, kv_heads, past, head_dim]
            heads, head_dim = t.shape.dim[1].dim_value, t.shape.dim[3].dim_value
            out[i.name] = rng.standard_normal((batch, heads, past, head_dim)).astype(dtype)
    return out


def check(path, *, past: int = 16) -> dict:
    """Create an onnxruntime session from ``path`` and time one decode step after ``past`` tokens."""
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    results = session.run(None, feeds(path, prompt=1, past=past))
    done = time.perf_counter()
    names = [o.name for o in session.get_outputs()]
    return {"session_s": round(loaded - start, 2), "decode_s": round(done - loaded, 3),
            "logits": list(results[names.index("logits")].shape), "finite": all(np.isfinite(r).all() for r in results)}


def _short(out: Path, shape: dict) -> str | None:
    """One line saying why there is not enough disk or memory to build ``shape``, else None."""
    import psutil

    need = weight_bytes(**shape)
    disk = shutil.disk_usage(out.parent).free
    ram = psutil.virtual_memory().available
    if disk < DISK_FACTOR * need:
        return f"refusing: {out.parent} has {disk / 1e9:.1f} GB free, needs {DISK_FACTOR * need / 1e9:.1f} GB"
    if ram < RAM_FACTOR * need:
        return f"refusing: {ram / 1e9:.1f} GB of memory available, the export needs {RAM_FACTOR * need / 1e9:.1f} GB"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=PRESETS, default="qwen2-0.5b")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="run one decode step of the existing OUT instead")
    args = parser.parse_args(argv)
    if args.check:
        print(check(args.out))
        return 0
    shape = PRESETS[args.preset] | ({"layers": args.layers} if args.layers else {})
    args.out.resolve().parent.mkdir(parents=True, exist_ok=True)
    if reason := _short(args.out.resolve(), shape):
        print(reason, file=sys.stderr)
        return 1
    print(build(args.out, exporter=args.exporter, seed=args.seed, **shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())

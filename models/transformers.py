"""Build tiny transformer exports: ``python -m models.transformers [--only NAME ...]``.

Each model is a HuggingFace ``transformers`` architecture with a tiny config (hidden 64, 2 layers,
4 heads, vocab 1,000; random init, fixed seeds), exported twice, as users export them:

- ``<arch>_ts.onnx``: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset 17),
- ``<arch>_dynamo.onnx``: the dynamo exporter (``dynamo=True``, opset 18, its default ONNX optimization).

Architectures (the attention is HF's default, ``sdpa``; each file is well under 1.5 MB):

- ``bert``: ``BertModel``; inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` [batch, seq]
  (embeddings via Gather); outputs ``last_hidden_state`` [batch, seq, 64], ``pooler_output``.
- ``gpt2``: ``GPT2LMHeadModel`` with past key values; inputs ``input_ids`` [batch, seq],
  ``attention_mask`` [batch, total] (total = past + seq), ``past_{key,value}_{i}`` [batch, 4, past, 16];
  outputs ``logits`` [batch, seq, 1000] and ``present_{key,value}_{i}`` [batch, 4, total, 16].
- ``vit``: ``ViTModel`` on 32x32 RGB images, 8x8 patches (a patch Conv + the encoder); input
  ``pixel_values`` [batch, 3, 32, 32]; outputs ``last_hidden_state`` [batch, 17, 64], ``pooler_output``.
- ``llama``: ``LlamaForCausalLM`` (grouped-query attention: 4 query heads, ``KV_HEADS`` = 2
  key/value heads; rotary position embeddings, RMSNorm, SiLU MLP) with past key values, the
  interface of ``gpt2`` with 2 heads in the cache: ``past_{key,value}_{i}`` [batch, 2, past, 16].

Rebuilds are byte-identical (the dynamo exporter's node metadata naming this file's path, line
numbers or the invoking module is dropped: ``UNSTABLE_METADATA``); ``--only llama_ts`` rebuilds one.

Needs ``pip install -e .[models]`` (torch==2.13.0 CPU, transformers, onnxscript); a few seconds per
model.  The results are committed, so tests never need torch.  :func:`feeds` makes matching inputs
for any batch/sequence/past point (numpy only).

The recurrent export in ``models/`` is ``crnn`` (models/build.py: a bidirectional LSTM, TorchScript
exporter); ``text_crnn`` and ``glyph_crnn`` (models/trained.py, trained CTC recognizers) are
convolution-only despite their names.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HIDDEN, LAYERS, HEADS, INNER, VOCAB, MAX_POS = 64, 2, 4, 128, 1000, 128
HEAD_DIM = HIDDEN // HEADS
KV_HEADS = 2  # llama: grouped-query attention, 2 key/value heads shared by 4 query heads
IMAGE, PATCH = 32, 8

EXPORTERS = ("ts", "dynamo")
ARCHS = ("bert", "gpt2", "vit", "llama")
#: node metadata of the dynamo exporter dropped from its exports: stack traces name this file's
#: path and line numbers, the module hierarchy names ``__main__`` or ``models.transformers`` as invoked
UNSTABLE_METADATA = frozenset({"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "namespace"})
#: the architectures with past key values
DECODERS = ("gpt2", "llama")
#: every model this module builds, e.g. "bert_ts", "gpt2_dynamo"
NAMES = tuple(f"{arch}_{exporter}" for arch in ARCHS for exporter in EXPORTERS)


def feeds(arch: str, batch: int = 2, seq: int = 8, past: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``arch`` ("bert", "gpt2", "vit", "llama") at one batch/sequence/past point; the
    attention masks have padding (zeros) at the end of the second row when batch > 1, so masks matter."""
    rng = np.random.default_rng(seed)
    if arch == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}
    total = seq + (past if arch in DECODERS else 0)
    mask = np.ones((batch, total), np.int64)
    if batch > 1:
        mask[1, total - max(1, seq // 3):] = 0
    out = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}
    if arch == "bert":
        out["token_type_ids"] = (np.arange(seq)[None, :] >= seq // 2).astype(np.int64).repeat(batch, 0)
    else:
        for i in range(LAYERS):
            for kv in ("key", "value"):
                heads = KV_HEADS if arch == "llama" else HEADS
                out[f"past_{kv}_{i}"] = rng.standard_normal((batch, heads, past, HEAD_DIM)).astype(np.float32)
    return out


def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _bert(torch):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INNER, max_position_embeddings=MAX_POS)

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = BertModel(cfg)

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes |= {"last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}}
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=MAX_POS)
    return Bert(), names, ["last_hidden_state", "pooler_output"], axes, ({0: batch, 1: seq},) * 3


def _gpt2(torch):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INNER, n_positions=MAX_POS,
                     bos_token_id=0, eos_token_id=0)

    return _decoder(torch, GPT2LMHeadModel(cfg))


def _decoder(torch, lm):
    """The HF causal LM ``lm`` taking past key/values as flat inputs (gpt2, llama), with its
    interface (:func:`_decoder_interface`)."""

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = lm

        def forward(self, input_ids, attention_mask, *past):
            return _decode(self.model, lm.config, input_ids, attention_mask, past)

    return (Decoder(), *_decoder_interface(torch))


def _decode(model, cfg, input_ids, attention_mask, past):
    """(logits, present key/values...) of a causal LM given past key/values as a flat tuple."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(LAYERS)], config=cfg)
    out = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
    present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return (out.logits, *present)


def _decoder_interface(torch):
    """Input names, output names, TorchScript dynamic axes and dynamo dynamic shapes of a decoder
    with past key values (gpt2, llama)."""
    pasts = [f"past_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]
    presents = [p.replace("past", "present") for p in pasts]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in pasts} | {n: {0: "batch", 2: "total"} for n in presents}
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=64)
    past, total = torch.export.Dim("past", max=64), torch.export.Dim("total", max=MAX_POS)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in pasts))
    return ["input_ids", "attention_mask", *pasts], ["logits", *presents], axes, dynamic


def _vit(torch):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=INNER)

    class ViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = ViTModel(cfg)

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    axes = {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
    return ViT(), ["pixel_values"], ["last_hidden_state", "pooler_output"], axes, ({0: torch.export.Dim("batch", max=64)},)


def _llama(torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
                      bos_token_id=0, eos_token_id=0)

    return _decoder(torch, LlamaForCausalLM(cfg))


MODULES = {"bert": _bert, "gpt2": _gpt2, "vit": _vit, "llama": _llama}


def build(name: str, out_dir: Path = HERE):
    """Export ``name`` (e.g. "gpt2_dynamo") to ``out_dir/name.onnx``; returns the loaded ModelProto."""
    import onnx
    import torch

    _quiet()
    arch, exporter = name.rsplit("_", 1)
    torch.manual_seed(zlib.crc32(arch.encode()))  # the same weights for both exporters
    module, inputs, outputs, axes, dynamic = MODULES[arch](torch)
    module.eval()
    example = feeds(arch, batch=2, seq=8, past=4)
    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    path = out_dir / f"{name}.onnx"
    with torch.no_grad():
        if exporter == "ts":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
        else:
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=inputs,
                              output_names=outputs, dynamic_shapes=dynamic, external_data=False, verbose=False)
    data = out_dir / "data" / f"{arch}_inputs.npz"
    if not data.exists():  # one batch for `onnxopt optimize --data` (synthesized ids would be out of range)
        data.parent.mkdir(exist_ok=True)
        np.savez(data, **feeds(arch, batch=2, seq=8, past=4))
    model = onnx.load(str(path))
    for node in model.graph.node:  # metadata that names where this ran: rebuilds stay byte-identical
        kept = [p for p in node.metadata_props if p.key not in UNSTABLE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    model.metadata_props.add(key="source", value=f"models/transformers.py {name}")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=NAMES, help="build just these")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: models/)")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("needs torch and transformers: pip install -e .[models]", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or NAMES:
        model = build(name, Path(args.out))
        path = Path(args.out) / f"{name}.onnx"
        print(f"{name}: {len(model.graph.node)} nodes, {path.stat().st_size / 1e3:.1f} kB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

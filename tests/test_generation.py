"""Decoder input points (onnxopt/generation.py): a prompt and a decoding step whose cache is the
prompt's own, on both exporters' decoders; anything else is left to the generic synthesizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from onnxopt import generation, runtime
from onnxopt import validation as validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["gpt2_ts", "gpt2_dynamo", "llama_ts", "llama_dynamo"])
def test_decoding_step_continues_the_prompt(name):
    """The step's logits equal the last position of one 17-token prompt with the same tokens
    (atol 1e-4): the cache fed to the step is the prompt's own present outputs, paired right; a
    random cache, or keys and values swapped, would give other logits."""
    sess = runtime.session(ROOT / "models" / f"{name}.onnx")
    face = generation.interface(sess)
    assert face is not None and face.past == "past" and face.mask == "attention_mask" and len(face.cache) == 4
    (label1, prompt, _), (label2, step, got) = generation.points(sess)
    assert label1.startswith("decoder prompt of 16 tokens") and "after 16 cached (the prompt)" in label2
    assert prompt[face.ids].shape == (1, 16) and step[face.ids].shape == (1, 1) and step[face.mask].shape == (1, 17)
    assert len(np.unique(prompt[face.ids])) > 4  # ids over the vocabulary, not [0, 4)
    whole = generation.feeds(sess, face, tokens=17, past=0, seed=0)
    whole[face.ids] = np.concatenate([prompt[face.ids], step[face.ids]], axis=1)
    full = runtime.run(sess, whole)
    np.testing.assert_allclose(got["logits"][0, -1], full["logits"][0, -1], atol=1e-4)
    swapped = dict(step)
    swapped["past_key_0"], swapped["past_value_0"] = step["past_value_0"], step["past_key_0"]
    assert np.abs(runtime.run(sess, swapped)["logits"][0, -1] - full["logits"][0, -1]).max() > 1e-3


def _model(inputs: list[tuple[str, int, list]]) -> bytes:
    """Identity-ish graph over the given inputs (name, elem type, dims)."""
    vi = [h.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    nodes = [h.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    outs = [h.make_tensor_value_info(f"{n}_out", t, d) for n, t, d in inputs]
    m = h.make_model(h.make_graph(nodes, "g", vi, outs), opset_imports=[h.make_opsetid("", 17)])
    return m.SerializeToString()


@pytest.mark.parametrize("inputs", [
    [("input_ids", T.INT64, ["b", "s"])],  # no cache
    [("input_ids", T.INT64, ["b", "s"]), ("past_key_0", T.FLOAT, ["b", 2, "p", 8]),
     ("pixel_values", T.FLOAT, ["b", 3, 8, 8])],  # an input the rules do not place
    [("input_ids", T.INT64, ["b", "s"]), ("past_key_0", T.FLOAT, ["b", 2, "p", 8]),
     ("past_value_0", T.FLOAT, ["b", 2, "q", 8])],  # no shared past dim
    [("input_ids", T.INT64, ["b", "s"]), ("token_type_ids", T.INT64, ["b", "s"]),
     ("past_key_0", T.FLOAT, ["b", 2, "p", 8])],  # two id inputs
])
def test_not_a_decoder_is_left_to_the_generic_synthesizer(inputs):
    sess = runtime.session(_model(inputs))
    assert generation.interface(sess) is None and generation.points(sess) is None
    points = validate.synthesized_points(sess)
    assert points[0].label == "synthesized, seed 0"


def test_a_cache_that_cannot_be_empty_gets_one_random_token():
    """A model whose cache must hold a token (it reads cached position 0) gets a
    prompt after one random cached token, said in the label."""
    x = [h.make_tensor_value_info("input_ids", T.INT64, ["b", "s"]),
         h.make_tensor_value_info("past_key_0", T.FLOAT, ["b", 2, "p", 4])]
    nodes = [h.make_node("Constant", [], ["zero"], value=h.make_tensor("zero", T.INT64, [], [0])),
             h.make_node("Gather", ["past_key_0", "zero"], ["m"], axis=2),  # index 0 fails on an empty cache
             h.make_node("Shape", ["input_ids"], ["sh"]),
             h.make_node("Concat", ["past_key_0", "past_key_0"], ["present_key_0"], axis=2)]
    outs = [h.make_tensor_value_info("m", T.FLOAT, None), h.make_tensor_value_info("present_key_0", T.FLOAT, None),
            h.make_tensor_value_info("sh", T.INT64, None)]
    m = h.make_model(h.make_graph(nodes, "g", x, outs), opset_imports=[h.make_opsetid("", 17)])
    sess = runtime.session(m.SerializeToString())
    found = generation.points(sess)
    assert found is not None and "after 1 random cached token" in found[0][0]
    assert found[0][1]["past_key_0"].shape == (1, 2, 1, 4)


def test_quantize_judges_a_decoder_at_prompts_and_steps(cli, tmp_path):
    """quantize --mode dynamic without --data holds out 4 prompts and their decoding steps."""
    out = tmp_path / "q.onnx"
    r = cli("quantize", ROOT / "models" / "llama_ts.onnx", "-o", out, "--mode", "dynamic", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    labels = json.loads((tmp_path / "r.json").read_text())["calibration"]["synthesized"]
    assert sum(label.startswith("decoder prompt of 16 tokens") for label in labels) == 4
    assert sum(label.startswith("decoder step") for label in labels) == 4
    onnx.checker.check_model(str(out))

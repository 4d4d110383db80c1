"""Build the reference models: ``python -m models.build [--only NAME ...]``.

Each builder writes ``models/<name>.onnx`` and is deterministic (fixed seeds).  The hand-written
ones need only onnx; the PyTorch ones need ``pip install -e .[models]`` (torch==2.13.0, CPU).
The results are committed (well under 5 MB), so tests never need torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models import round2, seeded_torch


def _make_model(graph, opset_imports, **kw) -> onnx.ModelProto:
    """onnx.helper.make_model with the lowest IR version the opsets need (not onnx's newest), so
    the models load in every ONNX Runtime we support."""
    standard = [o for o in opset_imports if o.domain in ("", "ai.onnx")]
    kw.setdefault("ir_version", onnx.helper.find_min_ir_version_for(standard))
    return onnx.helper.make_model(graph, opset_imports=opset_imports, **kw)

HERE = Path(__file__).resolve().parent
RNG = np.random.default_rng(0)


def _w(name: str, shape, scale: float = 0.1, dtype=np.float32) -> onnx.TensorProto:
    return nh.from_array((RNG.standard_normal(shape) * scale).astype(dtype), name)


def _const(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    return h.make_node("Constant", [], [name], value=nh.from_array(np.asarray(value, dtype=dtype), name + "_v"))


# ---------------------------------------------------------------- hand-written (onnx.helper)

def exporter_opset11() -> onnx.ModelProto:
    """What an older exporter writes: opset 11, Constant nodes, unfused BN, a shape chain
    Shape->Gather->Unsqueeze->Concat->Reshape, Identity/Dropout leftovers, initializers listed as
    inputs (keep_initializers_as_inputs), duplicated and unused weights; dynamic batch."""
    inits = [
        _w("conv.weight", (8, 3, 3, 3)), _w("conv.bias", (8,), 0.01),
        nh.from_array(np.abs(RNG.standard_normal(8)).astype(np.float32) + 0.5, "bn.scale"),
        _w("bn.bias", (8,)), _w("bn.mean", (8,)),
        nh.from_array(np.abs(RNG.standard_normal(8)).astype(np.float32) + 0.5, "bn.var"),
        _w("fc.weight", (8 * 8 * 8, 10), 0.02), _w("fc.bias", (10,), 0.01),
        _w("unused.weight", (16, 16)),
    ]
    inits.append(nh.from_array(nh.to_array(inits[7]).copy(), "fc.bias_copy"))  # duplicate of fc.bias
    nodes = [
        h.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"], epsilon=1e-5, name="bn"),
        h.make_node("Relu", ["b1"], ["r1"]),
        h.make_node("Identity", ["r1"], ["r1_id"]),
        h.make_node("Dropout", ["r1_id"], ["r1_do"], ratio=0.1),
        h.make_node("Shape", ["r1_do"], ["shape"]),
        _const("zero", 0, np.int64),
        h.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        h.make_node("Unsqueeze", ["batch"], ["batch_1d"], axes=[0]),
        _const("minus_one", [-1], np.int64),
        h.make_node("Concat", ["batch_1d", "minus_one"], ["new_shape"], axis=0),
        h.make_node("Reshape", ["r1_do", "new_shape"], ["flat"]),
        h.make_node("MatMul", ["flat", "fc.weight"], ["mm"]),
        h.make_node("Add", ["mm", "fc.bias"], ["logits0"]),
        # a constant sub-expression written out by the exporter: scale = 2.0 * 0.5
        _const("two", 2.0), _const("half", 0.5),
        h.make_node("Mul", ["two", "half"], ["scale"]),
        h.make_node("Mul", ["logits0", "scale"], ["logits1"]),
        h.make_node("Add", ["logits1", "fc.bias_copy"], ["logits2"]),
        h.make_node("Sub", ["logits2", "fc.bias"], ["logits3"]),
        h.make_node("Identity", ["logits3"], ["logits"]),
        h.make_node("Relu", ["logits"], ["dead_branch"]),  # never used
    ]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 8, 8])]
    inputs += [h.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]  # keep_initializers_as_inputs
    graph = h.make_graph(nodes, "exporter_opset11", inputs,
                         [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 10])], inits)
    model = _make_model(graph, opset_imports=[h.make_opsetid("", 11)], producer_name="handwritten-exporter",
                         ir_version=6)
    model.metadata_props.add(key="source", value="models/build.py exporter_opset11")
    return model


def control_flow() -> onnx.ModelProto:
    """An If whose branches hold Constant nodes, foldable arithmetic, Identity and Dropout, and a
    Loop whose body reads an outer-scope weight; opset 13."""
    then_nodes = [
        _const("t_a", [1.0, 2.0, 3.0, 4.0]), _const("t_b", [0.5, 0.5, 0.5, 0.5]),
        h.make_node("Mul", ["t_a", "t_b"], ["t_ab"]),
        h.make_node("Add", ["x", "t_ab"], ["t_sum"]),
        h.make_node("Identity", ["t_sum"], ["then_out"]),
    ]
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("then_out", T.FLOAT, None)])
    else_nodes = [
        _const("e_a", [2.0, 2.0, 2.0, 2.0]),
        h.make_node("Neg", ["e_a"], ["e_neg"]),
        h.make_node("Mul", ["x", "e_neg"], ["e_mul"]),
        h.make_node("Dropout", ["e_mul"], ["e_do"]),
        h.make_node("Relu", ["e_do"], ["else_out"]),
    ]
    else_g = h.make_graph(else_nodes, "else", [], [h.make_tensor_value_info("else_out", T.FLOAT, None)])
    body_nodes = [
        h.make_node("Identity", ["cond_in"], ["cond_out"]),
        _const("step", [0.25, 0.25, 0.25, 0.25]),
        h.make_node("Mul", ["step", "loop_scale"], ["step_scaled"]),  # outer-scope constant: foldable
        h.make_node("Add", ["acc_in", "step_scaled"], ["acc_out"]),
    ]
    body = h.make_graph(body_nodes, "body",
                        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                         h.make_tensor_value_info("acc_in", T.FLOAT, None)],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []),
                         h.make_tensor_value_info("acc_out", T.FLOAT, None)])
    nodes = [
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        _const("zero", 0.0),
        h.make_node("Greater", ["s", "zero"], ["cond"]),
        h.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        _const("trip", 3, np.int64), _const("true", True, np.bool_),
        h.make_node("Loop", ["trip", "true", "branch"], ["looped"], body=body),
        h.make_node("Identity", ["looped"], ["y"]),
    ]
    graph = h.make_graph(nodes, "control_flow", [h.make_tensor_value_info("x", T.FLOAT, ["n", 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 4])],
                         [nh.from_array(np.array([2.0], np.float32), "loop_scale")])
    return _make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="handwritten")


def fp16_mlp() -> onnx.ModelProto:
    """An fp16 MLP (MatMul/Add/Relu/Softmax run in fp16 on the CPU EP) with a Cast leftover and
    constant sub-expressions in fp16."""
    w1, w2 = _w("w1", (32, 64), 0.2, np.float16), _w("w2", (64, 10), 0.2, np.float16)
    b1 = _w("b1", (64,), 0.1, np.float16)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h1"]),
        _const("b_scale", 0.5, np.float16),
        h.make_node("Mul", ["b1", "b_scale"], ["b1s"]),
        h.make_node("Add", ["h1", "b1s"], ["h2"]),
        h.make_node("Relu", ["h2"], ["h3"]),
        h.make_node("Identity", ["h3"], ["h3i"]),
        h.make_node("MatMul", ["h3i", "w2"], ["h4"]),
        h.make_node("Softmax", ["h4"], ["probs"], axis=-1),
    ]
    graph = h.make_graph(nodes, "fp16_mlp", [h.make_tensor_value_info("x", T.FLOAT16, ["batch", 32])],
                         [h.make_tensor_value_info("probs", T.FLOAT16, ["batch", 10])], [w1, w2, b1])
    return _make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="handwritten")


def custom_domain() -> onnx.ModelProto:
    """A graph around ops of the com.microsoft domain (ORT contrib: FusedMatMul, Gelu): the optimizer
    must leave them alone and still clean up around them (their constant inputs are foldable)."""
    nodes = [
        _const("w_a", RNG.standard_normal((16, 16)).astype(np.float32) * 0.1),
        _const("w_scale", 2.0),
        h.make_node("Mul", ["w_a", "w_scale"], ["w"]),
        h.make_node("FusedMatMul", ["x", "w"], ["mm"], domain="com.microsoft", alpha=1.0, transA=0, transB=1),
        h.make_node("Identity", ["mm"], ["mm_id"]),
        h.make_node("Gelu", ["mm_id"], ["g"], domain="com.microsoft"),
        h.make_node("Add", ["g", "bias"], ["y"]),
    ]
    graph = h.make_graph(nodes, "custom_domain", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 16])], [_w("bias", (16,))])
    return _make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)],
                        producer_name="handwritten")


def fp16_overflow() -> onnx.ModelProto:
    """Activations above fp16's 65,504 on ordinary N(0, 1) inputs (opset 18): a big-magnitude
    MatMul (|x| ~ 1e5) feeding LayerNormalization, attention scores q.k^T (~1e5) feeding Softmax,
    and an RMS norm whose squares Mul(h, h) reach ~1e6 before ReduceMean/Sqrt bring them back.
    Every output is of ordinary size; converted naively to fp16 they become inf/NaN or zeros."""
    d = 32
    inits = [_w("w_big", (d, d), 6000.0), _w("ln_scale", (d,), 0.2), _w("ln_bias", (d,), 0.1),
             _w("w_q", (d, d), 20.0), _w("w_k", (d, d), 20.0), _w("w_h", (d, d), 50.0), _w("gamma", (d,), 0.5),
             nh.from_array(np.array([-1], np.int64), "last_axis"), nh.from_array(np.array(1e-6, np.float32), "eps")]
    nodes = [
        h.make_node("MatMul", ["x", "w_big"], ["big"], name="big_matmul"),
        h.make_node("LayerNormalization", ["big", "ln_scale", "ln_bias"], ["ln"], axis=-1, epsilon=1e-5, name="ln"),
        h.make_node("MatMul", ["x", "w_q"], ["q"], name="q_proj"),
        h.make_node("MatMul", ["x", "w_k"], ["k"], name="k_proj"),
        h.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1], name="k_transpose"),
        h.make_node("MatMul", ["q", "k_t"], ["scores"], name="scores"),
        h.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        h.make_node("Identity", ["ln"], ["ln_id"], name="exporter_identity"),  # a leftover the optimizer removes
        h.make_node("MatMul", ["probs", "ln_id"], ["attn"], name="attn"),
        h.make_node("MatMul", ["x", "w_h"], ["hid"], name="h_proj"),
        h.make_node("Mul", ["hid", "hid"], ["sq"], name="square"),
        h.make_node("ReduceMean", ["sq", "last_axis"], ["ms"], keepdims=1, name="mean_square"),
        h.make_node("Add", ["ms", "eps"], ["ms_eps"], name="add_eps"),
        h.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms"),
        h.make_node("Div", ["hid", "rms"], ["normed"], name="normalize"),
        h.make_node("Mul", ["normed", "gamma"], ["rms_out"], name="rms_scale"),
    ]
    graph = h.make_graph(nodes, "fp16_overflow", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8, d])],
                         [h.make_tensor_value_info("attn", T.FLOAT, ["batch", 8, d]),
                          h.make_tensor_value_info("rms_out", T.FLOAT, ["batch", 8, d])], inits)
    return _make_model(graph, opset_imports=[h.make_opsetid("", 18)], producer_name="handwritten")


# ---------------------------------------------------------------- PyTorch exports

def _cnn_module(torch):
    nn = torch.nn

    class Block(nn.Module):
        """MobileNet-style: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, residual."""

        def __init__(self, c):
            super().__init__()
            self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.pw = nn.Conv2d(c, c, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.bn2(self.pw(torch.nn.functional.relu6(self.bn1(self.dw(x)))))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(Block(16), Block(16))
            self.head = nn.Linear(16, 10)
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.head(self.drop(x))

    model = CNN()
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def cnn_bn_depthwise() -> onnx.ModelProto | None:
    """PyTorch CNN with BatchNorm kept unfused (exported without constant folding, as a
    training-mode-preserving export does) and depthwise convs; TorchScript exporter, opset 13."""
    torch = seeded_torch()
    if torch is None:
        return None
    path = HERE / "_tmp_cnn.onnx"
    torch.onnx.export(_cnn_module(torch), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=13,
                      input_names=["image"], output_names=["logits"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    return _load_and_remove(path)


def cnn_dynamic() -> onnx.ModelProto | None:
    """The same CNN with dynamic batch and spatial dims (TorchScript exporter, opset 17)."""
    torch = seeded_torch()
    if torch is None:
        return None
    path = HERE / "_tmp_dyn.onnx"
    torch.onnx.export(_cnn_module(torch), (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    return _load_and_remove(path)


def transformer_encoder() -> onnx.ModelProto | None:
    """A PyTorch transformer encoder block (MHA + FFN + LayerNorm), dynamo exporter, dynamic
    batch and sequence length, opset 18."""
    torch = seeded_torch()
    if torch is None:
        return None
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True).eval()
    path = HERE / "_tmp_tr.onnx"
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    with torch.no_grad():
        torch.onnx.export(layer, (torch.randn(2, 16, 64),), str(path), dynamo=True, opset_version=18,
                          input_names=["tokens"], output_names=["encoded"], external_data=False,
                          dynamic_shapes=({0: batch, 1: seq},), optimize=False, verbose=False)
    return _load_and_remove(path)


def yolo_head() -> onnx.ModelProto | None:
    """A YOLO-style detector: conv backbone, then the head's reshape/permute, Sigmoid, Split of
    xy/wh/conf, grid offsets, strides and a final Concat; dynamic batch, TorchScript opset 17."""
    torch = seeded_torch()
    if torch is None:
        return None
    nn = torch.nn

    class Detect(nn.Module):
        def __init__(self, anchors=3, classes=4, channels=16):
            super().__init__()
            self.na, self.no = anchors, classes + 5
            self.backbone = nn.Sequential(
                nn.Conv2d(3, channels, 3, 2, 1), nn.BatchNorm2d(channels), nn.SiLU(),
                nn.Conv2d(channels, channels, 3, 2, 1), nn.BatchNorm2d(channels), nn.SiLU())
            self.head = nn.Conv2d(channels, anchors * self.no, 1)
            self.register_buffer("anchor_wh", torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]).view(1, 3, 1, 1, 2))

        def forward(self, x):
            p = self.head(self.backbone(x))
            b, _, ny, nx = p.shape
            p = p.view(b, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
            grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()
            xy, wh, conf = p.sigmoid().split((2, 2, self.no - 4), 4)
            xy = (xy * 2 - 0.5 + grid) * 4.0
            wh = (wh * 2) ** 2 * self.anchor_wh
            return torch.cat((xy, wh, conf), 4).view(b, -1, self.no)

    path = HERE / "_tmp_yolo.onnx"
    torch.onnx.export(Detect().eval(), (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["detections"],
                      dynamic_axes={"images": {0: "batch"}, "detections": {0: "batch"}})
    return _load_and_remove(path)


def crnn() -> onnx.ModelProto | None:
    """A CRNN text-line recognizer: conv feature extractor, bidirectional LSTM over the width,
    per-step classifier with log-softmax (CTC-style output); dynamic batch and width, opset 17."""
    torch = seeded_torch()
    if torch is None:
        return None
    nn = torch.nn

    class CRNN(nn.Module):
        def __init__(self, classes=37):
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)))
            self.rnn = nn.LSTM(32 * 8, 48, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(96, classes)

        def forward(self, x):
            f = self.cnn(x)  # [B, 32, 8, W/2]
            b, c, hh, w = f.shape
            f = f.permute(0, 3, 1, 2).reshape(b, w, c * hh)
            out, _ = self.rnn(f)
            return self.fc(out).log_softmax(-1)

    path = HERE / "_tmp_crnn.onnx"
    torch.onnx.export(CRNN().eval(), (torch.randn(1, 1, 32, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["line"], output_names=["log_probs"],
                      dynamic_axes={"line": {0: "batch", 3: "width"}, "log_probs": {0: "batch", 1: "steps"}})
    return _load_and_remove(path)


def bert_encoder() -> onnx.ModelProto | None:
    """A BERT-style encoder written as HF BERT is: token+position embeddings, LayerNorm, two layers
    of separate Q/K/V Linear, reshape/transpose into heads, scaled softmax with an additive mask,
    erf-GELU FFN, residual LayerNorms; dynamo exporter, dynamic batch and sequence, opset 18."""
    torch = seeded_torch()
    if torch is None:
        return None
    nn = torch.nn
    hidden, heads, inner, vocab, max_len = 64, 4, 128, 100, 64

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.ff1, self.ff2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

        def split(self, t):
            b, s, _ = t.shape
            return t.view(b, s, heads, hidden // heads).transpose(1, 2)

        def forward(self, x, mask):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + mask
            ctx = (scores.softmax(-1) @ v).transpose(1, 2)
            ctx = ctx.reshape(ctx.shape[0], ctx.shape[1], hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(max_len, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.ln(self.tok(input_ids) + self.pos(positions))
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
            for layer in self.layers:
                x = layer(x, mask)
            return x

    path = HERE / "_tmp_bert.onnx"
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=max_len)
    ids = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        torch.onnx.export(Bert().eval(), (ids, torch.ones(2, 16, dtype=torch.int64)), str(path), dynamo=True,
                          opset_version=18, input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          external_data=False, optimize=False, verbose=False,
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    return _load_and_remove(path)


def qdq_conv() -> onnx.ModelProto:
    """An already-quantized (QDQ) conv net as quantization tools write it: int8 per-channel weights
    behind DequantizeLinear, uint8 activations through QuantizeLinear/DequantizeLinear pairs, an
    int32 bias; plus exporter leftovers around it (Identity, a Constant).  Opset 13."""
    w = RNG.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    w_scale = (RNG.uniform(0.001, 0.01, 8)).astype(np.float32)
    inits = [
        nh.from_array(np.array(0.02, np.float32), "x_scale"), nh.from_array(np.array(128, np.uint8), "x_zp"),
        nh.from_array(w, "w_q"), nh.from_array(w_scale, "w_scale"), nh.from_array(np.zeros(8, np.int8), "w_zp"),
        nh.from_array(RNG.integers(-1000, 1000, 8).astype(np.int32), "b_q"),
        nh.from_array((w_scale * 0.02).astype(np.float32), "b_scale"), nh.from_array(np.zeros(8, np.int32), "b_zp"),
        nh.from_array(np.array(0.05, np.float32), "y_scale"), nh.from_array(np.array(0, np.uint8), "y_zp"),
    ]
    nodes = [
        h.make_node("Identity", ["x"], ["x_id"]),
        h.make_node("QuantizeLinear", ["x_id", "x_scale", "x_zp"], ["x_q"]),
        h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0),
        h.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b_dq"], axis=0),
        h.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["conv"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["conv"], ["relu"]),
        h.make_node("QuantizeLinear", ["relu", "y_scale", "y_zp"], ["y_q"]),
        h.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y_dq"]),
        _const("one", 1.0),
        h.make_node("Mul", ["y_dq", "one"], ["y"]),
    ]
    graph = h.make_graph(nodes, "qdq_conv", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 16, 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8, 16, 16])], inits)
    return _make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="handwritten-quantizer")


def integer_ops() -> onnx.ModelProto:
    """Dynamic-quantization style integer ops: DynamicQuantizeLinear feeding MatMulInteger and
    ConvInteger with int8/uint8 weights, rescaled in float; opset 13."""
    w_mm = RNG.integers(-100, 100, (16, 8)).astype(np.int8)
    w_conv = RNG.integers(0, 255, (4, 1, 3, 3)).astype(np.uint8)
    inits = [nh.from_array(w_mm, "w_mm"), nh.from_array(np.array(0, np.int8), "w_mm_zp"),
             nh.from_array(w_conv, "w_conv"), nh.from_array(np.array(128, np.uint8), "w_conv_zp"),
             nh.from_array(np.array(0.01, np.float32), "w_mm_scale"),
             nh.from_array(np.array(0.02, np.float32), "w_conv_scale"),
             nh.from_array(np.array([1, 1, 4, 4], np.int64), "img_shape")]
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
        h.make_node("MatMulInteger", ["xq", "w_mm", "xzp", "w_mm_zp"], ["mm_i32"]),
        h.make_node("Cast", ["mm_i32"], ["mm_f"], to=T.FLOAT),
        h.make_node("Mul", ["xs", "w_mm_scale"], ["mm_scale"]),
        h.make_node("Mul", ["mm_f", "mm_scale"], ["mm"]),
        h.make_node("Identity", ["mm"], ["mm_id"]),
        h.make_node("Reshape", ["mm_id", "img_shape"], ["img"]),
        h.make_node("DynamicQuantizeLinear", ["img"], ["iq", "is", "izp"]),
        h.make_node("ConvInteger", ["iq", "w_conv", "izp", "w_conv_zp"], ["conv_i32"], pads=[1, 1, 1, 1]),
        h.make_node("Cast", ["conv_i32"], ["conv_f"], to=T.FLOAT),
        h.make_node("Mul", ["is", "w_conv_scale"], ["conv_scale"]),
        h.make_node("Mul", ["conv_f", "conv_scale"], ["y"]),
    ]
    graph = h.make_graph(nodes, "integer_ops", [h.make_tensor_value_info("x", T.FLOAT, [2, 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 4, 4])], inits)
    return _make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="handwritten-quantizer")


def deep_mlp(blocks: int = 125, width: int = 64, corrupt: int | None = None) -> onnx.ModelProto:
    """A 4 x ``blocks``-node residual MLP (MatMul, Add bias, Relu, Add residual per block);
    with ``corrupt=i`` the i-th block's weight is scaled by 10 (a deliberately broken copy for
    the layerwise search).  Built on the fly by tests; not committed."""
    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        w = (rng.standard_normal((width, width)) * (0.5 / np.sqrt(width))).astype(np.float32)
        if corrupt == i:
            w = w * 10
        inits += [nh.from_array(w, f"w{i}"), nh.from_array((rng.standard_normal(width) * 0.01).astype(np.float32), f"b{i}")]
        nodes += [h.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"block{i}/matmul"),
                  h.make_node("Add", [f"mm{i}", f"b{i}"], [f"lin{i}"], name=f"block{i}/bias"),
                  h.make_node("Relu", [f"lin{i}"], [f"act{i}"], name=f"block{i}/relu"),
                  h.make_node("Add", [prev, f"act{i}"], [f"res{i}"], name=f"block{i}/residual")]
        prev = f"res{i}"
    graph = h.make_graph(nodes, "deep_mlp", [h.make_tensor_value_info("x", T.FLOAT, [4, width])],
                         [h.make_tensor_value_info(prev, T.FLOAT, [4, width])], inits)
    return _make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="handwritten")


def _load_and_remove(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    path.unlink()
    data = Path(str(path) + ".data")
    if data.exists():
        data.unlink()
    return model


BUILDERS = {
    "exporter_opset11": exporter_opset11,
    "control_flow": control_flow,
    "fp16_mlp": fp16_mlp,
    "custom_domain": custom_domain,
    "cnn_bn_depthwise": cnn_bn_depthwise,
    "cnn_dynamic": cnn_dynamic,
    "transformer_encoder": transformer_encoder,
    "yolo_head": yolo_head,
    "crnn": crnn,
    "bert_encoder": bert_encoder,
    "qdq_conv": qdq_conv,
    "integer_ops": integer_ops,
    "fp16_overflow": fp16_overflow,
}
BUILDERS.update(round2.BUILDERS)  # issue 22's exports (PyTorch and Keras/tf2onnx): models/round2.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS), help="build just these")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: models/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    global RNG
    for name in args.only or BUILDERS:
        RNG = np.random.default_rng(zlib.crc32(name.encode()))  # same weights whichever builders run
        model = BUILDERS[name]()
        if model is None:
            print(f"{name}: skipped (needs torch, or tensorflow-cpu and tf2onnx: pip install -e .[models])", file=sys.stderr)
            continue
        onnx.checker.check_model(model)
        path = Path(args.out) / f"{name}.onnx"
        onnx.save(model, str(path))
        print(f"{name}: {len(model.graph.node)} nodes, {path.stat().st_size / 1e3:.1f} kB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

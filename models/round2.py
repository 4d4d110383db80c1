"""Exports of the patterns issue 22 ("Graph round 2") names, built by code in seconds:
``python -m models.build --only rnn_ts rnn_dynamo unet_resize_ts ...`` (or ``python -m models.round2``).

PyTorch (``pip install -e .[models]``: torch==2.13.0, CPU):

- ``rnn_ts`` / ``rnn_dynamo``: an LSTM then a GRU over ``[batch, time, 8]`` (dynamic batch, and time with
  TorchScript), both exporters; the zero initial states are built at run time from the input's batch dim.
- ``unet_resize_ts`` / ``unet_resize_dynamo``: a small U-Net whose decoder upsamples with
  ``F.interpolate(size=skip.shape[-2:])`` (Resize with sizes computed from Shape), dynamic batch/height/width.

Keras through tf2onnx (``tensorflow-cpu``, ``tf2onnx`` in the same extra), opset 17:

- ``keras_lstm``: two stacked LSTMs and a Dense head, dynamic batch and time.
- ``keras_attention``: a MultiHeadAttention block with a causal mask, LayerNormalization and an FFN.
- ``keras_unet``: an NHWC U-Net (Conv2D/MaxPooling2D/UpSampling2D/Concatenate), dynamic batch, height, width.
- ``keras_resnet``: a ResNet50-style stem (ZeroPadding2D(3) + 7x7/2 Conv + BN + ReLU + ZeroPadding2D(1) +
  MaxPool 3x3/2) and two residual blocks, dynamic batch.

Each builder returns an ``onnx.ModelProto`` (None when its framework is not installed); weights come from
fixed seeds, and every file is well under 1 MB.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from models import seeded_torch

# ---------------------------------------------------------------- PyTorch




def _rnn_module(torch):
    nn = torch.nn

    class RNNs(nn.Module):
        """LSTM then GRU, batch first; the initial states default to zeros (the exporters build them)."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.gru = nn.GRU(16, 12, batch_first=True)
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            y, _ = self.lstm(x)
            z, h = self.gru(y)
            return self.fc(z), h

    return RNNs().eval()


def _unet_module(torch):
    nn, F = torch.nn, torch.nn.functional

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2, self.e3 = block(3, 8), block(8, 16), block(16, 32)
            self.d2, self.d1 = block(32 + 16, 16), block(16 + 8, 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            s1 = self.e1(x)
            s2 = self.e2(F.max_pool2d(s1, 2))
            b = self.e3(F.max_pool2d(s2, 2))
            u2 = F.interpolate(b, size=s2.shape[-2:], mode="bilinear", align_corners=False)
            d2 = self.d2(torch.cat([u2, s2], 1))
            u1 = F.interpolate(d2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
            return self.head(self.d1(torch.cat([u1, s1], 1)))

    return UNet().eval()


def _export_torch(module, args, names, outputs, axes, dynamo: bool) -> onnx.ModelProto:
    torch = seeded_torch()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            if dynamo:
                dims = {name: torch.export.Dim(name, min=2 if name in ("height", "width") else 1, max=1024)
                        for spec in axes.values() for name in spec.values()}
                shapes = tuple({i: dims[n] for i, n in axes[a].items()} if a in axes else None for a in names)
                torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=names,
                                  output_names=outputs, dynamic_shapes=shapes, external_data=False, verbose=False)
            else:
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                                  output_names=outputs, dynamic_axes=axes)
        model = onnx.load(str(path))
    for node in model.graph.node:  # the exporter's source locations name this machine: drop them
        del node.metadata_props[:]
    del model.metadata_props[:]
    return model


def _rnn(dynamo: bool) -> onnx.ModelProto | None:
    torch = seeded_torch()
    if torch is None:
        return None
    # dynamo: the time dim stays static (the exporter specializes it through the unrolled sequence loop)
    return _export_torch(_rnn_module(torch), (torch.randn(2, 5, 8),), ["x"], ["y", "h"],
                         {"x": {0: "batch"} if dynamo else {0: "batch", 1: "time"}}, dynamo)


def rnn_ts() -> onnx.ModelProto | None:
    """LSTM + GRU, TorchScript exporter (opset 17), dynamic batch and time."""
    return _rnn(False)


def rnn_dynamo() -> onnx.ModelProto | None:
    """LSTM + GRU, dynamo exporter (opset 18), dynamic batch (time 5)."""
    return _rnn(True)


def _unet(dynamo: bool) -> onnx.ModelProto | None:
    torch = seeded_torch()
    if torch is None:
        return None
    return _export_torch(_unet_module(torch), (torch.randn(1, 3, 32, 48),), ["image"], ["mask"],
                         {"image": {0: "batch", 2: "height", 3: "width"}}, dynamo)


def unet_resize_ts() -> onnx.ModelProto | None:
    """U-Net with Resize to the skip's size, TorchScript exporter (opset 17), dynamic batch/height/width."""
    return _unet(False)


def unet_resize_dynamo() -> onnx.ModelProto | None:
    """U-Net with Resize to the skip's size, dynamo exporter (opset 18), dynamic batch/height/width."""
    return _unet(True)


# ---------------------------------------------------------------- Keras through tf2onnx


def _keras():
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
        import tensorflow as tf
        import tf2onnx  # noqa: F401
    except ImportError:
        return None
    keras.utils.set_random_seed(0)
    return keras, tf


def _convert(model, shapes: dict[str, tuple]) -> onnx.ModelProto:
    import tensorflow as tf
    import tf2onnx
    spec = tuple(tf.TensorSpec(shape, tf.float32, name=name) for name, shape in shapes.items())
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    proto.producer_version = "tf2onnx"  # the converter writes its full version+commit: keep rebuilds identical
    return proto


def keras_lstm() -> onnx.ModelProto | None:
    """Two stacked Keras LSTMs (the first returns sequences) and a Dense head; dynamic batch and time."""
    k = _keras()
    if k is None:
        return None
    keras, _ = k
    x = keras.Input((None, 8), name="x")
    y = keras.layers.LSTM(16, return_sequences=True)(x)
    y = keras.layers.LSTM(12)(y)
    model = keras.Model(x, keras.layers.Dense(4)(y))
    return _convert(model, {"x": (None, None, 8)})


def keras_attention() -> onnx.ModelProto | None:
    """A Keras transformer block: causal MultiHeadAttention (2 heads), residual + LayerNormalization, a
    ReLU FFN; dynamic batch and sequence length."""
    k = _keras()
    if k is None:
        return None
    keras, _ = k
    x = keras.Input((None, 16), name="x")
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x, use_causal_mask=True)
    y = keras.layers.LayerNormalization()(x + a)
    f = keras.layers.Dense(16)(keras.layers.Dense(32, activation="relu")(y))
    model = keras.Model(x, keras.layers.LayerNormalization()(y + f))
    return _convert(model, {"x": (None, None, 16)})


def keras_unet() -> onnx.ModelProto | None:
    """An NHWC Keras U-Net (two levels), dynamic batch, height and width (multiples of 4)."""
    k = _keras()
    if k is None:
        return None
    keras, _ = k
    L = keras.layers

    def block(t, c):
        t = L.Conv2D(c, 3, padding="same", activation="relu")(t)
        return L.Conv2D(c, 3, padding="same", activation="relu")(t)

    x = keras.Input((None, None, 3), name="image")
    s1 = block(x, 8)
    s2 = block(L.MaxPooling2D()(s1), 16)
    b = block(L.MaxPooling2D()(s2), 32)
    d2 = block(L.Concatenate()([L.UpSampling2D()(b), s2]), 16)
    d1 = block(L.Concatenate()([L.UpSampling2D()(d2), s1]), 8)
    model = keras.Model(x, L.Conv2D(2, 1, activation="sigmoid")(d1))
    return _convert(model, {"image": (None, None, None, 3)})


def keras_resnet() -> onnx.ModelProto | None:
    """A Keras ResNet50-style stem and two residual blocks (BN after every Conv), 64x64 NHWC input,
    dynamic batch."""
    k = _keras()
    if k is None:
        return None
    keras, _ = k
    L = keras.layers

    x = keras.Input((64, 64, 3), name="image")
    t = L.ZeroPadding2D(3)(x)
    t = L.Conv2D(16, 7, strides=2)(t)
    t = L.Activation("relu")(L.BatchNormalization()(t))
    t = L.ZeroPadding2D(1)(t)
    t = L.MaxPooling2D(3, strides=2)(t)
    for c in (16, 32):
        shortcut = t if c == 16 else L.BatchNormalization()(L.Conv2D(c, 1, strides=2)(t))
        y = L.Conv2D(c, 3, strides=1 if c == 16 else 2, padding="same")(t)
        y = L.Activation("relu")(L.BatchNormalization()(y))
        y = L.BatchNormalization()(L.Conv2D(c, 3, padding="same")(y))
        t = L.Activation("relu")(L.Add()([y, shortcut]))
    t = L.GlobalAveragePooling2D()(t)
    model = keras.Model(x, L.Dense(10)(t))
    import numpy as np
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial BN statistics, as after training
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.1, 0.1, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(0.5, 1.5, n)])
    return _convert(model, {"image": (None, 64, 64, 3)})


BUILDERS = {
    "rnn_ts": rnn_ts, "rnn_dynamo": rnn_dynamo, "unet_resize_ts": unet_resize_ts, "unet_resize_dynamo": unet_resize_dynamo,
    "keras_lstm": keras_lstm, "keras_attention": keras_attention, "keras_unet": keras_unet, "keras_resnet": keras_resnet,
}

#: concrete sizes for the symbolic dims (tests and the benchmark feed these)
SHAPES = {
    "rnn_ts": {"x": (3, 7, 8)}, "rnn_dynamo": {"x": (3, 5, 8)},
    "unet_resize_ts": {"image": (2, 3, 40, 56)}, "unet_resize_dynamo": {"image": (2, 3, 40, 56)},
    "keras_lstm": {"x": (3, 7, 8)}, "keras_attention": {"x": (2, 6, 16)},
    "keras_unet": {"image": (2, 48, 64, 3)}, "keras_resnet": {"image": (2, 64, 64, 3)},
}


if __name__ == "__main__":
    import sys

    from models import build
    sys.exit(build.main(["--only", *BUILDERS, *sys.argv[1:]]))

"""Input data for validation, benchmarking (and later calibration), one batch at a time.

``--data`` accepts:
- ``file.npz``: one batch, arrays by input name;
- a directory of ``.npz`` files (one batch each, arrays by input name) and/or ``.npy`` files (one
  batch each, only for single-input models), read in sorted order;
- a directory of images (``.png .jpg .jpeg .bmp .gif .tif .tiff .webp``), for single-image-input
  models, preprocessed by ``--preprocess "resize=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw"``
  (keys: resize WxH, mean, std, scale (default 1/255), layout nchw|nhwc, channels 3|1, batch N).
Batches are produced lazily (a generator), so memory is flat in the number of batches; each batch
is checked against the model's inputs (names, dtypes, ranks, static dims, NaN/Inf).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxopt import runtime
from onnxopt.errors import BadInputError, UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    resize: tuple[int, int] | None = None  # (width, height)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str = "nchw"
    channels: int = 3
    batch: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Preprocess:
        if not text:
            return cls()
        fields: dict = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            try:
                if not sep:
                    raise ValueError
                if key == "resize":
                    size = re.fullmatch(r"(\d+)x(\d+)", value)
                    if size is None:
                        raise ValueError
                    w, h = size.groups()
                    fields["resize"] = (int(w), int(h))
                elif key in ("mean", "std"):
                    fields[key] = tuple(float(v) for v in value.split("/"))
                elif key == "scale":
                    num, _, den = value.partition("/")
                    fields["scale"] = float(num) / float(den or 1)
                elif key == "layout":
                    if value not in ("nchw", "nhwc"):
                        raise ValueError
                    fields["layout"] = value
                elif key in ("channels", "batch"):
                    fields[key] = int(value)
                else:
                    raise UsageError(f"--preprocess: unknown key '{key}' (resize, mean, std, scale, layout, channels, batch)")
            except (ValueError, AttributeError):
                raise UsageError(f"--preprocess: cannot read '{item}'") from None
        return cls(**fields)

    def image(self, path: Path) -> np.ndarray:
        """One image as float32 CHW/HWC (no batch dim)."""
        from PIL import Image  # optional at import time: only image folders need Pillow

        try:
            with Image.open(path) as opened:
                img = opened.convert("RGB" if self.channels == 3 else "L")
                if self.resize:
                    img = img.resize(self.resize, Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - OSError, DecompressionBombError, ValueError, ...
            raise BadInputError(f"{path}: cannot read image ({_first_line(e)})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = ((arr * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)
        return arr.transpose(2, 0, 1) if self.layout == "nchw" else arr


def batches(source: str | os.PathLike, sess: ort.InferenceSession, preprocess: str | None = None,
            limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield checked feed dicts from ``source`` (see module docstring); at most ``limit`` batches."""
    p = Path(source)
    if not p.exists():
        raise BadInputError(f"{p}: no such data file or directory")
    count = 0
    for feeds in _raw_batches(p, sess, Preprocess.parse(preprocess)):
        yield runtime.check_feeds(feeds, sess, str(p))
        count += 1
        if limit is not None and count >= limit:
            return
    if count == 0:
        raise BadInputError(f"{p}: no data found (expected .npz, .npy or image files)")


def _raw_batches(p: Path, sess: ort.InferenceSession, prep: Preprocess) -> Iterator[dict[str, np.ndarray]]:
    inputs = sess.get_inputs()
    if p.is_file():
        if p.suffix != ".npz":
            raise BadInputError(f"{p}: a data file must be .npz (arrays by input name)")
        yield _read_npz(p)
        return
    files = sorted(f for f in p.iterdir() if f.is_file())
    arrays = [f for f in files if f.suffix in (".npz", ".npy")]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if arrays:
        for f in arrays:
            if f.suffix == ".npz":
                yield _read_npz(f)
            else:
                if len(inputs) != 1:
                    raise BadInputError(f"{f}: .npy batches need a single-input model; use .npz with arrays by input name")
                try:
                    array = np.load(f, allow_pickle=False)
                except Exception as e:  # noqa: BLE001 - OSError, ValueError, EOFError (empty file), ...
                    raise BadInputError(f"{f}: not a readable .npy file ({_first_line(e)})") from None
                yield {inputs[0].name: array}
        return
    if images:
        if len(inputs) != 1:
            raise BadInputError(f"{p}: image folders need a single-input model (this one has {len(inputs)} inputs)")
        for i in range(0, len(images), prep.batch):
            batch = np.stack([prep.image(f) for f in images[i:i + prep.batch]])
            yield {inputs[0].name: batch}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip/npy errors of many kinds
        raise BadInputError(f"{path}: not a readable .npz file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def feeds_for(sess: ort.InferenceSession, data: str | os.PathLike | None, shapes: Mapping[str, tuple[int, ...]] | None,
              preprocess: str | None = None, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batches from ``data`` (at most ``limit``), or one synthesized batch."""
    if data is None:
        return [runtime.synthesize_runnable(sess, shapes)]
    return list(batches(data, sess, preprocess, limit))

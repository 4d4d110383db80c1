"""Task metrics and calibration data for the trained reference models (``models/trained.py``).

The metric functions follow onnxopt's ``--metric module:function`` contract: they take an
``onnxruntime.InferenceSession`` and return a score, higher is better (here: accuracy in [0, 1]).
They read the committed held-out splits in ``models/data``; nothing is downloaded.

Validation splits (for ``--max-drop`` budgets, which must not be chosen on the eval split the results
report): ``digits_val_accuracy`` scores the digits training images from index ``DIGITS_VAL_START`` on
(``write_calibration`` never reaches them: it cycles below that index). There are no unseen digits
besides the eval split (scikit-learn's 1,797 are all used), so these are images the models were trained
on (accuracy 1.0): a proxy that tracks how much of the fit a lossy step destroys, but less sensitive than
unseen data. ``text_val_exact_match`` scores 400 unseen lines (``text_crnn_val.npz``, rendered with a
seed used neither for training nor for the eval split nor for the calibration lines).

``python -m models.tasks calib NAME DIR [--batches 16] [--batch-size 8]`` writes a calibration
folder (one ``.npz`` per batch, arrays by input name) from the committed training split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: glyph_crnn's 1,000 classes (+ blank): the first 1,000 letters/digits of Latin, Latin-1, Latin
#: Extended-A/B, IPA, Greek, Cyrillic and Latin Extended Additional that DejaVu Sans draws, with
#: glyphs drawn pixel-identical to an earlier one (Latin A / Greek Alpha / Cyrillic A) dropped.
#: Written by ``models.trained`` (``glyph_alphabet``), committed, read here without fonts.
GLYPH_ALPHABET_FILE = DATA / "glyph_alphabet.txt"


def glyph_alphabet() -> str:
    return GLYPH_ALPHABET_FILE.read_text(encoding="utf-8").strip("\n")


def digits_preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, 8, 8] (0..16) -> float32 [N, 1, size, size] in [0, 1] (nearest upscaling)."""
    x = images.astype(np.float32)[:, None] / 16.0
    rep = size // 8
    return np.repeat(np.repeat(x, rep, axis=2), rep, axis=3) if rep > 1 else x


def text_preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, W] -> float32 [N, 1, 32, W], ink high (1 - x/255)."""
    return (1.0 - images.astype(np.float32) / 255.0)[:, None]


def ctc_decode(log_probs: np.ndarray, alphabet: str = ALPHABET) -> list[str]:
    """Greedy CTC decoding of [N, T, 1 + len(alphabet)] scores (class 0 is the blank)."""
    out = []
    for row in log_probs.argmax(-1):
        chars, prev = [], 0
        for k in row:
            if k != prev and k != 0:
                chars.append(alphabet[k - 1])
            prev = k
        out.append("".join(chars))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _load(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / f"{name}_{split}.npz") as z:
        return z["x"], z["y"]


def _model_inputs(sess_or_name, images: np.ndarray, name: str | None = None) -> np.ndarray:
    if name == "text_crnn" or images.shape[1:] == (32, 128):
        return text_preprocess(images)
    size = sess_or_name.get_inputs()[0].shape[2] if not isinstance(sess_or_name, int) else sess_or_name
    return digits_preprocess(images, int(size))


def _run(session, x: np.ndarray, batch: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def digits_accuracy(session) -> float:
    """Top-1 accuracy on the held-out 20% of scikit-learn's digits (360 images)."""
    images, labels = _load("digits", "eval")
    x = _model_inputs(session, images)
    return float((_run(session, x).argmax(1) == labels).mean())


def text_exact_match(session) -> float:
    """Exact-match rate of greedy CTC decoding on 400 held-out rendered text lines."""
    images, texts = _load("text_crnn", "eval")
    pred = ctc_decode(_run(session, text_preprocess(images)))
    return float(np.mean([p == t for p, t in zip(pred, texts)]))


#: digits training images ``[DIGITS_VAL_START:]`` (413) are the validation split; calibration stays below.
DIGITS_VAL_START = 1024


def digits_val_accuracy(session) -> float:
    """Top-1 accuracy on the digits validation split (training images 1024..1436, never calibration data)."""
    images, labels = _load("digits", "calib")
    images, labels = images[DIGITS_VAL_START:], labels[DIGITS_VAL_START:]
    return float((_run(session, _model_inputs(session, images)).argmax(1) == labels).mean())


def text_val_exact_match(session) -> float:
    """Exact-match rate on text_crnn's 400 unseen validation lines (``text_crnn_val.npz``)."""
    images, texts = _load("text_crnn", "val")
    pred = ctc_decode(_run(session, text_preprocess(images)))
    return float(np.mean([p == t for p, t in zip(pred, texts)]))


def glyph_predictions(session) -> tuple[list[str], np.ndarray]:
    """glyph_crnn's greedy CTC decoding of its held-out lines, and the true texts."""
    images, texts = _load("glyph_crnn", "eval")
    return ctc_decode(_run(session, text_preprocess(images)), glyph_alphabet()), texts


def glyph_exact_match(session) -> float:
    """Exact-match rate of greedy CTC decoding on glyph_crnn's held-out lines (1,000 classes)."""
    pred, texts = glyph_predictions(session)
    return float(np.mean([p == t for p, t in zip(pred, texts)]))


def glyph_char_accuracy(session) -> float:
    """1 - character error rate (edit distance / reference length, summed over the held-out lines)."""
    pred, texts = glyph_predictions(session)
    return 1.0 - sum(edit_distance(p, t) for p, t in zip(pred, texts)) / sum(len(t) for t in texts)


METRICS = {"digits_cnn": digits_accuracy, "digits_resnet": digits_accuracy,
           "digits_mobilenet": digits_accuracy, "text_crnn": text_exact_match, "glyph_crnn": glyph_exact_match}
VAL_METRICS = {"digits_cnn": digits_val_accuracy, "digits_resnet": digits_val_accuracy,
               "digits_mobilenet": digits_val_accuracy, "text_crnn": text_val_exact_match}
SIZES = {"digits_cnn": 8, "digits_resnet": 32, "digits_mobilenet": 32}
INPUT_NAMES = {"text_crnn": "line", "glyph_crnn": "line"}
TEXT_MODELS = ("text_crnn", "glyph_crnn")


def write_calibration(name: str, folder: str | Path, batches: int = 16, batch_size: int = 8, offset: int = 0) -> Path:
    """Write ``batches`` model-ready batches (``batch_0000.npz`` ...) from the training split of
    ``name``'s data, cycling through it if needed; returns the folder.  Digits cycle below
    ``DIGITS_VAL_START`` so calibration never uses the validation images."""
    images, _ = _load(name if name in TEXT_MODELS else "digits", "calib")
    if name not in TEXT_MODELS:
        images = images[:DIGITS_VAL_START]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = INPUT_NAMES.get(name, "image")
    for b in range(batches):
        idx = (offset + np.arange(b * batch_size, (b + 1) * batch_size)) % len(images)
        x = text_preprocess(images[idx]) if name in TEXT_MODELS else digits_preprocess(images[idx], SIZES[name])
        np.savez(folder / f"batch_{b:04d}.npz", **{key: x})
    return folder


def write_random_calibration(model_path: str | Path, folder: str | Path, batches: int = 16,
                             shapes: dict | None = None) -> Path:
    """Calibration batches for the untrained reference models: onnxopt's synthesized inputs
    (standard normal floats, small ints, padding masks), a different seed per batch."""
    import onnxruntime as ort

    from onnxopt import runtime

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(batches):
        np.savez(folder / f"batch_{b:04d}.npz", **runtime.synthesize(sess, shapes, seed=b, quiet=True))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="calibration folders for the trained reference models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calib")
    c.add_argument("name", choices=sorted(METRICS))
    c.add_argument("folder")
    c.add_argument("--batches", type=int, default=16)
    c.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    print(write_calibration(args.name, args.folder, args.batches, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

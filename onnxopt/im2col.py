"""im2col for 2-D Conv, the one both least-squares fits use (compression.refit after pruning,
quantization.recovery's adaround Hessians): the windows a Conv's output positions read from its
padded input, any stride, padding and dilation, as a strided view (nothing is copied until rows
are taken).  A row's columns follow the ONNX weight layout ``[out, in, kh, kw]`` flattened over
``(in, kh, kw)``, so ``rows @ W.reshape(out, -1).T`` is the Conv (group 1, bias aside)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    a = node.attributes.get(name)
    return default if a is None else list(a.as_ints())


def windows(x: np.ndarray, node: ir.Node, kernel: tuple[int, int]) -> np.ndarray:
    """``[n, c, oh, ow, kh, kw]``: the window of output position (oy, ox) at ``[:, :, oy, ox]``, a
    view of the padded ``x`` (``[n, c, h, w]``).  Explicit ``pads`` only (``auto_pad`` is the caller's
    to refuse)."""
    kh, kw = kernel
    sh, sw = _ints(node, "strides", [1, 1])
    dh, dw = _ints(node, "dilations", [1, 1])
    pt, pl, pb, pr = _ints(node, "pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    span = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return span[:, :, ::sh, ::sw, ::dh, ::dw]


def rows(win: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[R, c * kh * kw]`` of the windows at flat output ``positions`` (over ``n, oh, ow``, in
    that order; None: every position, in order)."""
    n, c, oh, ow, kh, kw = win.shape
    if positions is None:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    ni, hi, wi = np.unravel_index(positions, (n, oh, ow))
    return win[ni, :, hi, wi].reshape(len(positions), c * kh * kw)

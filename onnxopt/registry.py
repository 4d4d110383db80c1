"""Pass name -> class: an explicit table, imported lazily (no registration side effects)."""

from __future__ import annotations

import importlib

from onnxopt.errors import UsageError

_TABLE = {
    "cleanup": ("onnxopt.passes.cleanup", "Cleanup"),
    "fold-constants": ("onnxopt.passes.fold_constants", "FoldConstants"),
    "dedup": ("onnxopt.passes.dedup", "Deduplicate"),
    "fold-shapes": ("onnxopt.passes.fold_shapes", "FoldShapes"),
    "simplify": ("onnxopt.passes.simplify", "Simplify"),
    "fuse-activations": ("onnxopt.passes.fuse_activations", "FuseActivations"),
    "fuse-conv-bn": ("onnxopt.passes.fuse_conv_bn", "FuseConvBatchNorm"),
    "fuse-affine": ("onnxopt.passes.fuse_affine", "FuseAffine"),
    "cse": ("onnxopt.passes.cse", "EliminateCommonSubexpressions"),
    "fuse-transformer": ("onnxopt.passes.fuse_transformer", "FuseTransformer"),
}


def names() -> list[str]:
    return list(_TABLE)


def get(name: str) -> type:
    try:
        module, cls = _TABLE[name]
    except KeyError:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(_TABLE)})") from None
    return getattr(importlib.import_module(module), cls)

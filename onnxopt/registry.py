"""Pass name -> class: an explicit table, imported lazily (no registration side effects).

Three sources, in this order of precedence: passes added at run time with :func:`register`
(a test, an embedding application), the built-in table below, and plugins that other packages
declare in the ``onnxopt.passes`` entry-point group (``name = "package.module:Class"`` in their
``pyproject.toml``), which are looked up only when a name is not found elsewhere.  A plugin can
never replace a built-in pass; :func:`register` can, only with ``replace=True``.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from onnxopt.errors import UsageError

ENTRY_POINT_GROUP = "onnxopt.passes"

_BUILTIN = {
    "cleanup": ("onnxopt.passes.cleanup", "Cleanup"),
    "fold-constants": ("onnxopt.passes.fold_constants", "FoldConstants"),
    "dedup": ("onnxopt.passes.dedup", "Deduplicate"),
    "fold-shapes": ("onnxopt.passes.fold_shapes", "FoldShapes"),
    "simplify": ("onnxopt.passes.simplify", "Simplify"),
    "transpose-push": ("onnxopt.passes.transpose_push", "TransposePush"),
    "fuse-activations": ("onnxopt.passes.fuse_activations", "FuseActivations"),
    "fuse-conv-bn": ("onnxopt.passes.fuse_conv_bn", "FuseConvBatchNorm"),
    "fuse-affine": ("onnxopt.passes.fuse_affine", "FuseAffine"),
    "cse": ("onnxopt.passes.cse", "EliminateCommonSubexpressions"),
    "fuse-transformer": ("onnxopt.passes.fuse_transformer", "FuseTransformer"),
    "convert-fp16": ("onnxopt.precision.fp16", "ConvertFloat16"),
    "gemm-to-matmul": ("onnxopt.passes.gemm_to_matmul", "GemmToMatMul"),
}
_ADDED: dict[str, type] = {}


def register(name: str, cls: type, *, replace: bool = False) -> None:
    """Make ``cls`` (an onnx-ir pass class with a docstring contract) available as ``name`` in
    pipeline text.  Replacing a known name needs ``replace=True``."""
    if (name in _ADDED or name in _BUILTIN) and not replace:
        raise UsageError(f"pass '{name}' is already registered")
    _ADDED[name] = cls


def unregister(name: str) -> None:
    """Remove a pass added with :func:`register` (built-in passes stay)."""
    _ADDED.pop(name, None)


def _plugins() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Built-in passes first, then added ones, then plugins."""
    found = list(_BUILTIN) + [n for n in _ADDED if n not in _BUILTIN]
    return found + sorted(n for n in _plugins() if n not in found)


def get(name: str) -> type:
    if name in _ADDED:
        return _ADDED[name]
    if name in _BUILTIN:
        module, cls = _BUILTIN[name]
        return getattr(importlib.import_module(module), cls)
    plugin = _plugins().get(name)
    if plugin is None:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(names())})")
    try:
        return plugin.load()
    except Exception as e:  # noqa: BLE001 - a broken plugin is the user's environment, said in one line
        raise UsageError(f"pass '{name}' from plugin '{plugin.value}' cannot be loaded: {e}") from None

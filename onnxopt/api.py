"""The Python API: one function per command, re-exported from ``onnxopt/commands/<name>.py``.

Each takes the command's positional arguments and its ``Options`` fields as keyword arguments
(groups flattened: ``quantize(src, dst, data=..., max_drop=0.02, weights="int4")``), plus
``progress`` (a ``progress(n)`` callback; the CLI draws the bars), and returns the command's report
(a JSON-able dict starting with the common header: ``tool``, ``version``, ``command``).  Expected
failures raise an :class:`~onnxopt.errors.OnnxoptError` (``ValidationRefused`` carries the report).
For the typed form, call ``onnxopt.commands.<name>.run(Options(...), progress)`` (a ``Result``).
"""

from __future__ import annotations

from onnxopt.commands.core import header, model_stats, stage_validate_commit
from onnxopt.commands.entry import entry

optimize = entry("optimize")
quantize = entry("quantize")
convert = entry("convert")
prune = entry("prune")
compress = entry("compress")
inspect = entry("inspect")
validate_models = entry("validate")
bench = entry("bench")
batch = entry("batch")

__all__ = ["batch", "bench", "compress", "convert", "header", "inspect", "model_stats", "optimize", "prune", "quantize",
           "stage_validate_commit", "validate_models"]

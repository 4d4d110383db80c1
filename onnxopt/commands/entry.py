"""The Python API's form of a command: positional arguments and Options fields as keywords."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxopt import commands
from onnxopt.commands import spec


def entry(name: str) -> Callable[..., dict]:
    """``name``'s API function: ``f(*arguments, progress=None, **options) -> report dict``."""

    def call(*args: Any, progress: Callable[[int], None] | None = None, **kwargs: Any) -> dict:
        cmd = commands.get(name)
        return cmd.run(spec.from_kwargs(cmd.options, *args, **kwargs), progress).to_dict()

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``onnxopt {name}`` (see onnxopt.commands.{name}): the report dict."
    return call

"""Errors users can meet, each mapped to one CLI exit code (see DESIGN "CLI surface")."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base of every expected error: the CLI prints it as one line, without a traceback."""

    exit_code = 2


class UsageError(OnnxoptError):
    """The command line or pipeline text is wrong (exit 1)."""

    exit_code = 1


class BadInputError(OnnxoptError):
    """A model, data file or output location cannot be used (exit 2)."""

    exit_code = 2


class ValidationRefused(OnnxoptError):
    """The optimized model's outputs diverge from the original's (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class InternalError(OnnxoptError):
    """A pass failed unexpectedly (a bug in onnxopt); nothing was written (exit 4)."""

    exit_code = 4


class Terminated(OnnxoptError):
    """The work was stopped from outside by a signal (SIGTERM, SIGKILL, ...): exit 128 + the signal
    number, as a shell reports a process killed by it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

"""Load and save models: lazy external data, >2 GB models, atomic writes, one-line errors.

Loading parses only the ``.onnx`` protobuf; weights kept in external data files stay on disk
and are memory-mapped by onnx-ir when a pass first reads them.  Saving goes through
:class:`StagedModel`: the model (and its external data) is written into a temporary folder
next to the destination, can be checked there (validation runs on the staged file), and is
moved into place with ``os.replace`` only on :meth:`StagedModel.commit`.  A failure at any
point leaves the destination untouched.

Staging folders are named ``.onnxopt-<pid>-<host tag>-<random>``: a process killed mid-write
(SIGKILL, power loss of a container) cannot remove its own, so every new :class:`StagedModel`
removes the sibling ones whose process (on this host) no longer runs, as does every
:func:`check_writable` (see :func:`remove_stale_staging`).

External data locations must be relative paths inside the model's folder: ``..`` components,
absolute paths and symlinks leading out are refused before the file is looked at, with the same
message whether it exists or not (a model must not make onnxopt read or probe other files).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data

from onnxopt.errors import BadInputError

logger = logging.getLogger(__name__)

#: Models whose weights exceed this are written with external data (protobuf's hard cap is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline when external data is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024
MIN_IR_VERSION = 3
#: A dead process's staging folder younger than this is left alone (a clock or pid-namespace surprise
#: must not remove a folder that is being written).
STALE_AFTER_SECONDS = 5.0
#: Distinguishes hosts sharing a folder (NFS): only this host's dead processes are judged.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_STAGING_NAME = re.compile(r"\.onnxopt-(\d+)-([0-9a-f]{6})-")


def staging_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporary entries this process creates beside an output."""
    return f".onnxopt-{os.getpid() if pid is None else pid}-{_HOST_TAG}-"


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model without reading its external weights; raise BadInputError on any defect."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise BadInputError(f"{p}: not a valid ONNX protobuf file ({_first_line(e)})") from None
    check_proto(proto, p)
    try:
        with _undefined_inputs_refused(p, proto):
            model = ir.serde.deserialize_model(proto)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is a malformed file
        raise BadInputError(f"{p}: malformed ONNX model ({_first_line(e)})") from None
    ir_external_data.set_base_dir(model.graph, str(p.parent))
    check_external_data(model, p)
    return model


#: external weights up to this size are read into memory for the commands that hand ORT serialized bytes
#: (a protobuf holds at most 2 GB)
INLINE_LIMIT = 1 << 31


def load_inline(path: str | os.PathLike, limit: int = INLINE_LIMIT) -> ir.Model:
    """:func:`load`, with external weights of up to ``limit`` read into memory: the commands
    that build and score candidates serialize them to bytes for ORT, which would resolve the relative
    external-data paths against the working directory, not the model's folder (the model then runs
    only from its own folder).  Larger models keep their weights where they are."""
    return _inlined(load(path), limit)


def _inlined(model: ir.Model, limit: int = INLINE_LIMIT) -> ir.Model:
    """``model`` with its external weights read into memory when they total at most ``limit``."""
    if next(external_tensors(model), None) is not None and weight_bytes(model) <= limit:
        ir_external_data.load_to_model(model)
    return model


def load_serializable(path: str | os.PathLike, what: str, model: ir.Model | None = None) -> ir.Model:
    """:func:`load_inline` for a command whose candidates go to ORT as one serialized protobuf (``what``
    names it): weights over EXTERNAL_DATA_THRESHOLD are refused in one line naming the commands that
    take them, instead of failing to serialize halfway through.  ``model``: ``path`` already loaded
    (:func:`load`), not parsed again."""
    model = model if model is not None else load(path)
    if next(external_tensors(model), None) is not None and weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise BadInputError(f"{path}: {what} of a model whose weights exceed {EXTERNAL_DATA_THRESHOLD / 1e9:.1f} GB is "
                            f"not supported yet (its candidates go to ONNX Runtime as one protobuf); optimize, convert --fp16, "
                            f"quantize --mode dynamic and quantize --weights int4 take such models")
    return _inlined(model)


def check_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Reject what protobuf parsing lets through: empty/truncated files, unsupported IR versions."""
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise BadInputError(f"{path}: not an ONNX model (no graph or IR version; truncated file?)")
    if proto.ir_version > onnx.IR_VERSION or proto.ir_version < MIN_IR_VERSION:
        raise BadInputError(
            f"{path}: unsupported IR version {proto.ir_version} "
            f"(supported: {MIN_IR_VERSION}..{onnx.IR_VERSION})"
        )
    if not proto.graph.output:
        raise BadInputError(f"{path}: graph has no outputs (truncated file?)")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _undefined_inputs_refused(path: Path, proto: onnx.ModelProto):
    """onnx-ir logs a warning and invents a value for a node input no scope defines (ORT refuses
    such a model; with --no-validate it would be written as is): make that one BadInputError line.
    Other onnx-ir warnings pass through unchanged."""
    serde_logger = logging.getLogger(ir.serde.__name__)
    handler, propagate = _Records(), serde_logger.propagate
    serde_logger.addHandler(handler)
    serde_logger.propagate = False
    try:
        yield
    finally:
        serde_logger.removeHandler(handler)
        serde_logger.propagate = propagate
        undefined: tuple | None = None
        for record in handler.records:
            if undefined is None and "cannot be found in any scope" in str(record.msg) and len(record.args or ()) >= 4:
                undefined = tuple(record.args or ())  # args is non-empty here
            elif not str(record.msg).startswith("Caveat: The value is created in the subgraph"):
                serde_logger.handle(record)  # not ours to judge: let it through as it would have been
    if undefined is not None:
        name, node, domain, op = undefined[:4]
        later = any(name in n.output for n in proto.graph.node)
        label = f"node '{node}'" if node else "a node"
        raise BadInputError(
            f"{path}: invalid model: {label} ({(domain + '::') if domain else ''}{op}) reads '{name}', "
            + ("which only a later node defines (nodes must be in topological order)" if later else
               "which no graph input, initializer or node defines"))


def inline_external(model: ir.Model) -> None:
    """Give every initializer stored in an external-data file an in-memory copy of its values.  Unlike
    onnx-ir's ``load_to_model`` this leaves the memory map open: sessions and arrays that still read
    it (a big model's weights handed to ORT, ``runtime.Light``) stay valid."""
    for value, tensor in list(external_tensors(model)):
        value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def point_at(model: ir.Model, written: ir.Model) -> int:
    """Give each main-graph initializer of ``model`` the tensor of the same name in ``written`` (the
    same model saved and loaded lazily) when that one lives in an external-data file: the arrays
    ``model`` held are freed, its weights are read from the file when next used (the file must stay
    where it is while they are).  Returns how many were swapped."""
    swapped = 0
    for name, value in model.graph.initializers.items():
        other = written.graph.initializers.get(name)
        if other is not None and isinstance(other.const_value, ir.ExternalTensor) and value.const_value is not None:
            old = value.const_value
            value.const_value = other.const_value
            if isinstance(old, ir.ExternalTensor):
                with contextlib.suppress(BufferError):
                    old.release()
            swapped += 1
    return swapped


def external_folder(model: ir.Model) -> str | None:
    """The folder the model's external-data weights are read from (None: every weight in memory)."""
    return next((t.base_dir for _, t in external_tensors(model)), None)


def from_proto(proto: onnx.ModelProto, folder: str | None) -> ir.Model:
    """``ir.from_proto`` of a proto whose weights may still be external-data references (a graph-only
    copy, :func:`external_folder`): they are read from ``folder``, lazily, as the original's were."""
    model = ir.from_proto(proto)
    if folder is not None:
        ir_external_data.set_base_dir(model.graph, folder)
    return model


def external_tensors(model: ir.Model):
    """Yield (value, ExternalTensor) for every initializer stored outside the protobuf."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value, value.const_value


def check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor's file must lie inside the model's folder, exist and be long enough;
    O(initializers) stat calls.  The location is judged before its file is touched."""
    sizes: dict[str, int] = {}
    base = path.parent
    for value, tensor in external_tensors(model):
        check_location(str(tensor.location), base, path, value.name)
        file = tensor.path
        if file not in sizes:
            try:
                sizes[file] = os.path.getsize(file)
            except (OSError, ValueError):
                raise BadInputError(
                    f"{path}: external data file '{tensor.location}' not found "
                    f"(needed by initializer '{value.name}')"
                ) from None
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else 0)
        if end > sizes[file]:
            raise BadInputError(
                f"{path}: external data file '{tensor.location}' is truncated "
                f"(initializer '{value.name}' needs bytes up to {end}, file has {sizes[file]})"
            )


def check_location(location: str, base: Path, path: Path, initializer: str) -> None:
    """Refuse an external-data location that is empty, absolute, has a ``..`` component, or leads
    out of ``base`` through a symlink; one message for all, whether a file is there or not."""
    outside = (not location or "\0" in location or os.path.isabs(location)
               or ".." in Path(location).parts or ".." in location.split("\\"))
    if not outside:
        # Symlinks: resolving reads links inside the model's folder only; a missing target
        # resolves lexically, so the answer (and the message) does not reveal whether it exists.
        root = os.path.realpath(base)
        resolved = os.path.realpath(os.path.join(base, location))
        outside = os.path.commonpath([root, resolved]) != root or resolved == root
    if outside:
        raise BadInputError(
            f"{path}: external data location '{location}' (initializer '{initializer}') points outside "
            f"the model's folder; refused (external data must be a relative path inside that folder)")


def weight_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (read from metadata, no weights loaded)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def check_writable(dest: Path) -> None:
    """Fail before any work when ``dest`` cannot be created: the folder must exist and accept a
    new file (probed for real: permission bits say nothing for root or read-only mounts)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        raise BadInputError(f"{dest}: output directory '{parent}' {problem}")
    if dest.is_dir():
        raise BadInputError(f"{dest}: is a directory")
    remove_stale_staging(parent)
    try:
        with tempfile.NamedTemporaryFile(prefix=staging_prefix() + "probe-", dir=parent):
            pass
    except OSError as e:
        raise BadInputError(f"{dest}: output directory '{parent}' is not writable ({e.strerror})") from None


class StagedModel:
    """A model written to a temporary folder beside ``dest``, moved into place on commit.

    Use as a context manager: whatever was not committed is deleted on exit.
    ``external_data=None`` chooses automatically (external when weights exceed
    EXTERNAL_DATA_THRESHOLD); the data file is named ``<dest name>.data``.
    """

    def __init__(self, model: ir.Model, dest: str | os.PathLike, external_data: bool | None = None):
        self.dest = Path(dest)
        check_writable(self.dest)
        if external_data is None:
            external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
        self.external_data = external_data
        self.data_name = self.dest.name + ".data" if external_data else None
        remove_stale_staging(self.dest.parent)
        self._lock: int | None = None
        try:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=self.dest.parent))
            self._lock = _hold_lock(self._tmpdir)
        except OSError as e:
            raise BadInputError(f"{self.dest}: cannot write output ({e.strerror})") from None
        self.path = self._tmpdir / self.dest.name
        try:
            if not external_data:
                # Inline everything: external tensors would otherwise keep pointing at the
                # input's data file through a path relative to the wrong folder.
                inline_external(model)
            with _without_redundant_initializer_info(model):
                ir.save(model, self.path, external_data=self.data_name,
                        size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES)
        except OSError as e:
            self.discard()
            raise BadInputError(f"{self.dest}: cannot write output ({e.strerror or e})") from None
        except BaseException:
            self.discard()
            raise

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._tmpdir.iterdir())

    def commit(self) -> list[Path]:
        """Move the staged files into place (data file first, model last); return their paths."""
        written = []
        if self.data_name:
            target = self.dest.parent / self.data_name
            os.replace(self._tmpdir / self.data_name, target)
            written.append(target)
        os.replace(self.path, self.dest)
        written.append(self.dest)
        self.discard()
        return written

    def discard(self) -> None:
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def remove_stale_staging(folder: str | os.PathLike, pids: set[int] | None = None) -> list[Path]:
    """Remove the ``.onnxopt-<pid>-<host>-*`` entries in ``folder`` left by processes of this host
    that no longer run (and older than STALE_AFTER_SECONDS), or, with ``pids``, those of exactly
    these (finished) processes whatever their age.  Returns what was removed; never raises."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING_NAME.match(entry.name)
        if m is None or m.group(2) != _HOST_TAG:
            continue
        pid = int(m.group(1))
        try:
            if pids is not None:
                if pid not in pids:
                    continue
            elif pid == os.getpid() or _pid_alive(pid) or now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_SECONDS:
                continue
            if entry.is_dir(follow_symlinks=False):
                lock = _try_lock(Path(entry.path))
                if lock is False:
                    continue  # its writer still holds the lock (a pid from another namespace, ...)
                try:
                    shutil.rmtree(entry.path)
                finally:
                    if lock is not None:
                        os.close(lock)
            else:
                os.unlink(entry.path)
        except OSError as e:
            logger.debug("could not remove stale %s: %s", entry.path, e)
            continue
        logger.info("removed %s, left by process %d which no longer runs", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


LOCK_NAME = ".lock"


def _hold_lock(folder: Path) -> int | None:
    """An exclusive lock on ``folder/.lock`` held while the folder is in use: pids can repeat across
    PID namespaces sharing a host name, a held lock cannot be mistaken.  None where flock is missing."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _try_lock(folder: Path) -> int | None | bool:
    """The lock fd when nobody holds ``folder``'s lock, False when someone does, None when the
    folder has no lock file (older or partial entries) or flock is missing."""
    try:
        import fcntl
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return fd


def die_with_parent() -> bool:
    """Linux: this process gets SIGKILL when its parent (the thread that started it) dies, so a
    ``kill -9`` of onnxopt leaves no orphan writing an output.  False where prctl is missing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie (killed, not yet reaped) runs no more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _without_redundant_initializer_info(model: ir.Model):
    """onnx-ir writes a value_info entry for every initializer; where it only repeats the tensor's
    own dtype and shape it is dead weight (~30 bytes each), so hide it while saving.

    Never for an initializer that is also a graph input or output: the same Value is written as
    that input/output's ValueInfoProto, which then would have no type (ORT does not create the
    input of an IR < 4 model whose typeless input no node reads: "Missing: <name>")."""
    hidden = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if (tensor is not None and not value.metadata_props and not value.doc_string
                    and not value.is_graph_input() and not value.is_graph_output()
                    and value.type == ir.TensorType(tensor.dtype)
                    and (value.shape is None or tuple(value.shape) == tuple(tensor.shape))):
                hidden.append((value, value.type, value.shape))
                value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def save(model: ir.Model, dest: str | os.PathLike, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``dest`` atomically; see :class:`StagedModel`."""
    with StagedModel(model, dest, external_data) as staged:
        return staged.commit()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

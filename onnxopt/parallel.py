"""Work spread over processes: one ``map`` over a local pool of spawned processes or Ray tasks.

:class:`Workers` runs ``fn(state, *args)`` for many argument tuples and returns the results in
submission order.  ``state`` (e.g. a quantizer with its model, statistics and scoring data) is
pickled once and unpickled once per worker process, not once per call:

- ``workers <= 1`` and no Ray: in this process (no pickling at all);
- a local pool: ``workers`` processes started with *spawn* (a fork of a process that holds ONNX
  Runtime sessions or Ray threads is not safe), each dies with its parent (``io.die_with_parent``);
- Ray (:func:`ray_cluster`: join ``address`` or start a local cluster): ``state`` goes to the
  object store once, each call is a task with ``num_cpus`` and the custom ``resources`` (e.g.
  ``{"openvino": 1}``) declared, retried on worker loss; a worker process keeps the state it
  fetched for later tasks.

The code a call runs is the same function in every mode.  An exception raised by a call is raised
again by ``map`` (Ray's task error is a subclass of the original type).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from onnxopt import io
from onnxopt.errors import BadInputError, UsageError

logger = logging.getLogger(__name__)

#: seconds a TCP connect to a ``--ray`` address may take before it counts as unreachable
PROBE_SECONDS = 5.0

#: per worker process: the state of the pool it serves (local pool) or, by token, of Ray tasks
_STATE: dict[str, Any] = {}


def check_ray_address(address: str | None, timeout: float = PROBE_SECONDS) -> None:
    """Raise BadInputError (one line naming ``address``) when nothing accepts a TCP connection at a
    ``HOST:PORT`` or ``ray://HOST:PORT`` address, within ``timeout`` seconds per host tried: the given
    host, and the one Ray itself connects to (it turns 127.0.0.1 into this node's IP).  Ray's own
    ``ray.init`` retries an unreachable GCS for minutes.  Other forms (None, "local", "auto") pass."""
    if address is None or address in ("", "local", "auto"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    hosts = [host.strip("[]")]
    if not address.startswith("ray://"):
        with contextlib.suppress(Exception):  # a private helper: if it moves, the given host is enough
            from ray._private.services import resolve_ip_for_localhost

            hosts.append(resolve_ip_for_localhost(hosts[0]))
    why = ""
    for h in dict.fromkeys(hosts):
        try:
            socket.create_connection((h, int(port)), timeout=timeout).close()
            return
        except OSError as e:
            why = why or (e.strerror or str(e) or type(e).__name__)
    raise BadInputError(f"--ray {address}: no Ray cluster answers at this address ({why}); "
                        "check it, or start one there with `ray start --head`")


@contextlib.contextmanager
def ray_cluster(address: str | None, num_cpus: int) -> Iterator[Any]:
    """The ``ray`` module, connected: an already initialized Ray as it is, else ``ray.init`` on
    ``address`` (None, "" or "local": a local cluster of ``num_cpus`` CPUs), shut down on exit
    when started here.  Without Ray installed: a usage error naming the extra; an unreachable
    ``HOST:PORT`` address: a bad-input error within seconds (:func:`check_ray_address`)."""
    try:
        import ray
    except ImportError:
        raise UsageError('--ray needs Ray: pip install -e ".[ray]"') from None
    started_here = False
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        else:
            check_ray_address(address)
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        started_here = True
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def ray_each(ray: Any, fn: Callable, calls: Sequence[tuple[Any, tuple, dict]],
             done: Callable[[Any, Any, BaseException | None], None]) -> None:
    """Each ``(key, args, resources)`` of ``calls`` as one Ray task ``fn(*args)`` (``num_cpus=1,
    max_retries=2``, plus the custom ``resources``); ``done(key, result, None)`` as each ends (in
    completion order), ``done(key, None, error)`` for a task lost after its retries.  Any other
    exception (Ctrl-C, an error in ``done``) cancels the tasks not finished and is raised again."""
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs: dict = {}
    try:
        for key, args, resources in calls:
            refs[(task.options(resources=resources) if resources else task).remote(*args)] = key
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result, error = ray.get(ref), None
                except Exception as e:  # noqa: BLE001 - the caller decides what a lost task means
                    result, error = None, e
                done(refs[ref], result, error)
    except BaseException:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise


def _init_local(blob: bytes) -> None:
    io.die_with_parent()
    _STATE["local"] = pickle.loads(blob)


def _call_local(fn: Callable, args: tuple) -> Any:
    return fn(_STATE["local"], *args)


def _call_ray(fn: Callable, token: str, boxed_state: list, args: tuple) -> Any:
    if token not in _STATE:  # first task of this pool in this worker process
        import ray

        _STATE.clear()
        _STATE[token] = ray.get(boxed_state[0])
    return fn(_STATE[token], *args)


class Workers:
    """``map(fn, calls)`` in this process, a local process pool or Ray (module docstring).  A
    context manager: leaving it stops the pool (pending calls are cancelled) or the Ray cluster
    it started."""

    def __init__(self, state: Any, workers: int = 1, ray_address: str | None = None, *, num_cpus: int = 1,
                 resources: dict[str, float] | None = None):
        self.state, self.workers = state, max(1, workers)
        self.ray_address, self.num_cpus, self.resources = ray_address, num_cpus, resources or {}
        self._stack = contextlib.ExitStack()
        self._pool: ProcessPoolExecutor | None = None
        self._ray: Any = None
        self._boxed: list = []
        self._token = uuid.uuid4().hex

    @property
    def mode(self) -> str:
        if self.ray_address is not None:
            return f"ray ({'local cluster' if self.ray_address in ('', 'local') else self.ray_address})"
        return "in-process" if self.workers == 1 else f"local pool of {self.workers} processes"

    @property
    def capacity(self) -> int:
        """How many calls run at once: the workers, or the Ray cluster's CPUs per call."""
        if self._ray is not None:
            return max(1, int(self._ray.cluster_resources().get("CPU", 1) // self.num_cpus))
        return self.workers

    def __enter__(self) -> Workers:
        if self.ray_address is not None:
            self._ray = self._stack.enter_context(ray_cluster(self.ray_address, self.workers * self.num_cpus))
            self._boxed = [self._ray.put(self.state)]
        elif self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_local, initargs=(pickle.dumps(self.state),))
            self._stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        """``[fn(state, *args) for args in calls]``, computed in parallel."""
        if not calls:
            return []
        if self._ray is not None:
            ray = self._ray
            task = ray.remote(num_cpus=self.num_cpus, max_retries=2)(_call_ray)
            if self.resources:
                task = task.options(resources=self.resources)
            refs = [task.remote(fn, self._token, self._boxed, args) for args in calls]
            try:
                return ray.get(refs)
            except BaseException:
                for ref in refs:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                raise
        if self._pool is not None:
            futures = [self._pool.submit(_call_local, fn, args) for args in calls]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return [fn(self.state, *args) for args in calls]

"""Reading inputs: a bounded thread map and reads that never hang.

:func:`ordered_map` reads and encodes inputs ahead of the shard writer, in order; :func:`read_source`
never opens a FIFO or device; with a timeout, :func:`ordered_map` gives up on a call that blocks (a read on
a hung network file system) without waiting for its thread.
"""

from __future__ import annotations

import itertools
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from data_prep.errors import PrepError
from data_prep.walk import file_kind, stat_error_reason

#: Seconds a source read may block before the input is quarantined as ``read timeout``.
DEFAULT_READ_TIMEOUT_S = 60.0

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *, timeout_s: float | None = None,
                on_timeout: Callable[[T, float], R] | None = None) -> Iterator[R]:
    """Like ``map(fn, items)``, but runs up to ``workers`` calls at once on threads.

    Results come back in input order, and at most ``4 * workers`` results are held at a time, so
    memory stays bounded however long ``items`` is.

    Args:
        fn: Function to apply.
        items: Inputs.
        workers: Thread count; 1 or less runs in the calling thread (unless ``timeout_s`` is given).
        timeout_s: With ``on_timeout``: a call that has run this long (a read blocked on a hung network
            file system) is given up: its thread is abandoned (a daemon, replaced by a new one) and
            ``on_timeout(item, timeout_s)`` is yielded in its place. None or 0: no limit.
        on_timeout: What to yield for a call that timed out.

    Yields:
        ``fn(item)`` for each item, in order. An exception raised by ``fn`` is re-raised here.

    Raises:
        PrepError: When more than ``MAX_STUCK`` calls of this process are blocked (the file system
            does not answer at all): one line instead of threads without bound.
    """
    if timeout_s and on_timeout is not None:
        yield from _timed_map(fn, items, max(workers, 1), timeout_s, on_timeout)
        return
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data_prep")
    pending: deque[Future[R]] = deque()
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: Blocked calls a process abandons before it gives up on the source (each holds one thread).
MAX_STUCK = 64
_stuck = 0
_stuck_lock = threading.Lock()


class _Job:
    __slots__ = ("done", "error", "fn", "item", "result", "started")

    def __init__(self, fn: Callable[[Any], Any], item: Any) -> None:
        self.fn, self.item = fn, item
        self.done = threading.Event()
        self.started: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None


class _DaemonPool:
    """Worker threads that are daemons, so that one stuck in the kernel can be abandoned.

    ``concurrent.futures`` threads are joined at shutdown and at interpreter exit, so one read blocked
    on a dead mount would hang the whole prep; these are not waited for.
    """

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = 0
        for _ in range(workers):
            self.add_thread()

    def add_thread(self) -> None:
        """Start one more worker (in place of one that is stuck)."""
        threading.Thread(target=self._serve, name="data_prep-read", daemon=True).start()
        self._threads += 1

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.started = time.monotonic()
            try:
                job.result = job.fn(job.item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                job.error = exc
            job.done.set()

    def submit(self, fn: Callable[[Any], Any], item: Any) -> _Job:
        job = _Job(fn, item)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Let every worker end after its current job (a stuck one ends if its call ever returns)."""
        for _ in range(self._threads):
            self._jobs.put(None)


def _finished(job: _Job, timeout_s: float) -> bool:
    """Wait for a job; False once it has been running for ``timeout_s`` (queued time does not count)."""
    while True:
        started = job.started
        wait = 0.05 if started is None else max(0.0, started + timeout_s - time.monotonic())
        if job.done.wait(wait):
            return True
        if started is not None and time.monotonic() - started >= timeout_s:
            return False


def _timed_map(fn: Callable[[T], R], items: Iterable[T], workers: int, timeout_s: float,
               on_timeout: Callable[[T, float], R]) -> Iterator[R]:
    global _stuck
    it = iter(items)
    pool = _DaemonPool(workers)
    pending: deque[_Job] = deque(pool.submit(fn, item) for item in itertools.islice(it, 4 * workers))
    try:
        while pending:
            job = pending.popleft()
            if _finished(job, timeout_s):
                if job.error is not None:
                    raise job.error
                result = job.result
            else:
                with _stuck_lock:
                    _stuck += 1
                    stuck = _stuck
                if stuck > MAX_STUCK:
                    raise PrepError(f"{stuck} reads of the source blocked for more than {timeout_s:g} s: "
                                    "its file system does not answer (--read-timeout-s)")
                pool.add_thread()
                result = on_timeout(job.item, timeout_s)
            pending.extend(pool.submit(fn, item) for item in itertools.islice(it, 1))
            yield result
    finally:
        pool.close()


class SourceError(Exception):
    """An input that cannot be read; ``str(exc)`` is the quarantine reason."""


def check_regular(path: Path) -> str | None:
    """Return the quarantine reason when ``path`` is not a readable regular file (``stat`` only, never opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return stat_error_reason(path, exc)
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: {file_kind(st.st_mode)}"
    return None


def read_source(path: Path) -> bytes:
    """Read a source file whole: ``stat`` first (a FIFO, device or socket is never opened), then read it.

    A read that blocks is given up by the caller's :func:`ordered_map` timeout.

    Args:
        path: The file.

    Returns:
        The file's bytes.

    Raises:
        SourceError: With the quarantine reason (``not a regular file: fifo``, ``cannot read file: ...``).
    """
    reason = check_regular(path)
    if reason is not None:
        raise SourceError("cannot read file: No such file or directory" if reason == "file not found" else reason)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # never waits on a FIFO
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # replaced between stat and open
                raise SourceError(f"not a regular file: {file_kind(mode)}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            os.close(fd)
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}") from exc


def read_timeout_reason(_item: object, timeout_s: float) -> str:
    """The quarantine reason of an input whose read (and encode) did not finish within ``timeout_s``."""
    return f"read timeout: not read and checked after {timeout_s:g} s (--read-timeout-s)"

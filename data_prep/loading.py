"""Reading inputs: a bounded thread map and reads that never hang.

:func:`ordered_map` reads and encodes inputs ahead of the shard writer, in order; :func:`read_source`
never opens a FIFO or device and gives up on a read that blocks (a hung network file system).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from data_prep.walk import file_kind, stat_error_reason

#: Seconds a source read may block before the input is quarantined as ``read timeout``.
DEFAULT_READ_TIMEOUT_S = 60.0

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """Like ``map(fn, items)``, but runs up to ``workers`` calls at once on threads.

    Results come back in input order, and at most ``4 * workers`` results are held at a time, so
    memory stays bounded however long ``items`` is.

    Args:
        fn: Function to apply.
        items: Inputs.
        workers: Thread count; 1 or less runs in the calling thread.

    Yields:
        ``fn(item)`` for each item, in order. An exception raised by ``fn`` is re-raised here.
    """
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


class SourceError(Exception):
    """An input that cannot be read; ``str(exc)`` is the quarantine reason."""


class _Job:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class _DaemonReaders:
    """Daemon threads that run blocking reads, so that a read stuck in the kernel can be abandoned.

    A ``ThreadPoolExecutor``'s threads are joined at interpreter exit, so one stuck read would hang
    the whole prep; these are daemon threads, and a thread whose read timed out is replaced rather
    than waited for. At most ``_MAX_STUCK`` threads are ever abandoned per process (then reads fail
    at once), so a dead file system cannot make the process start threads without bound.
    """

    _MAX_STUCK = 64

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.stuck = 0

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                job.error = exc
            job.done.set()
            with self._lock:
                self._idle += 1

    def run(self, fn: Callable[[], R], timeout_s: float) -> R:
        """Run ``fn`` on a reader thread; raise TimeoutError when it has not returned after ``timeout_s``."""
        with self._lock:
            if self.stuck >= self._MAX_STUCK:
                raise TimeoutError(f"{self.stuck} earlier reads are still blocked")
            if self._idle > 0:  # every queued job has a thread of its own: none waits behind a stuck read
                self._idle -= 1
            else:
                threading.Thread(target=self._serve, name="data_prep-read", daemon=True).start()
        job = _Job(fn)
        self._jobs.put(job)
        if not job.done.wait(timeout_s):
            with self._lock:
                self.stuck += 1
            raise TimeoutError(f"no data after {timeout_s:g} s")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]


_READERS = _DaemonReaders()


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


def _read_regular(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # O_NONBLOCK: never wait on a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"not a regular file: {file_kind(os.fstat(fd).st_mode)}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_source(path: Path, timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """Read a source file whole: ``stat`` first (a FIFO, device or socket is never opened), then a timed read.

    Args:
        path: The file.
        timeout_s: Seconds a read may block (a hung network file system) before the file is given
            up as ``read timeout``; None or 0 reads in the calling thread without a limit.

    Returns:
        The file's bytes.

    Raises:
        SourceError: With the quarantine reason (``not a regular file: fifo``, ``read timeout: ...``,
            ``cannot read file: ...``).
    """
    reason = check_regular(path)
    if reason is not None:
        raise SourceError("cannot read file: No such file or directory" if reason == "file not found" else reason)
    try:
        if not timeout_s:
            return _read_regular(path)
        return _READERS.run(lambda: _read_regular(path), timeout_s)
    except TimeoutError as exc:
        raise SourceError(f"read timeout: {exc} (--read-timeout-s)") from exc
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}") from exc

"""Reading source images (bytes, header probe, sha256), optionally on a thread pool in input order."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from data_prep.probe import ImageInfo, ProbeError, probe_image
from data_prep.scan import Sample

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Loaded:
    """Result of loading one sample: either ``data``/``info``/``sha256``, or an ``error`` reason.

    Attributes:
        sample: The sample that was loaded.
        data: File bytes (empty on error).
        info: Image format and size (None on error).
        sha256: Hex digest of ``data`` ("" on error).
        error: Why the sample cannot be used; None if it can.
    """

    sample: Sample
    data: bytes = b""
    info: ImageInfo | None = None
    sha256: str = ""
    error: str | None = None


def load_sample(sample: Sample) -> Loaded:
    """Read a source file, probe its header and hash it; never raises for bad files.

    Args:
        sample: The sample to load.

    Returns:
        The loaded sample, or one with ``error`` set if the file cannot be read or is not a JPEG/PNG.
    """
    try:
        data = sample.path.read_bytes()
    except OSError as exc:
        return Loaded(sample, error=f"cannot read file: {exc.strerror or type(exc).__name__}")
    try:
        info = probe_image(data)
    except ProbeError as exc:
        return Loaded(sample, error=str(exc))
    return Loaded(sample, data, info, hashlib.sha256(data).hexdigest())


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

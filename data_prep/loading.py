"""An order-preserving, bounded thread map used to read and encode inputs ahead of the shard writer."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

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

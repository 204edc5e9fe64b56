"""`look_ahead`: work done in background threads a few items ahead of the loop that consumes it."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from . import interrupts


T, U = TypeVar("T"), TypeVar("U")


def look_ahead(items: Iterable[T], fn: Callable[[T], U], *, depth: int, threads: int = 1) -> Iterator[U]:
    """`fn(item)` for each item, in order, computed by `threads` background threads up to `depth` items ahead of
    the consumer (inline when `depth` is 0). An exception in `fn` is raised where its result would have been
    yielded; items not yet started are dropped when the consumer stops."""
    if depth == 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="siglip-look-ahead")
    # The pool's and its futures' locks are taken with signals deferred, as the DataLoader's are (see `interrupts`).
    pending: deque[Future[U]] = deque()

    def oldest() -> U:
        with interrupts.deferred():
            return pending.popleft().result()

    try:
        for item in items:
            with interrupts.deferred():
                pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        with interrupts.deferred():
            pool.shutdown(wait=True, cancel_futures=True)

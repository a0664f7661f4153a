"""Run jobs on a few plain threads, results in order, first error raised once all have stopped.

Plain threads, not a ``concurrent.futures`` pool: a background save may still be writing while
the interpreter exits, when such pools refuse new work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["in_parallel", "join_all"]

T = TypeVar("T")


def join_all(threads: Sequence[threading.Thread]) -> None:
    """Join every thread, even through further interrupts (a second Ctrl-C)."""
    for thread in threads:
        while thread.is_alive():
            with contextlib.suppress(BaseException):
                thread.join()


def in_parallel(jobs: Sequence[Callable[[], T]], workers: int, *, name: str) -> list[T]:
    """Run ``jobs`` in order on up to ``workers`` threads; their results in order.

    On failure the jobs not yet started are skipped and the first error is raised, only once
    no job runs any more (callers close the file descriptors the jobs use).
    """
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [job() for job in jobs]
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(len(jobs)))

    def work() -> None:
        while True:
            with lock:
                index = None if errors else next(todo, None)
            if index is None:
                return
            try:
                results[index] = jobs[index]()
            except BaseException as exc:  # re-raised by the calling thread
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=work, name=name, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as exc:  # e.g. KeyboardInterrupt: start no more jobs, and never
        with lock:  # return while one still runs (its caller closes the descriptors it uses)
            errors.append(exc)
        join_all(threads)
        raise
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]

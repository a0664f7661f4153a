"""Background saves: one save in flight per process, errors that always surface, and the CPU
copy of the state kept from one background save to the next.

A save first takes the process-wide save slot; a synchronous save gives it back when it
returns, a background save when it has committed or failed. So a second save waits for the
first, and two snapshots of the state never coexist with a write. The slot's holder is
:class:`PendingSave`; :mod:`safeckpt.torch.saver` decides what it runs.

A background save copies the state into CPU memory before returning. When it has finished, that
memory is kept (:func:`keep_snapshot`) and the next snapshot overwrites it (:func:`take_snapshot`)
instead of faulting in as many fresh pages as the state has bytes, which costs more than the copy
itself. :func:`release_snapshot_memory` frees it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..storage.base import Location

__all__ = ["PendingSave", "acquire_slot", "keep_snapshot", "release_snapshot_memory", "take_snapshot"]

Snapshot = dict[str, dict[str, torch.Tensor]]
"""CPU copies of a plan's tensors: archive name -> tensor name -> tensor."""

_slot = threading.Lock()
_last: PendingSave | None = None
_kept_lock = threading.Lock()
_kept: Snapshot = {}


def take_snapshot() -> Snapshot:
    """The memory the last finished background save kept (now the caller's), or nothing."""
    global _kept
    with _kept_lock:
        taken, _kept = _kept, {}
    return taken


def keep_snapshot(snapshot: Snapshot) -> None:
    """Keep a finished save's snapshot for the next one (only memory nobody else uses)."""
    with _kept_lock:
        _kept.update(snapshot)


def release_snapshot_memory() -> None:
    """Free the CPU copy of the state the last background save kept for the next one.

    Call this when no more saves are coming and the memory (as large as the saved tensors) is
    wanted back; the next background save then allocates afresh.
    """
    take_snapshot()


def acquire_slot() -> Callable[[], None]:
    """Wait for the save in flight; returns the function that gives the slot back.

    If the last background save failed and nobody collected its error with
    :meth:`PendingSave.wait`, that error is raised here (and the slot given back): a failed save
    is never silent.
    """
    _slot.acquire()
    previous = _last
    if previous is not None and previous._error is not None and not previous._collected:
        previous._collected = True
        _slot.release()
        raise previous._error
    return _slot.release


class PendingSave:
    """A save running in the background; :meth:`wait` returns its path or raises its error.

    Returned by ``save_checkpoint(..., async_=True)`` once the state has been copied: the caller
    may change the model and optimizer at once. The files are written and committed on a
    (non-daemon) thread, so the interpreter waits for it at exit. If the process dies first,
    committed checkpoints are untouched and the unfinished folder is removed by the next save.
    An error nobody collected with :meth:`wait` is raised by the next save.

    Example:
        >>> pending = save_checkpoint(model, opt, None, None, 100, async_=True)  # doctest: +SKIP
        >>> pending.wait().name  # doctest: +SKIP
        'step-00000100'
    """

    def __init__(
        self,
        step: int,
        path: Location,
        write: Callable[[], Location],
        *,
        on_commit: Callable[[Location], object] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        """Start ``write()`` (which must commit ``path``) on a new thread; ``on_commit(path)``
        runs after it succeeds, ``on_exit()`` in any case, last. Holds the save slot if it is
        given ``acquire_slot``'s release function as ``on_exit``."""
        global _last
        self.step = step
        self.path = path
        self._result: Location | None = None
        self._error: BaseException | None = None
        self._collected = False
        self._thread = threading.Thread(
            target=self._run, args=(write, on_commit, on_exit), name=f"safeckpt-save-{step}"
        )
        _last = self
        self._thread.start()

    def _run(
        self,
        write: Callable[[], Location],
        on_commit: Callable[[Location], object] | None,
        on_exit: Callable[[], None] | None,
    ) -> None:
        try:
            self._result = write()
            if on_commit is not None:
                on_commit(self._result)
        except BaseException as exc:  # handed to the caller in wait()
            self._error = exc
        finally:
            del write
            if on_exit is not None:
                on_exit()

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Location:
        """Block until committed; returns the checkpoint path or raises the save's error.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first (the save goes on).
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.path}: checkpoint for step {self.step} is still being written")
        if self._error is not None:
            self._collected = True
            raise self._error
        assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        state = "writing" if not self.done() else "failed" if self._error else "committed"
        return f"PendingSave(step={self.step}, path={str(self.path)!r}, {state})"

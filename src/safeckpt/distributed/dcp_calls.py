"""``save``, ``load``, ``async_save``: DCP called with safeckpt's pieces, and its errors translated.

DCP collects every rank's exception into a ``CheckpointException``, which derives from
``BaseException`` (so ``except Exception`` misses it) and is raised on every rank. These calls
turn it back into the safeckpt error the failing rank raised (``CheckpointCorruptedError``,
``CheckpointWriteError``, ...), its message prefixed with that rank, so every rank raises the
same catchable error. They also remove the temporary folder of a save that failed.
"""

from __future__ import annotations

import contextlib
import errno
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, CheckpointMismatchError, CheckpointWriteError
from ._core import PendingSave, StorageLocation, acquire_slot
from .planner import LoadPlanner, SavePlanner
from .reader import Reader
from .writer import Writer, WriterOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DistributedCheckpointError", "agree", "async_save", "load", "save", "translate"]

StateDict = dict[str, object]
T = TypeVar("T")


class DistributedCheckpointError(CheckpointError, RuntimeError):
    """A rank failed during a sharded save or load for a reason outside safeckpt's own errors
    (the message names the rank and the original error, which is also the ``__cause__``)."""


def _renamed(error: BaseException, prefix: str) -> BaseException:
    """A copy of a safeckpt error with ``prefix`` before its message."""
    if isinstance(error, OSError):
        return type(error)(error.errno, f"{prefix}: {error.strerror or error}")
    try:
        return type(error)(f"{prefix}: {error}")
    except Exception:
        return error


def translate(exc: CheckpointException, *, loading: bool) -> BaseException:
    """The error to raise on this rank for DCP's collected failures."""
    failures = exc.failures
    for _, (error, _trace) in sorted(failures.items()):
        if isinstance(error, KeyboardInterrupt):
            return error
    rank, (error, _trace) = min(failures.items())
    where = f"rank {rank}"
    if len(failures) > 1:
        where += f" (ranks {sorted(failures)} failed)"
    if isinstance(error, CheckpointError):
        new = _renamed(error, where)
    elif loading and isinstance(error, (ValueError, RuntimeError, KeyError)):
        # DCP's planner: a key the checkpoint lacks, a shape that differs.
        new = CheckpointMismatchError(f"{where}: {type(error).__name__}: {error}")
    elif isinstance(error, OSError):
        what = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        new = CheckpointWriteError(error.errno or errno.EIO, f"{where}: {what}; earlier checkpoints are untouched")
    else:
        new = DistributedCheckpointError(f"{where}: {type(error).__name__}: {error}")
    new.__cause__ = error if isinstance(error, BaseException) else None
    return new


def _lost_rank(exc: RuntimeError, writer: Writer) -> BaseException:
    """What a save raises when a collective between the ranks failed (a rank died, or the
    network between them broke): DCP reports those outside its ``CheckpointException``."""
    if isinstance(exc, CheckpointError):
        return exc
    if writer.committed is not None:
        outcome = f"{writer.final} was committed, but not every rank learned it"
    elif writer.is_coordinator:
        outcome = f"{writer.final} was not committed (earlier checkpoints are untouched; the next save cleans up)"
    else:
        outcome = f"whether {writer.final} was committed is known to the coordinator (rank 0) only"
    return DistributedCheckpointError(
        f"a collective between the ranks failed during the save ({exc}); a rank may have died or "
        f"hung, check the other ranks' logs. {outcome}"
    )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # In a plain process DCP warns that it assumes a single process: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _no_dist(process_group: dist.ProcessGroup | None) -> bool:
    return process_group is None and not (dist.is_available() and dist.is_initialized())


def agree(group: dist.ProcessGroup | None, run: Callable[[], T], *, together: bool = True) -> T:
    """``run()`` on every rank; if it raised on any rank, raise on every rank (the same error,
    naming the rank: a safeckpt error as it is, any other wrapped in
    :class:`DistributedCheckpointError`), since a rank left out would wait in the next collective.
    With ``together=False`` this process runs it alone."""
    result: T | None = None
    error: CheckpointError | None = None
    cause: BaseException | None = None
    jointly = together and dist.is_available() and dist.is_initialized()
    try:
        result = run()
    except CheckpointError as exc:
        error = cause = exc
    except Exception as exc:
        if not jointly:
            raise
        error, cause = DistributedCheckpointError(f"{type(exc).__name__}: {exc}"), exc
    if jointly:
        errors: list[CheckpointError | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:  # every rank raises the same error, naming the rank that hit it
            rank, first = failed[0]
            raise _renamed(first, f"rank {rank}") from (cause if rank == dist.get_rank(group) else None)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def save(
    state: StateDict,
    root: str | Path | StorageLocation,
    *,
    process_group: dist.ProcessGroup | None = None,
    **options: Unpack[WriterOptions],
) -> StorageLocation:
    """``dcp.save`` with :class:`Writer` and :class:`SavePlanner`; returns the committed folder.

    Called on every rank of ``process_group`` (default: the whole job), or in a plain process.
    ``root`` may be an fsspec URL; ``options`` are the :class:`Writer`'s: ``step`` (required),
    ``name``, ``overwrite``, ``documents``, ``metadata``, ``storage_options``.

    Example:
        >>> sd.save({"model": model.state_dict()}, "checkpoints", step=100)  # doctest: +SKIP
        PosixPath('checkpoints/step-00000100')
    """
    writer = Writer(root, **options)
    try:
        with _quiet_single_process():
            dcp.save(
                state, storage_writer=writer, planner=SavePlanner(), process_group=process_group,
                no_dist=_no_dist(process_group),
            )  # fmt: skip
    except CheckpointException as exc:
        raise translate(exc, loading=False) from None
    except RuntimeError as exc:
        raise _lost_rank(exc, writer) from exc
    finally:
        writer.abort()
    return writer.final


def load(
    state: StateDict,
    path: str | Path | StorageLocation,
    *,
    verify: bool = True,
    allow_partial_load: bool = False,
    process_group: dist.ProcessGroup | None = None,
    reader: Reader | None = None,
    single_process: bool = False,
) -> None:
    """``dcp.load`` into ``state`` (in place) with :class:`Reader` and :class:`LoadPlanner`.

    Called on every rank of ``process_group`` (default: the whole job), or with
    ``single_process=True`` by one process alone, which then reads every shard itself.
    """
    reader = reader or Reader(path, verify=verify)
    # DCP would turn an error here into an AssertionError without its type: read it first.
    agree(process_group, reader.read_metadata, together=not single_process)
    try:
        with _quiet_single_process():
            dcp.load(
                state, storage_reader=reader, planner=LoadPlanner(allow_partial_load=allow_partial_load),
                process_group=process_group, no_dist=single_process or _no_dist(process_group),
            )  # fmt: skip
    except CheckpointException as exc:
        raise translate(exc, loading=True) from None
    finally:
        if not reader.keep_open:  # else whoever set it closes the reader
            reader.close()


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}
_STAGER: list[Any] = []


def reusing_stager() -> Any:
    """The stager of this process's background sharded saves, kept from one save to the next.

    ``dcp.async_save`` without a stager makes one per call and drops it, so every save faults in
    a fresh CPU copy of the whole state while the caller waits. DCP's ``DefaultStager`` keeps the
    CPU copy of each tensor's storage and copies into it again on the next save, which is safe
    here because one save is in flight at a time (the previous one has finished writing when the
    next is staged). The cost is the one CPU copy of the state kept between saves, as for
    single-process background saves (:mod:`safeckpt.torch.background`). None (DCP's default) on
    a torch without ``DefaultStager``."""
    if not _STAGER:
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        except ImportError:
            _STAGER.append(None)
        else:  # synchronous, unpinned, unshared: a plain copy the caller waits for, as before
            _STAGER.append(DefaultStager(StagingOptions(False, False, False, False)))
    return _STAGER[0]


def checkpoint_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A gloo group over the same ranks, created once, for background saves: their collectives
    must not interleave with the training's on the same group."""
    if _no_dist(process_group):
        return None
    ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _GROUPS[ranks]


def async_save(
    state: StateDict,
    root: str | Path | StorageLocation,
    *,
    process_group: dist.ProcessGroup | None = None,
    on_commit: Callable[[StorageLocation], object] | None = None,
    **options: Unpack[WriterOptions],
) -> PendingSave:
    """``dcp.async_save``: returns once ``state`` is copied; ``wait()`` returns the folder.
    ``options`` are :func:`save`'s; ``on_commit(folder)`` runs right after the commit.

    One save is in flight at a time (as for single-process saves): this first waits for the
    previous one, and raises its error if nobody collected it.
    """
    release = acquire_slot()
    try:
        writer = Writer(root, **options)
        group = checkpoint_group(process_group)
        with _quiet_single_process():
            future = dcp.async_save(
                state, storage_writer=writer, planner=SavePlanner(), process_group=group, no_dist=group is None,
                async_stager=reusing_stager(),
            )  # fmt: skip

        def wait() -> StorageLocation:
            try:
                future.result()  # type: ignore[union-attr]
            except CheckpointException as exc:
                raise translate(exc, loading=False) from None
            except RuntimeError as exc:
                raise _lost_rank(exc, writer) from exc
            finally:
                writer.abort()
            return writer.final

        return PendingSave(writer.step, writer.final, wait, on_commit=on_commit, on_exit=release)
    except BaseException:
        release()
        raise

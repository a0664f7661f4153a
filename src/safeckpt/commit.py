"""The commit protocol: how a checkpoint folder appears on disk all at once or not at all.

Saving step ``S`` into root folder ``R``:

1. Take ``R``'s lock (``flock`` on ``R/LOCK_NAME``), remove temporary folders left by writers that
   have died (a live writer holds a lock on its own temporary folder, so it is never touched),
   restore or remove leftovers of interrupted overwrites, create a fresh uniquely named
   ``R/TMP_PREFIX...`` folder and lock it; release ``R``'s lock.
2. Write every file into the temporary folder, fsyncing each.
3. Write ``MANIFEST_NAME`` last and fsync it, then fsync the temporary folder.
4. Take ``R``'s lock again. If ``R/step-S`` exists, fail (or, with ``overwrite``, rename it to
   ``R/TRASH_PREFIX...``). Rename the temporary folder to ``R/step-S`` and fsync ``R``.
   Release the lock, then delete the trash.
5. Only now may older checkpoints be pruned (:func:`remove_checkpoint` renames before deleting,
   so a half-deleted folder is never mistaken for a checkpoint).

Readers consider only folders named ``step-<digits>`` that contain ``MANIFEST_NAME``; temporary
and trash folders start with a dot and are never loaded. A crash at any point therefore leaves
either the old state or the new one visible, plus at most a hidden folder the next save cleans.
Any failure removes the temporary folder and raises :class:`~safeckpt.errors.CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointExistsError, CheckpointWriteError
from .fileio import fsync_dir
from .manifest import MANIFEST_NAME

__all__ = [
    "LOCK_NAME",
    "STEP_PREFIX",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "PendingCheckpoint",
    "list_checkpoints",
    "parse_step",
    "remove_checkpoint",
    "step_dirname",
]

STEP_PREFIX = "step-"
STEP_DIGITS = 8
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".safeckpt.lock"
_STEP_NAME = re.compile(r"step-(\d{1,19})")


def step_dirname(step: int) -> str:
    """Folder name for ``step``; zero-padded so listings sort by step."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    """The step a checkpoint folder name encodes, or None if it is not one."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``root`` (folders with a manifest), oldest step first."""
    root = Path(root)
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(root):
            step = parse_step(entry.name)
            if step is not None and entry.is_dir(follow_symlinks=False):
                if os.path.isfile(os.path.join(entry.path, MANIFEST_NAME)):
                    found.append((step, root / entry.name))
    return sorted(found)


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_leftovers(root: Path) -> None:
    """Remove temporary folders of dead writers; put back checkpoints an overwrite moved aside."""
    for entry in os.scandir(root):
        if entry.name.startswith(TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
            finally:
                os.close(fd)
        elif entry.name.startswith(TRASH_PREFIX) and entry.is_dir(follow_symlinks=False):
            original = entry.name[len(TRASH_PREFIX) :].rsplit(".", 1)[0]
            if parse_step(original) is not None and not os.path.exists(root / original):
                os.rename(entry.path, root / original)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)


class PendingCheckpoint:
    """A temporary folder being filled by this process; :meth:`commit` publishes it.

    Use as a context manager: leaving the block without committing removes the folder.
    """

    def __init__(self, root: str | os.PathLike[str], step: int) -> None:
        self.root = Path(root)
        self.step = step
        self.final = self.root / step_dirname(step)
        self.path = self.root / f"{TMP_PREFIX}{step_dirname(step)}.{uuid.uuid4().hex}"
        self.dir_fd = -1
        self.committed = False

    def __repr__(self) -> str:
        return f"PendingCheckpoint(step={self.step}, path={str(self.path)!r})"

    def __enter__(self) -> PendingCheckpoint:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _root_lock(self.root):
                _clean_leftovers(self.root)
                os.mkdir(self.path, 0o755)
                self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(self.dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._discard()
            raise write_error(exc, self.root, "prepare the checkpoint folder") from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.committed:
            self._discard()

    def _discard(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, *, overwrite: bool = False) -> Path:
        """Make the folder durable and rename it to its final name; returns that path."""
        trash = None
        try:
            fsync_dir(self.dir_fd)
            with _root_lock(self.root):
                if os.path.lexists(self.final):
                    if not overwrite:
                        raise CheckpointExistsError(
                            f"{self.final}: a checkpoint for step {self.step} already exists; "
                            "pass overwrite=True to replace it or save under another step"
                        )
                    trash = self.root / f"{TRASH_PREFIX}{self.final.name}.{uuid.uuid4().hex}"
                    os.rename(self.final, trash)
                os.rename(self.path, self.final)
                self.committed = True
                root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    fsync_dir(root_fd)
                finally:
                    os.close(root_fd)
        except OSError as exc:
            if isinstance(exc, CheckpointExistsError):
                raise
            raise write_error(exc, self.final, "commit the checkpoint") from exc
        finally:
            os.close(self.dir_fd)
            self.dir_fd = -1
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a committed checkpoint so that no half-deleted folder is ever visible as one."""
    path = Path(path)
    hidden = path.parent / f"{TRASH_PREFIX}deleted.{uuid.uuid4().hex}"
    with _root_lock(path.parent):
        os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def write_error(exc: OSError, path: Path, action: str) -> CheckpointWriteError:
    """Translate an ``OSError`` raised while saving into a message that says what to do."""
    hint = {
        errno.ENOSPC: "the disk is full; free space or save elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free space or save elsewhere",
        errno.EFBIG: "the file-size limit was exceeded (ulimit -f); raise it",
        errno.EACCES: "permission denied; check the folder's permissions",
        errno.EROFS: "the file system is read-only; save elsewhere",
        errno.EIO: "an I/O error occurred; check the storage device",
    }.get(exc.errno or 0, "see the cause above")
    where = exc.filename or path
    return CheckpointWriteError(
        exc.errno or errno.EIO,
        f"could not {action} at {where}: {exc.strerror or exc} ({hint}); "
        "earlier checkpoints are untouched",
    )

"""The commit protocol: how a checkpoint folder appears on disk all at once or not at all.

Saving step ``S`` into root folder ``R``:

1. Create ``R`` if needed (and fsync its parent). Take ``R``'s lock (``flock`` on
   ``R/LOCK_NAME``); remove temporary folders left by writers that have died (a live writer holds
   an ``flock`` on its own temporary folder, so it is never touched); put back a checkpoint an
   interrupted overwrite had moved aside; create a fresh, uniquely named ``R/TMP_PREFIX...``
   folder and lock it. Release ``R``'s lock.
2. Write every file into the temporary folder and fsync each one.
3. Write ``MANIFEST_NAME`` last and fsync it, then fsync the temporary folder.
4. Take ``R``'s lock again and rename the temporary folder to ``R/step-S`` (or, for
   ``save_checkpoint(path=F)``, to ``F`` itself: then ``R`` is ``F``'s parent, the temporary
   folder ``R/.tmp-<F's name>.<id>`` is ``F``'s sibling and the lock is ``R/LOCK_NAME``), never replacing an
   existing checkpoint (``renameat2(RENAME_NOREPLACE)``; ``CheckpointExistsError`` if ``step-S``
   exists). With ``overwrite=True`` an existing ``step-S`` is swapped out in one atomic
   ``renameat2(RENAME_EXCHANGE)``; where the kernel or file system lacks it, the old folder is
   first renamed to ``R/TRASH_PREFIX...``, which step 1 of the next save puts back if the writer
   dies before the new folder is in place. fsync ``R``. Release the lock; delete what was
   replaced (a file or link, too: the link itself, never what it points to).
5. Only now may older checkpoints be pruned: :func:`remove_checkpoint` renames a folder to a
   hidden name and fsyncs ``R`` before deleting its files, so a half-deleted folder is never
   mistaken for a checkpoint.

Readers consider only folders named ``step-<digits>`` that contain ``MANIFEST_NAME``; temporary
and trash folders start with a dot and are never loaded (the names are in
:mod:`safeckpt.format.layout`; this module is the transaction). A crash at any point therefore leaves
either the old state or the new one visible, plus at most a hidden folder the next save cleans.
Any ``OSError`` (ENOSPC, EIO, EFBIG, ...) removes the temporary folder and becomes a
:class:`~safeckpt.errors.CheckpointWriteError` saying what failed; earlier checkpoints are never
modified by a save that fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import CheckpointExistsError, CheckpointWriteError, checkpoint_exists
from ..format.layout import (
    LOCK_NAME,
    TMP_PREFIX,
    TRASH_PREFIX,
    deleted_name,
    parse_step,
    step_dirname,
    temporary_name,
    trash_name,
    trashed_original,
)
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from .posix_write import Buffer, fsync_dir, write_file, write_files

__all__ = ["PosixPendingWrite", "remove_checkpoint", "write_error", "write_into"]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None  # not glibc >= 2.28 / musl >= 1.2.5, or not Linux
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where libc, kernel or file system lack it.

    Raises ``OSError`` for every other failure (``EEXIST`` when ``RENAME_NOREPLACE`` finds
    ``dst``), like :func:`os.rename`.
    """
    function = _libc_renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_dir(fd)
    finally:
        os.close(fd)


def _make_root(root: Path) -> None:
    if root.is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    _fsync_path(root.parent)  # the new root's own name must survive a power loss too


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_leftovers(root: Path) -> None:
    """Remove temporary folders of dead writers; put back checkpoints an overwrite moved aside.

    Called with the root lock held. Never raises: a leftover that cannot be removed now is
    retried by the next save and is invisible to readers meanwhile.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir(follow_symlinks=False):
                    _remove_if_unlocked(entry.path)
                else:  # a file or link an overwrite swapped out, its writer dead before removing it
                    os.unlink(entry.path)
            elif entry.name.startswith(TRASH_PREFIX):
                original = trashed_original(entry.name)  # None: a folder being deleted
                moved_aside = original is not None and (
                    parse_step(original) is not None or os.path.isfile(os.path.join(entry.path, MANIFEST_NAME))
                )
                if original is not None and moved_aside and not os.path.lexists(root / original):
                    os.rename(entry.path, root / original)
                    _fsync_path(root)
                else:
                    _remove_tree(entry.path)


def _remove_tree(path: str | Path) -> None:
    """Best-effort delete of a folder, or of a file or link that an overwrite replaced
    (``shutil.rmtree(ignore_errors=True)`` leaves those, and still raises if ``close`` fails)."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _remove_if_unlocked(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a live writer holds it
    finally:
        os.close(fd)
    _remove_tree(path)


class PosixPendingWrite:
    """A temporary folder being filled by this process; :meth:`commit` publishes it.

    Use as a context manager: leaving the block without committing removes the folder.
    """

    def __init__(self, root: str | os.PathLike[str], step: int, *, name: str | None = None) -> None:
        """Prepare ``root/step-NNNNNNNN``, or ``root/name`` when ``name`` is given (a folder the
        caller chose: ``save_checkpoint(path=...)``); the temporary folder is a sibling."""
        self.root = Path(root)
        self.step = step
        self.final = self.root / (name or step_dirname(step))
        self.path = self.root / temporary_name(self.final.name, uuid.uuid4().hex)
        self.dir_fd = -1
        self.committed = False

    def __repr__(self) -> str:
        return f"PosixPendingWrite(step={self.step}, path={str(self.path)!r}, committed={self.committed})"

    def __enter__(self) -> PosixPendingWrite:
        try:
            _make_root(self.root)
            with _root_lock(self.root):
                _clean_leftovers(self.root)
                os.mkdir(self.path, 0o755)
                self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(self.dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._discard()
            raise write_error(exc, self.root, "prepare the checkpoint folder") from exc
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.committed:
            self._discard()

    def _discard(self) -> None:
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            self.dir_fd = -1
        _remove_tree(self.path)

    @property
    def staging(self) -> str:
        """The temporary folder's name in the root (other processes write into it through
        :meth:`~safeckpt.storage.local.LocalStorage.join`)."""
        return self.path.name

    def write_files(self, files: Sequence[tuple[str, Iterable[Buffer], int]]) -> list[FileEntry]:
        """Write, hash and fsync every ``(name, parts, size_hint)`` in the temporary folder, the
        largest first, on several threads; their manifest entries, in the given order. Raises
        :class:`CheckpointWriteError` naming the failing file."""
        return write_into(self.dir_fd, self.path, files)

    def commit(self, manifest: Manifest | None = None, *, overwrite: bool = False) -> Path:
        """Write ``manifest`` last (if given; a caller may have written it), make the folder
        durable and rename it to its final name; returns that path.

        Raises :class:`CheckpointExistsError` if the step exists and ``overwrite`` is False,
        :class:`CheckpointWriteError` for any other failure (the folder is then removed by
        ``__exit__`` unless it was already renamed into place).
        """
        if manifest is not None:
            try:
                write_file(self.dir_fd, MANIFEST_NAME, (manifest.to_json_bytes(),))
            except OSError as exc:
                raise write_error(exc, self.path / MANIFEST_NAME, f"write {MANIFEST_NAME}") from exc
        replaced: Path | None = None
        action = "sync the checkpoint folder"
        try:
            fsync_dir(self.dir_fd)
            with _root_lock(self.root):
                action = "rename the checkpoint into place"
                replaced = self._publish(overwrite)
                self.committed = True
                action = "sync the parent folder after renaming the checkpoint into place (the new "
                action += "checkpoint is visible but may not survive a power loss)"
                _fsync_path(self.root)
                if replaced is not None and replaced.name.startswith(TRASH_PREFIX):
                    # Past this point it must never be restored: rename it to a deletion name.
                    deleted = self.root / deleted_name(uuid.uuid4().hex)
                    with contextlib.suppress(OSError):
                        os.rename(replaced, deleted)
                        replaced = deleted
        except CheckpointExistsError:
            raise
        except OSError as exc:
            raise write_error(exc, self.final, action) from exc
        finally:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            self.dir_fd = -1
        if replaced is not None:
            _remove_tree(replaced)
        return self.final

    def _publish(self, overwrite: bool) -> Path | None:
        """Rename the temporary folder to ``final`` (lock held); returns what it replaced."""
        exists = os.path.lexists(self.final)
        if exists and not overwrite:
            raise self._exists_error()
        if not exists:
            try:
                if not _renameat2(self.path, self.final, _RENAME_NOREPLACE):
                    os.rename(self.path, self.final)  # lock held and checked: nothing can appear
            except FileExistsError:
                raise self._exists_error() from None
            return None
        if _renameat2(self.path, self.final, _RENAME_EXCHANGE):
            return self.path  # now holds the replaced checkpoint, hidden under the temporary name
        trash = self.root / trash_name(self.final.name, uuid.uuid4().hex)
        os.rename(self.final, trash)
        try:
            os.rename(self.path, self.final)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(trash, self.final)  # put the old checkpoint straight back
            raise
        return trash

    def _exists_error(self) -> CheckpointExistsError:
        if os.path.isdir(self.final):
            return checkpoint_exists(self.final, self.step)
        return CheckpointExistsError(
            f"{self.final}: a file, not a checkpoint, is in the way; remove it, or pass overwrite=True to "
            "replace it"
        )


def write_into(dir_fd: int, folder: Path, files: Sequence[tuple[str, Iterable[Buffer], int]]) -> list[FileEntry]:
    """:func:`~safeckpt.storage.posix_write.write_files` into the open folder ``dir_fd``
    (``folder``), an ``OSError`` becoming a :class:`CheckpointWriteError` naming the file."""
    try:
        return write_files(dir_fd, files, folder=folder)
    except OSError as exc:
        name = Path(str(exc.filename or "a file")).name
        raise write_error(exc, folder / name, f"write {name}") from exc


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a committed checkpoint so that no half-deleted folder is ever visible as one.

    Example:
        >>> remove_checkpoint("checkpoints/step-00000100")  # doctest: +SKIP
    """
    path = Path(path)
    hidden = path.parent / deleted_name(uuid.uuid4().hex)
    with _root_lock(path.parent):
        os.rename(path, hidden)
        _fsync_path(path.parent)
    _remove_tree(hidden)


def write_error(exc: OSError, path: Path, action: str) -> CheckpointWriteError:
    """Translate an ``OSError`` raised while saving into a message that says what to do."""
    hint = {
        errno.ENOSPC: "the disk is full; free space or save elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free space or save elsewhere",
        errno.EFBIG: "the file-size limit was exceeded (ulimit -f); raise it",
        errno.EACCES: "permission denied; check the folder's permissions",
        errno.EPERM: "operation not permitted; check the folder's permissions",
        errno.EROFS: "the file system is read-only; save elsewhere",
        errno.EIO: "an I/O error occurred; check the storage device",
    }.get(exc.errno or 0, "see the cause above")
    where = exc.filename or path
    return CheckpointWriteError(
        exc.errno or errno.EIO,
        f"could not {action} at {where}: {exc.strerror or exc} ({hint}); "
        "earlier checkpoints are untouched",
    )

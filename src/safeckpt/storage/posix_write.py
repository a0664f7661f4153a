"""Hashed, streamed writes of the files inside one checkpoint folder (reads: :mod:`.posix`).

Writes stream the caller's buffers (tensor memory, never a whole-file copy) to the file in
pieces; each piece is hashed on a helper thread while it is being written, and writeback to the
disk is started every few pieces (``sync_file_range`` on Linux), so the closing ``fsync`` has
little left to wait for. :func:`write_files` writes several files at once, one per core, which
is what makes a save as fast as the hashing of its largest file. A written file is never read
back to hash it.

With enough cores, a large file's writer also digests each fixed-size chunk on a second thread
(the manifest's ``chunks``, format 1.1), so that reads can verify one file on every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import CheckpointExistsError, CheckpointWriteError
from ..format.manifest import FileEntry
from .base import Buffer
from .hashing import FileDigests
from .parallel import in_parallel
from .tuning import TUNING, cores

__all__ = ["Buffer", "file_exists", "fsync_dir", "write_file", "write_files", "write_new_file"]



def _load_sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library already linked in: no lookup
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux / not glibc: fsync alone is still correct
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (a hint only)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def write_file(dir_fd: int, name: str, parts: Iterable[Buffer], size_hint: int = 0) -> FileEntry:
    """Create ``name`` in the folder ``dir_fd``, write ``parts`` in order, fsync it.

    Returns the manifest entry: size and SHA-256 computed while writing, plus per-chunk digests
    (on a second hashing thread) when ``size_hint``, about the total of ``parts``, is large
    enough (:func:`chunk_size`). Raises ``OSError`` from the underlying calls; the caller owns
    cleanup of the folder.
    """
    digests = FileDigests(size_hint)
    flushed = 0
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        for piece in digests.pieces(parts, TUNING.piece):
            _write_all(fd, piece)
            if digests.size - flushed >= TUNING.writeback:
                _start_writeback(fd, flushed, digests.size - flushed)
                flushed = digests.size
        os.fsync(fd)
    finally:
        try:
            digests.close()
        finally:
            os.close(fd)
    return digests.entry(name)


def write_files(
    dir_fd: int, files: Sequence[tuple[str, Iterable[Buffer], int]], *, folder: Path, workers: int | None = None
) -> list[FileEntry]:
    """:func:`write_file` for each ``(name, parts, size_hint)``, several at once; entries in the
    given order.

    Files are started in order, ``workers`` (default: one per core, at least two) at a time, so
    put the largest first. On failure the files not yet started are skipped and the first error
    is raised as an ``OSError`` whose ``filename`` is the failing file's path under ``folder``.
    """
    jobs = [functools.partial(_write_named, dir_fd, *file, folder) for file in files]
    return in_parallel(jobs, workers or max(2, cores()), name="safeckpt-write")


def _write_named(dir_fd: int, name: str, parts: Iterable[Buffer], size_hint: int, folder: Path) -> FileEntry:
    try:
        return write_file(dir_fd, name, parts, size_hint)
    except OSError as exc:
        if exc.filename in (None, name):
            exc.filename = str(folder / name)
        raise


def fsync_dir(dir_fd: int) -> None:
    """Make the folder's entries (created and renamed names) durable."""
    os.fsync(dir_fd)


def file_exists(target: Path) -> CheckpointExistsError:
    """The error for an export file that is already there (see :func:`write_new_file`)."""
    return CheckpointExistsError(f"{target}: already exists; pass overwrite=True to replace it or choose another name")


def write_new_file(target: Path, parts: Iterable[bytes | memoryview] | Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write ``target`` all at once: into a temporary file beside it (from ``parts``, or by
    calling ``parts(path)``), fsync, then rename into place (never replacing an existing file
    unless ``overwrite``). A failure leaves no partial file behind."""
    folder = target.parent
    if not folder.is_dir():  # said plainly: torch.save's own error here is a bare RuntimeError
        missing = not os.path.lexists(folder)
        raise CheckpointWriteError(
            errno.ENOENT if missing else errno.ENOTDIR,
            f"could not write {target}: its folder {folder} {'does not exist' if missing else 'is not a folder'}; "
            f"create it first (mkdir -p {folder}) or choose another path; nothing was written",
        )
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        if callable(parts):
            parts(tmp)
        else:
            with open(tmp, "xb") as file:
                for part in parts:
                    file.write(part)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if target exists, atomically
            except FileExistsError:
                raise file_exists(target) from None
            except OSError:  # no hard links on this file system
                if os.path.lexists(target):
                    raise file_exists(target) from None
                os.replace(tmp, target)
        with contextlib.suppress(OSError):
            fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except CheckpointExistsError:
        raise
    except OSError as exc:
        raise CheckpointWriteError(
            exc.errno or 0, f"could not write {target}: {exc.strerror or exc}; nothing was written there"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return target

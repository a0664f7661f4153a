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

import ctypes
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..format.manifest import FileEntry
from .base import Buffer
from .hashing import FileDigests
from .parallel import in_parallel
from .tuning import TUNING, cores

__all__ = ["Buffer", "fsync_dir", "write_file", "write_files"]



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

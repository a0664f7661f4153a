"""Hashed writes and verified reads of the files inside one checkpoint folder.

Writes hash the bytes as they go to the file (on a second thread, so hashing overlaps the
copy into the page cache) and never read a file back to hash it. Reads open the file without
following symlinks, insist on a regular file of exactly the manifest's size, read it once into
memory and hash those same bytes: what is parsed afterwards is what was verified.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .manifest import FileEntry

__all__ = ["fsync_dir", "read_bounded", "read_verified", "write_file"]

Buffer = bytes | bytearray | memoryview

_PIECE = 8 * 1024 * 1024
"""Bytes hashed on the helper thread while the main thread writes the previous piece."""
_INLINE_HASH = 1024 * 1024
_hash_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeckpt-hash")
    return _hash_pool


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def write_file(dir_fd: int, name: str, parts: Iterable[Buffer]) -> FileEntry:
    """Create ``name`` in the folder ``dir_fd``, write ``parts`` in order, fsync it.

    Returns the manifest entry (size and SHA-256 computed while writing). Raises ``OSError``
    from the underlying calls; the caller owns cleanup of the folder.
    """
    sha = hashlib.sha256()
    size = 0
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            size += len(view)
            if len(view) <= _INLINE_HASH:
                sha.update(view)
                _write_all(fd, view)
                continue
            for start in range(0, len(view), _PIECE):
                piece = view[start : start + _PIECE]
                hashing: Future[None] = _pool().submit(sha.update, piece)
                try:
                    _write_all(fd, piece)
                finally:
                    hashing.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(name=name, size=size, sha256=sha.hexdigest())


def fsync_dir(dir_fd: int) -> None:
    """Make the folder's entries (created and renamed names) durable."""
    os.fsync(dir_fd)


def _open_regular(dir_fd: int, name: str, *, source: str, missing: str) -> tuple[int, int]:
    """Open ``name`` for reading without following links; returns (fd, size) of a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{source}: {missing}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointCorruptedError(
                f"{source}: is a symbolic link; checkpoint files must be regular files"
            ) from None
        raise CheckpointCorruptedError(f"{source}: cannot be opened ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointCorruptedError(
            f"{source}: is not a regular file (mode {stat.filemode(info.st_mode)}); "
            "the checkpoint has been tampered with or damaged"
        )
    return fd, info.st_size


def _read_exactly(fd: int, size: int, *, source: str) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        got = os.readv(fd, [view[filled:]])
        if got == 0:
            break
        filled += got
    if filled != size or os.read(fd, 1):
        raise CheckpointCorruptedError(
            f"{source}: changed size while being read (expected {size} bytes); "
            "another process is writing it"
        )
    return buffer


def read_bounded(dir_fd: int, name: str, *, limit: int, source: str, missing: str) -> bytearray:
    """Read a whole small file (the manifest), refusing one larger than ``limit`` bytes."""
    fd, size = _open_regular(dir_fd, name, source=source, missing=missing)
    try:
        if size > limit:
            raise CheckpointCorruptedError(
                f"{source}: is {size} bytes, over the limit of {limit}; not a safeckpt file"
            )
        return _read_exactly(fd, size, source=source)
    finally:
        os.close(fd)


def read_verified(dir_fd: int, entry: FileEntry, *, source: str, verify: bool = True) -> bytearray:
    """Read the file ``entry`` names, check its size and (if ``verify``) its SHA-256.

    ``source`` is the path shown in errors. Symlinks, FIFOs, devices and folders are refused
    before a byte is read, so a hostile checkpoint cannot make the reader hang or follow a link.
    """
    fd, size = _open_regular(
        dir_fd,
        entry.name,
        source=source,
        missing="file listed in manifest.json is missing; the checkpoint is incomplete, "
        "load an earlier one",
    )
    try:
        if size != entry.size:
            raise CheckpointCorruptedError(
                f"{source}: size is {size} bytes, manifest.json says {entry.size}; "
                "the file is truncated or damaged, load an earlier checkpoint"
            )
        buffer = _read_exactly(fd, size, source=source)
    finally:
        os.close(fd)
    if verify:
        digest = hashlib.sha256(buffer).hexdigest()
        if digest != entry.sha256:
            raise CheckpointCorruptedError(
                f"{source}: SHA-256 is {digest}, manifest.json says {entry.sha256}; the file is "
                "corrupted, load an earlier checkpoint"
            )
    return buffer

"""Hashed writes and verified reads of the files inside one checkpoint folder.

Writes stream the caller's buffers (tensor memory, never a whole-file copy) to the file in
pieces; each piece is hashed on a helper thread while it is being written, and writeback to the
disk is started every few pieces (``sync_file_range`` on Linux), so the closing ``fsync`` has
little left to wait for. :func:`write_files` writes several files at once, one per core, which
is what makes a save as fast as the hashing of its largest file. A written file is never read
back to hash it.

Reads open the file without following symlinks and insist on a regular file of exactly the
manifest's size. With verification, the file is read once, in pieces, into fresh page-aligned
memory, each piece hashed on a helper thread while the next is read, and the buffer is returned
only if the digest matches: what is parsed afterwards is what was verified. A safetensors
archive's buffer is allocated with spare room after the file (sized from the 8-byte header
length alone, nothing is parsed) so its tensors can later be moved in place to aligned
addresses, see :func:`safeckpt.tensors.tensors_from_buffer`. Without verification the file is
memory-mapped privately (copy-on-write) and nothing is read until it is used: for storage you
trust, which must also not truncate the file while it is mapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import limits
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .manifest import FileEntry

__all__ = ["fsync_dir", "read_bounded", "read_verified", "realign_room", "write_file", "write_files"]

Buffer = bytes | bytearray | memoryview

_PIECE = 8 * 1024 * 1024
"""Bytes hashed on a helper thread while the calling thread writes or reads the next piece."""
_INLINE = 1024 * 1024
"""Files whose pieces are all this small are hashed on the calling thread: a hand-off costs more."""
_WRITEBACK = 32 * 1024 * 1024
"""Start writing dirty pages to disk every this many bytes, so the final fsync waits less."""
_ALIGN = 64
_AHEAD = 4
"""Pieces handed to a hashing thread and not yet hashed, at most (bounds staged copies in use)."""


class _Hasher:
    """SHA-256 of a stream of pieces, computed on a thread of its own while the caller does I/O.

    Plain threads, not a ``concurrent.futures`` pool: a background save may still be writing
    while the interpreter exits, when such pools refuse new work. A piece must stay unchanged
    until :meth:`hexdigest`; the first pieces are hashed inline until one is worth a hand-off.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._room = threading.Semaphore(_AHEAD)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            self._sha.update(piece)
            self._room.release()

    def update(self, piece: memoryview) -> None:
        if self._thread is None and len(piece) <= _INLINE:
            self._sha.update(piece)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="safeckpt-hash", daemon=True)
            self._thread.start()
        self._room.acquire()
        self._queue.put(piece)

    def close(self) -> None:
        """Wait until every piece handed over is hashed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()


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


def write_file(dir_fd: int, name: str, parts: Iterable[Buffer]) -> FileEntry:
    """Create ``name`` in the folder ``dir_fd``, write ``parts`` in order, fsync it.

    Returns the manifest entry (size and SHA-256 computed while writing). Raises ``OSError``
    from the underlying calls; the caller owns cleanup of the folder.
    """
    sha = _Hasher()
    size = flushed = 0
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), _PIECE):
                piece = view[start : start + _PIECE]
                sha.update(piece)
                _write_all(fd, piece)
                size += len(piece)
                if size - flushed >= _WRITEBACK:
                    _start_writeback(fd, flushed, size - flushed)
                    flushed = size
        os.fsync(fd)
    finally:
        sha.close()
        os.close(fd)
    return FileEntry(name=name, size=size, sha256=sha.hexdigest())


def write_files(
    dir_fd: int, files: Sequence[tuple[str, Iterable[Buffer]]], *, folder: Path, workers: int | None = None
) -> list[FileEntry]:
    """:func:`write_file` for each ``(name, parts)``, several at once; entries in the given order.

    Files are started in order, ``workers`` (default: one per core, at least two) at a time, so
    put the largest first. On failure the files not yet started are skipped and the first error
    is raised as an ``OSError`` whose ``filename`` is the failing file's path under ``folder``.
    """
    workers = min(workers or max(2, os.cpu_count() or 1), len(files))
    if workers <= 1:
        return [_write_named(dir_fd, name, parts, folder) for name, parts in files]
    entries: list[FileEntry | None] = [None] * len(files)
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(len(files)))

    def work() -> None:
        while True:
            with lock:
                index = None if errors else next(todo, None)
            if index is None:
                return
            try:
                entries[index] = _write_named(dir_fd, *files[index], folder)
            except BaseException as exc:  # re-raised by the calling thread
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=work, name="safeckpt-write", daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as exc:  # e.g. KeyboardInterrupt: start no more files, and never
        with lock:  # return while a writer still uses dir_fd (the caller closes it)
            errors.append(exc)
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]
    return [entry for entry in entries if entry is not None]


def _write_named(dir_fd: int, name: str, parts: Iterable[Buffer], folder: Path) -> FileEntry:
    try:
        return write_file(dir_fd, name, parts)
    except OSError as exc:
        if exc.filename in (None, name):
            exc.filename = str(folder / name)
        raise


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


def _changed_size(source: str, size: int) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(
        f"{source}: changed size while being read (expected {size} bytes); "
        "another process is writing it"
    )


def _read_into(fd: int, view: memoryview, offset: int, *, source: str, size: int) -> None:
    filled = 0
    while filled < len(view):
        got = os.preadv(fd, [view[filled:]], offset + filled)
        if got == 0:
            raise _changed_size(source, size)
        filled += got


def _read_exactly(fd: int, size: int, *, source: str) -> bytearray:
    buffer = bytearray(size)
    _read_into(fd, memoryview(buffer), 0, source=source, size=size)
    if os.pread(fd, 1, size):
        raise _changed_size(source, size)
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


class _Arena(mmap.mmap):
    """Anonymous page-aligned memory a verified file is read into; may be longer than the file."""


def _arena(size: int) -> _Arena:
    # Private: a shared anonymous map is shmem, whose page faults cost half again as much.
    return _Arena(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def realign_room(buffer: memoryview) -> int:
    """Spare bytes after ``buffer`` that its owner may overwrite (0 unless :func:`read_verified`
    allocated it with room to move tensors to aligned addresses)."""
    owner = buffer.obj
    if isinstance(owner, _Arena) and buffer.contiguous and not buffer.readonly:
        return len(owner) - len(buffer)
    return 0


def _archive_room(prefix: bytes, size: int) -> int:
    """Room to align every tensor of a safetensors archive of ``size`` bytes to ``_ALIGN`` bytes.

    Each tensor entry of a valid header takes well over 40 bytes of JSON, so the header length
    (``prefix``, the file's first 8 bytes, not trusted: the room is capped by the file size and
    the header limit, and only reserves address space until a verified archive is aligned)
    bounds the number of tensors, and each needs at most ``_ALIGN`` bytes to move.
    """
    if len(prefix) < 8:
        return 0
    (length,) = struct.unpack_from("<Q", prefix)
    return _ALIGN * (min(length, size, limits.MAX_SAFETENSORS_HEADER_BYTES) // 40 + 2)


def _read_hashing(fd: int, view: memoryview, *, source: str) -> str:
    """Fill ``view`` from the file, hashing each piece while the next one is read."""
    sha = _Hasher()
    try:
        for start in range(0, len(view), _PIECE):
            piece = view[start : start + _PIECE]
            _read_into(fd, piece, start, source=source, size=len(view))
            sha.update(piece)
    finally:
        sha.close()
    return sha.hexdigest()


def _map(fd: int, size: int) -> memoryview:
    if size == 0:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))


def read_verified(dir_fd: int, entry: FileEntry, *, source: str, verify: bool = True) -> memoryview:
    """Read the file ``entry`` names, check its size and (if ``verify``) its SHA-256.

    Returns a writable buffer of exactly the file's bytes. With ``verify=False`` it is a private
    memory map (copy-on-write; bytes are read when first touched). ``source`` is the path shown in
    errors. Symlinks, FIFOs, devices and folders are refused before a byte is read, so a hostile
    checkpoint cannot make the reader hang or follow a link.
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
        if not verify:
            return _map(fd, size)
        with contextlib.suppress(OSError, AttributeError):  # a hint; not on every platform
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        room = _archive_room(os.pread(fd, 8, 0), size) if entry.name.endswith(".safetensors") else 0
        capacity = size + room
        view = memoryview(_arena(capacity))[:size]
        digest = _read_hashing(fd, view, source=source)
        if os.pread(fd, 1, size):
            raise _changed_size(source, size)
    finally:
        os.close(fd)
    if digest != entry.sha256:
        raise CheckpointCorruptedError(
            f"{source}: SHA-256 is {digest}, manifest.json says {entry.sha256}; the file is "
            "corrupted, load an earlier checkpoint"
        )
    return view


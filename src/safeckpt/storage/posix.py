"""Verified reads of the files inside one checkpoint folder (writes: :mod:`.posix_write`;
verification that keeps nothing: :mod:`.posix_stream`).

Reads open the file without following symlinks and insist on a regular file of exactly the
manifest's size. With verification, the file is read once into fresh page-aligned memory and
the buffers are returned only if every digest matches: what is parsed afterwards is what was
verified. A file with chunk digests is read and hashed chunk by chunk on all cores at once; one
without is read in pieces, each hashed on a helper thread while the next is read. A safetensors
archive's buffer is allocated with spare room after the file (sized from the 8-byte header
length alone, nothing is parsed) so its tensors can later be moved in place to aligned
addresses, see :func:`safeckpt.torch.tensors.tensors_from_buffer`. Without verification the file is
memory-mapped privately (copy-on-write) and nothing is read until it is used: for storage you
trust, which must also not truncate the file while it is mapped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import LOAD_EARLIER, CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from ..format.manifest import FileEntry
from .base import ReadArena
from .hashing import MISSING_FILE, Hasher, check_chunk_digest, check_digest, chunk_size, wrong_size
from .parallel import in_parallel
from .tuning import TUNING, cores

__all__ = [
    "OpenFile",
    "check_digests",
    "chunk_size",
    "read_bounded",
    "read_files",
    "read_into",
    "unreadable",
]





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
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # not the checkpoint's fault: no fallback
            raise CheckpointError(
                f"{source}: cannot be opened: too many open files ({exc.strerror}); raise the "
                "limit (ulimit -n) or close files this process holds open"
            ) from None
        raise CheckpointCorruptedError(f"{source}: cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise CheckpointCorruptedError(f"{source}: cannot be read ({exc.strerror})") from None
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


def read_into(fd: int, view: memoryview, offset: int, *, source: str, size: int) -> None:
    filled = 0
    while filled < len(view):
        got = os.preadv(fd, [view[filled:]], offset + filled)
        if got == 0:
            raise _changed_size(source, size)
        filled += got


def _read_exactly(fd: int, size: int, *, source: str) -> bytearray:
    buffer = bytearray(size)
    read_into(fd, memoryview(buffer), 0, source=source, size=size)
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


def _read_hashing(fd: int, view: memoryview, *, source: str) -> str:
    """Fill ``view`` from the file, hashing each piece while the next one is read."""
    sha = Hasher()
    try:
        for start in range(0, len(view), TUNING.piece):
            piece = view[start : start + TUNING.piece]
            read_into(fd, piece, start, source=source, size=len(view))
            sha.hand_off(piece)
    finally:
        sha.close()
    return sha.digests()[0]


def _map(fd: int, size: int) -> memoryview:
    if size == 0:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))


def unreadable(source: str, exc: BaseException) -> CheckpointCorruptedError:
    """An ``OSError`` of a read itself (EIO, or ENOMEM for a file, perhaps a sparse one, too
    large for memory) as an error naming the file."""
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return CheckpointCorruptedError(
        f"{source}: cannot be read ({reason}); the storage is failing or the file is larger than "
        f"the memory available: {LOAD_EARLIER}, or this one where more memory is free"
    )


class OpenFile:
    """A file being read: its entry, descriptor, buffer and the path shown in errors."""

    def __init__(self, dir_fd: int, entry: FileEntry, folder: Path) -> None:
        self.entry = entry
        self.source = str(folder / entry.name)
        self.fd, size = _open_regular(
            dir_fd,
            entry.name,
            source=self.source,
            missing=MISSING_FILE,
        )
        self.view = memoryview(b"")
        if size != entry.size:
            os.close(self.fd)
            raise wrong_size(self.source, entry, size)

    def allocate(self, *, verify: bool) -> memoryview:
        """The buffer the file is read into (fresh memory), or with ``verify=False`` a map of it."""
        size = self.entry.size
        try:
            if not verify:
                self.view = _map(self.fd, size)
                return self.view
            with contextlib.suppress(OSError, AttributeError):  # a hint; not on every platform
                os.posix_fadvise(self.fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
            archive = self.entry.name.endswith(".safetensors")
            room = ReadArena.room_for_archive(os.pread(self.fd, 8, 0), size) if archive else 0
            self.view = ReadArena.allocate(size, room=room)
        except (OSError, MemoryError, OverflowError) as exc:
            raise unreadable(self.source, exc) from exc
        return self.view

    def check_whole(self) -> None:
        """Read the file and check the whole-file SHA-256."""
        try:
            digest = _read_hashing(self.fd, self.view, source=self.source)
        except (OSError, MemoryError) as exc:
            raise unreadable(self.source, exc) from exc
        check_digest(self.source, self.entry, digest)

    def check_span(self, index: int, span: tuple[int, int, str], *, keep: bool = True) -> None:
        """Read bytes ``span[0]`` to ``span[1]`` in cache-sized parts, into the file's buffer
        with ``keep``, else through one scratch buffer, and check their SHA-256 ``span[2]``:
        chunk ``index``'s digest, or the whole file's for a file without chunk digests."""
        start, end, _ = span
        scratch = None if keep else memoryview(bytearray(min(TUNING.cached_piece, end - start)))
        sha = hashlib.sha256()
        try:
            for offset in range(start, end, TUNING.cached_piece):
                size = min(TUNING.cached_piece, end - offset)
                part = self.view[offset : offset + size] if scratch is None else scratch[:size]
                read_into(self.fd, part, offset, source=self.source, size=self.entry.size)
                sha.update(part)
        except (OSError, MemoryError) as exc:
            raise unreadable(self.source, exc) from exc
        if self.entry.chunks is None:
            check_digest(self.source, self.entry, sha.hexdigest())
        else:
            check_chunk_digest(self.source, self.entry, index, span, sha.hexdigest())

    def check_unchanged(self) -> None:
        """Refuse a file that grew while it was read (another process is writing it)."""
        try:
            grew = os.pread(self.fd, 1, self.entry.size)
        except OSError as exc:
            raise unreadable(self.source, exc) from exc
        if grew:
            raise _changed_size(self.source, self.entry.size)


def read_files(
    dir_fd: int, entries: Iterable[FileEntry], *, folder: Path, verify: bool = True
) -> dict[str, memoryview]:
    """Read each file ``entries`` name from the folder ``dir_fd`` (``folder`` in errors), check
    its size and, if ``verify``, its SHA-256; returns name -> writable buffer of its bytes.

    Returns only once every file verified, so nothing is parsed that did not. A file with chunk
    digests is checked by them, its chunks read and hashed on all cores at once; a file without
    is hashed whole, by one core (:func:`.posix_stream.audit_files` checks both kinds, and
    :class:`.posix_stream.VerifiedFiles` verifies without keeping the bytes). With
    ``verify=False`` each buffer is a private memory map (copy-on-write; bytes are read when
    first touched). Symlinks, FIFOs, devices and folders are refused before a byte is read, so
    a hostile checkpoint cannot make the reader hang or follow a link.
    """
    ordered = sorted(entries, key=lambda e: -e.size)  # the largest takes longest: start it first
    buffers: dict[str, memoryview] = {}
    for start in range(0, len(ordered), TUNING.open_at_once):  # bounded open descriptors
        buffers.update(_read_batch(dir_fd, ordered[start : start + TUNING.open_at_once], folder, verify))
    return buffers


def check_digests(files: Iterable[OpenFile], *, keep: bool) -> None:
    """Check every digest of ``files``, each chunk digest where a file has them, else its
    SHA-256, the longest first, on all cores. With ``keep`` the bytes land in each file's
    buffer (a whole file is then read on one thread and hashed on another); without, they
    stream through small scratch buffers and nothing is kept."""
    jobs: list[tuple[int, Callable[[], None]]] = []
    for file in files:
        size, chunks = file.entry.size, file.entry.chunks
        if chunks is None and keep:
            jobs.append((size, file.check_whole))
            continue
        spans = chunks.digest_spans(size) if chunks is not None else [(0, size, file.entry.sha256)]
        jobs.extend((span[1] - span[0], functools.partial(file.check_span, index, span, keep=keep))
                    for index, span in enumerate(spans))  # fmt: skip
    jobs.sort(key=lambda job: -job[0])
    in_parallel([job for _, job in jobs], cores(), name="safeckpt-read" if keep else "safeckpt-verify")


def _read_batch(dir_fd: int, entries: list[FileEntry], folder: Path, verify: bool) -> dict[str, memoryview]:
    files: list[OpenFile] = []
    try:
        for entry in entries:
            files.append(OpenFile(dir_fd, entry, folder))
        for file in files:
            file.allocate(verify=verify)
        if verify:
            check_digests(files, keep=True)
            for file in files:
                file.check_unchanged()
    finally:
        for file in files:
            os.close(file.fd)
    return {file.entry.name: file.view for file in files}

"""Verification that streams files through small buffers and keeps none of them: audits
(every digest of every file) and :class:`VerifiedFiles` (verify now, read byte ranges later).

:func:`safeckpt.storage.posix.read_files` is the other way to verify: it keeps every file whole
in fresh memory, for parsers that need all of it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointCorruptedError
from ..format.manifest import FileEntry
from .hashing import Hasher, check_chunk_digest, check_digest
from .parallel import in_parallel
from .posix import OpenFile, check_digests, read_into, unreadable
from .tuning import TUNING, cores

__all__ = ["VerifiedFiles", "audit_files"]


class VerifiedFiles:
    """Files verified by streaming them once through small buffers, then read in byte ranges
    straight into memory the caller owns.

    For loaders that copy parts of files into memory that already exists (a sharded load reads
    each chunk into the parameter it belongs to): nothing is kept in memory between verifying
    and reading, where :func:`read_files` holds every file whole. At most
    ``TUNING.open_at_once`` files are open at a time (a load on one process may read the shards
    of thousands of ranks); one closed in between is opened again by name and must be the same
    file, unchanged. A committed checkpoint is never written in place, but a file whose
    identity, size or modification time changed since it was verified is refused, when it is
    opened again or at :meth:`close`, so a writer that broke that rule is reported (though
    perhaps only after some of its bytes were read).
    """

    def __init__(self, dir_fd: int, entries: Iterable[FileEntry], *, folder: Path, verify: bool = True) -> None:
        self._folder = folder
        self._entries = {entry.name: entry for entry in entries}
        self._open: OrderedDict[str, OpenFile] = OrderedDict()
        self._stamps: dict[str, tuple[int, ...]] = {}
        self._dir_fd = os.dup(dir_fd)
        try:
            ordered = sorted(self._entries.values(), key=lambda e: -e.size)  # the largest first
            for start in range(0, len(ordered), TUNING.open_at_once):
                files = [self._file(entry.name) for entry in ordered[start : start + TUNING.open_at_once]]
                if verify:
                    check_digests(files, keep=False)
        except BaseException:
            self._close_all()
            raise

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of file ``name`` from ``offset`` on."""
        file = self._file(name)
        if offset < 0 or offset + len(view) > file.entry.size:
            raise ValueError(f"{file.source}: bytes {offset} to {offset + len(view)} are outside the file")
        try:
            read_into(file.fd, view, offset, source=file.source, size=file.entry.size)
        except OSError as exc:
            raise unreadable(file.source, exc) from exc

    def close(self) -> None:
        """Close the files; refuse any that changed since they were verified (idempotent)."""
        try:
            while self._open:
                self._close_oldest()
        finally:
            self._close_all()

    def __del__(self) -> None:  # a load that failed between verifying and reading
        self._close_all()

    def _file(self, name: str) -> OpenFile:
        file = self._open.get(name)
        if file is not None:
            self._open.move_to_end(name)
            return file
        while len(self._open) >= TUNING.open_at_once:
            self._close_oldest()
        file = OpenFile(self._dir_fd, self._entries[name], self._folder)
        try:
            stamp = _stamp(file)
            if self._stamps.setdefault(name, stamp) != stamp:
                raise _modified(file)
        except BaseException:
            os.close(file.fd)
            raise
        self._open[name] = file
        return file

    def _close_oldest(self) -> None:
        name, file = self._open.popitem(last=False)
        try:
            if _stamp(file) != self._stamps[name]:
                raise _modified(file)
            file.check_unchanged()
        finally:
            os.close(file.fd)

    def _close_all(self) -> None:
        files, self._open = getattr(self, "_open", OrderedDict()), OrderedDict()
        for file in files.values():
            os.close(file.fd)
        fd, self._dir_fd = getattr(self, "_dir_fd", -1), -1
        if fd >= 0:
            os.close(fd)


def _modified(file: OpenFile) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(
        f"{file.source}: was modified or replaced while the checkpoint was being loaded (another "
        "process wrote to it), so what was loaded may mix old and new bytes; load again"
    )


def _stamp(file: OpenFile) -> tuple[int, ...]:
    try:
        info = os.fstat(file.fd)
    except OSError as exc:
        raise unreadable(file.source, exc) from exc
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def audit_files(dir_fd: int, entries: Iterable[FileEntry], *, folder: Path) -> None:
    """Check each file's size and every digest the manifest records (whole-file and chunks).

    For audits (``verify_checkpoint``): a loader may trust either kind of digest, so both must
    hold. Files are streamed through one small buffer per thread, several files at once, so the
    memory used does not grow with the checkpoint, unlike :func:`read_files`, which keeps what
    it verified.
    """
    jobs = [functools.partial(_audit, dir_fd, entry, folder) for entry in sorted(entries, key=lambda e: -e.size)]
    in_parallel(jobs, cores(), name="safeckpt-verify")


def _audit(dir_fd: int, entry: FileEntry, folder: Path) -> None:
    file = OpenFile(dir_fd, entry, folder)
    whole = hashlib.sha256()
    chunks = Hasher(entry.chunks.size) if entry.chunks is not None else None  # only consume()d
    buffer = memoryview(bytearray(min(TUNING.piece, entry.size)))
    try:
        for start in range(0, entry.size, TUNING.piece):
            piece = buffer[: min(TUNING.piece, entry.size - start)]
            read_into(file.fd, piece, start, source=file.source, size=entry.size)
            whole.update(piece)
            if chunks is not None:
                chunks.consume(piece)
        file.check_unchanged()
    except OSError as exc:
        raise unreadable(file.source, exc) from exc
    finally:
        os.close(file.fd)
    check_digest(file.source, entry, whole.hexdigest())
    if chunks is not None and entry.chunks is not None:
        spans = entry.chunks.digest_spans(entry.size)
        for index, (span, found) in enumerate(zip(spans, chunks.digests(), strict=True)):
            check_chunk_digest(file.source, entry, index, span, found)

"""SHA-256 of files as they stream past, whole and per chunk, and the messages of a mismatch.

:class:`Hasher` digests a stream of pieces either on the calling thread (:meth:`Hasher.consume`)
or on a thread of its own while the caller does I/O (:meth:`Hasher.hand_off`);
:class:`FileDigests` is what every writer hashes a file with (whole and, past
:func:`chunk_size`, the writers' chunk policy, per chunk); :func:`check_digest` and
:func:`check_chunk_digest` raise the one message for each kind of mismatch.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator

from ..errors import LOAD_EARLIER, CheckpointCorruptedError, damaged
from ..format import limits
from ..format.manifest import Chunks, FileEntry
from .base import Buffer
from .tuning import TUNING, cores

__all__ = ["FileDigests", "Hasher", "check_chunk_digest", "check_digest", "chunk_size", "wrong_size"]


class Hasher:
    """SHA-256 of a stream of pieces, computed on a thread of its own while the caller does I/O.

    With ``chunk`` > 0 it digests each consecutive ``chunk`` bytes of the stream separately
    instead (the manifest's per-chunk digests). Plain threads, not a ``concurrent.futures``
    pool: a background save may still be writing while the interpreter exits, when such pools
    refuse new work. A piece must stay unchanged until :meth:`digests`; the first pieces are
    hashed inline until one is worth a hand-off.
    """

    def __init__(self, chunk: int = 0) -> None:
        self._chunk = chunk
        self._filled = 0
        self._sha = hashlib.sha256()
        self._done: list[str] = []
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._room = threading.Semaphore(TUNING.ahead)
        self._thread: threading.Thread | None = None

    def consume(self, piece: memoryview) -> None:
        """Hash ``piece`` now, on the calling thread (the caller may reuse it afterwards)."""
        if not self._chunk:
            self._sha.update(piece)
            return
        while piece:
            take = min(self._chunk - self._filled, len(piece))
            self._sha.update(piece[:take])
            self._filled += take
            piece = piece[take:]
            if self._filled == self._chunk:
                self._done.append(self._sha.hexdigest())
                self._sha, self._filled = hashlib.sha256(), 0

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            self.consume(piece)
            self._room.release()

    def hand_off(self, piece: memoryview) -> None:
        """Hash ``piece`` on the hashing thread (inline while pieces are small); the caller must
        not change it until :meth:`digests` or :meth:`close` returns."""
        if self._thread is None and len(piece) <= TUNING.inline:
            self.consume(piece)
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

    def digests(self) -> list[str]:
        """The whole stream's digest, or with ``chunk`` each chunk's (the last may be short)."""
        self.close()
        if not self._chunk:
            return [self._sha.hexdigest()]
        if self._filled:
            self._done.append(self._sha.hexdigest())
            self._filled = 0
        return self._done


def chunk_size(file_size: int) -> int:
    """Bytes per chunk digest for a file of ``file_size`` bytes, or 0 for no chunk digests.

    None for a file of fewer than two chunks, and none on a machine of fewer than
    ``TUNING.min_cores_for_chunks`` usable cores: there the second hashing thread competes with the
    first for a core and makes the save slower by more than it makes the load faster. At most
    ``TUNING.max_chunks`` per file keeps the manifest small.
    """
    if cores() < TUNING.min_cores_for_chunks:
        return 0
    size = max(TUNING.min_chunk, limits.MIN_CHUNK_BYTES)  # readers refuse smaller chunks
    while file_size > size * TUNING.max_chunks:
        size *= 2
    return size if file_size > size else 0


class FileDigests:
    """The digests a manifest entry records for one file being written: its SHA-256 and, when
    ``size_hint`` is large enough (:func:`chunk_size`), the SHA-256 of each chunk.

    The writers (local files, fsspec objects, S3 multipart parts) feed it the bytes they write,
    then call :meth:`entry`; :meth:`close` must run on every path, also when the write fails.
    """

    def __init__(self, size_hint: int) -> None:
        self.chunk = chunk_size(size_hint)
        self.size = 0
        """Bytes fed so far."""
        self._whole = Hasher()
        self._chunks = Hasher(self.chunk) if self.chunk else None

    def pieces(self, parts: Iterable[Buffer], piece_size: int) -> Iterator[memoryview]:
        """Each part cut into views of at most ``piece_size`` bytes (no copy), every one handed
        to the hashing threads before it is yielded, so hashing overlaps the caller's write.
        A piece must stay unchanged until :meth:`close` (the parts are the caller's)."""
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), piece_size):
                piece = view[start : start + piece_size]
                self._whole.hand_off(piece)
                if self._chunks is not None:
                    self._chunks.hand_off(piece)
                self.size += len(piece)
                yield piece

    def consume(self, piece: memoryview) -> None:
        """Hash ``piece`` now, on the calling thread, as the next bytes of the file."""
        self._whole.consume(piece)
        if self._chunks is not None:
            self._chunks.consume(piece)
        self.size += len(piece)

    def close(self) -> None:
        """Wait until every piece handed off is hashed (idempotent)."""
        try:
            self._whole.close()
        finally:
            if self._chunks is not None:
                self._chunks.close()

    def entry(self, name: str) -> FileEntry:
        """The manifest entry of the ``size`` bytes fed so far, named ``name``."""
        self.close()
        chunks = Chunks(self.chunk, tuple(self._chunks.digests())) if self._chunks is not None and self.size else None
        return FileEntry(name=name, size=self.size, sha256=self._whole.digests()[0], chunks=chunks)


def check_digest(source: str, entry: FileEntry, digest: str) -> None:
    """Raise CheckpointCorruptedError unless ``digest`` is the entry's whole-file SHA-256."""
    if digest != entry.sha256:
        what = f"SHA-256 is {digest}, manifest.json says {entry.sha256}"
        raise damaged(source, what, cause="the file is corrupted", fix=LOAD_EARLIER)


def check_chunk_digest(source: str, entry: FileEntry, index: int, span: tuple[int, int, str], found: str) -> None:
    """Raise CheckpointCorruptedError unless ``found`` is chunk ``index``'s expected digest."""
    start, end, expected = span
    if found != expected:
        count = len(entry.chunks.sha256) if entry.chunks is not None else 1
        what = f"SHA-256 of bytes {start} to {end} (chunk {index + 1} of {count}) is {found}, manifest.json says {expected}"
        raise damaged(source, what, cause="the file is corrupted", fix=LOAD_EARLIER)


MISSING_FILE = f"file listed in manifest.json is missing; the checkpoint is incomplete, {LOAD_EARLIER}"
"""Why a file the manifest lists cannot be read (after its name)."""


def wrong_size(source: str, entry: FileEntry, size: int) -> CheckpointCorruptedError:
    """A file whose size is not the one its manifest entry records."""
    what = f"size is {size} bytes, manifest.json says {entry.size}"
    return damaged(source, what, cause="the file is truncated or damaged", fix=LOAD_EARLIER)

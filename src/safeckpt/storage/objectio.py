"""Streamed, hashed, retried transfers of single objects through an fsspec file system.

Uploads write the caller's buffers (tensor memory) in part-sized pieces, so an object-store
file (s3fs ``S3File``) sends each piece as one multipart part as soon as it is full and never
holds more than one part; each piece is hashed while it is sent. Downloads fetch byte ranges in
parallel straight into the buffer the loader keeps, verifying each chunk digest as its range
arrives (or the whole-file digest in order). Transient failures (5xx, throttling, connection
resets: whatever fsspec surfaces as a non-"not found" ``OSError`` after its client's own
retries) are retried with exponential backoff, a bounded number of times
(:data:`REMOTE`); what persists becomes a :class:`~safeckpt.errors.CheckpointWriteError` or
:class:`~safeckpt.errors.CheckpointCorruptedError` naming the object, and a store that cannot be
used at all (no endpoint, no credentials, access denied) a plain
:class:`~safeckpt.errors.CheckpointError` saying what to check (:func:`store_error`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import LOAD_EARLIER, CheckpointCorruptedError, CheckpointError, CheckpointWriteError
from ..format.manifest import FileEntry
from .base import Buffer, ReadArena
from .hashing import (
    MISSING_FILE,
    FileDigests,
    Hasher,
    check_chunk_digest,
    check_digest,
    wrong_size,
)

__all__ = [
    "REMOTE",
    "RemoteTuning",
    "audit_object",
    "checked_size",
    "download_object",
    "fetch_range",
    "retrying",
    "store_error",
    "upload_object",
]

logger = logging.getLogger("safeckpt")
T = TypeVar("T")


@dataclass
class RemoteTuning:
    """Knobs of object-store transfers."""

    part: int = 32 * 1024 * 1024
    """Bytes per multipart part sent, and per range an audit reads (S3 needs >= 5 MiB parts)."""
    fetch: int = 64 * 1024 * 1024
    """Bytes per range a load fetches (without chunk digests; with them, one range per chunk).
    A load holds up to ``transfers`` ranges in flight besides the checkpoint itself."""
    transfers: int = 10
    """Ranges of one object fetched at once; parts of one object, and objects, sent at once."""
    attempts: int = 4
    """Tries of one transfer before its error is raised (the first try included)."""
    backoff_s: float = 0.25
    """Wait before the second try; doubled before each next one (capped at ``max_backoff_s``)."""
    max_backoff_s: float = 8.0
    stale_after_s: float = 24 * 3600.0
    """Age after which an uncommitted ``objects-*`` prefix is deleted by the next save: longer
    than any save takes, so a live writer's objects are never touched, and the time readers of
    an overwritten checkpoint have to finish."""


REMOTE = RemoteTuning()

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, CheckpointError) or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):
        return exc.errno != errno.EINVAL  # s3fs: EINVAL is a failed precondition or a bad request
    module = type(exc).__module__.split(".")[0]
    return module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "http")


def retrying(action: Callable[[], T], *, what: str, can_retry: bool = True) -> T:
    """``action()``, tried again after transient failures with backoff, at most ``REMOTE.attempts`` times."""
    delay = REMOTE.backoff_s
    for attempt in range(1, REMOTE.attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not can_retry or attempt == REMOTE.attempts or not _transient(exc):
                raise
            logger.warning("%s: transient error (%s), try %d of %d in %.2fs", what, exc, attempt + 1, REMOTE.attempts, delay)
        time.sleep(delay)
        delay = min(delay * 2, REMOTE.max_backoff_s)
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def upload_object(fs: Any, url: str, name: str, parts: Iterable[Buffer], size_hint: int) -> FileEntry:
    """Upload ``parts`` as the object ``url``; its manifest entry (size, SHA-256, chunk digests).

    Retried as a whole when ``parts`` can be iterated again; raises CheckpointWriteError naming
    the object when the upload keeps failing (the partial upload is discarded).
    """
    try:
        return retrying(
            lambda: _upload_once(fs, url, name, parts, size_hint), what=url, can_retry=iter(parts) is not parts
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointWriteError(
            f"{url}: upload failed after retries ({_describe(exc)}); no checkpoint was committed and "
            "earlier ones are untouched — check the connection and credentials, then save again"
        ) from exc


def _upload_once(fs: Any, url: str, name: str, parts: Iterable[Buffer], size_hint: int) -> FileEntry:
    if callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None)):
        from .s3parts import upload_parts

        return upload_parts(fs, url, name, parts, size_hint)
    digests = FileDigests(size_hint)
    file = fs.open(url, "wb", block_size=REMOTE.part)
    try:
        for piece in digests.pieces(parts, REMOTE.part):
            file.write(piece)
        file.close()
    except BaseException:
        discard = getattr(file, "discard", None)
        try:
            if callable(discard):
                discard()  # s3fs: abort the multipart upload instead of committing a truncated object
        finally:
            digests.close()
        raise
    return digests.entry(name)


def _size_of(fs: Any, url: str) -> int:
    try:
        info = retrying(lambda: fs.info(url), what=url)
    except FileNotFoundError:
        raise CheckpointCorruptedError(f"{url}: {MISSING_FILE}") from None
    except Exception as exc:
        raise _unreadable(url, exc) from exc
    return int(info.get("size") or 0)


def _unreadable(url: str, exc: BaseException) -> CheckpointError:
    if _setup_problem(exc) is not None:
        return store_error(url, exc)
    return CheckpointCorruptedError(
        f"{url}: could not be read ({_describe(exc)}) after retries; check the connection, or {LOAD_EARLIER}"
    )


_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")


def _setup_problem(exc: BaseException) -> str | None:
    """What to fix when ``exc`` says the store cannot be used at all (None for other failures)."""
    name = type(exc).__name__
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or name == "InvalidAccessKeyId":
        return "access denied: check the credentials and the bucket's permissions"
    if name in _NO_CREDENTIALS:
        return "no credentials: pass key= and secret= in storage_options, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if name in _UNREACHABLE or isinstance(exc, (ConnectionError, TimeoutError)):
        return "cannot reach the object store: check endpoint_url and the network"
    if isinstance(exc, (TypeError, ValueError)):
        return "the storage options are not valid for this file system: check their names and values"
    return None


def store_error(what: str, exc: BaseException, *, error: type[CheckpointError] = CheckpointError) -> CheckpointError:
    """An object-store request that failed (after retries), as a safeckpt error naming ``what``
    and what to fix. Not damage (``CheckpointCorruptedError``): no older checkpoint would load
    either, so a manager must not fall back over it."""
    fix = _setup_problem(exc) or "check the connection, the credentials and the storage options, then try again"
    return error(f"{what}: {fix} ({_describe(exc)})")


def checked_size(fs: Any, url: str, entry: FileEntry) -> None:
    size = _size_of(fs, url)
    if size != entry.size:
        raise wrong_size(url, entry, size)


def fetch_range(fs: Any, url: str, start: int, end: int, into: memoryview) -> None:
    """Bytes ``start`` to ``end`` of ``url`` into ``into`` (retried; short reads are errors)."""

    def once() -> None:
        data = fs.cat_file(url, start=start, end=end)
        if len(data) != end - start:
            raise OSError(errno.EIO, f"got {len(data)} bytes of range {start}-{end}")
        into[:] = data

    try:
        retrying(once, what=url)
    except CheckpointError:
        raise
    except Exception as exc:
        raise _unreadable(url, exc) from exc


def download_object(fs: Any, url: str, entry: FileEntry, *, verify: bool, pool: ThreadPoolExecutor) -> memoryview:
    """The object's bytes in fresh memory (with room to align a safetensors archive's tensors,
    as :func:`safeckpt.storage.posix.read_files` leaves), checked against ``entry``.

    Ranges are fetched on ``pool``; with chunk digests each range is a chunk, verified on
    arrival; otherwise ranges are hashed in order as they arrive. Returns only once verified.
    """
    checked_size(fs, url, entry)
    size = entry.size
    room = 0
    if entry.name.endswith(".safetensors") and size >= 8:
        prefix = bytearray(8)
        fetch_range(fs, url, 0, 8, memoryview(prefix))
        room = ReadArena.room_for_archive(bytes(prefix), size)
    view = ReadArena.allocate(size, room=room)
    if entry.chunks is not None:
        spans = entry.chunks.digest_spans(size)

        def chunk_job(index: int, start: int, end: int, expected: str) -> None:
            fetch_range(fs, url, start, end, view[start:end])
            if verify:
                found = hashlib.sha256(view[start:end]).hexdigest()
                check_chunk_digest(url, entry, index, (start, end, expected), found)

        futures = [pool.submit(chunk_job, i, *span) for i, span in enumerate(spans)]
        for future in futures:
            future.result()
        return view
    ranges = [(start, min(start + REMOTE.fetch, size)) for start in range(0, size, REMOTE.fetch)]
    futures = [pool.submit(fetch_range, fs, url, start, end, view[start:end]) for start, end in ranges]
    sha = hashlib.sha256()
    for (start, end), future in zip(ranges, futures, strict=True):
        future.result()
        if verify:
            sha.update(view[start:end])
    if verify:
        check_digest(url, entry, sha.hexdigest())
    return view


def audit_object(fs: Any, url: str, entry: FileEntry) -> None:
    """Stream the object through one part-sized buffer and check every digest ``entry`` records."""
    checked_size(fs, url, entry)
    sha = hashlib.sha256()
    chunks = Hasher(entry.chunks.size) if entry.chunks is not None else None
    buffer = memoryview(bytearray(REMOTE.part))
    for start in range(0, entry.size, REMOTE.part):
        end = min(start + REMOTE.part, entry.size)
        piece = buffer[: end - start]
        fetch_range(fs, url, start, end, piece)
        sha.update(piece)
        if chunks is not None:
            chunks.consume(piece)
    check_digest(url, entry, sha.hexdigest())
    if chunks is not None and entry.chunks is not None:
        for index, (span, found) in enumerate(zip(entry.chunks.digest_spans(entry.size), chunks.digests(), strict=True)):
            check_chunk_digest(url, entry, index, span, found)

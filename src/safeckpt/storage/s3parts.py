"""Parallel multipart uploads to S3 (s3fs), streamed from the caller's buffers and hashed in order.

s3fs's file objects send one part at a time; this sends up to ``REMOTE.transfers`` parts of one
object at once. Each part is cut from the stream in order (a slice of tensor memory, copied once
into the request body), hashed on the calling thread's hashers, then uploaded on a worker while
the next part is cut, so at most ``transfers + 1`` parts are in memory. A part that fails is
retried on its own (its bytes are kept until it is sent); a failure that persists aborts the
multipart upload, so no object, complete or partial, appears.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..format.manifest import FileEntry
from .base import Buffer
from .hashing import FileDigests
from .objectio import REMOTE, retrying

__all__ = ["upload_parts"]


def _cut(parts: Iterable[Buffer], size: int) -> Iterator[bytes]:
    """The stream re-cut into ``size``-byte pieces (the last shorter), each one copy of its bytes."""
    pending: list[memoryview] = []
    filled = 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            take = min(size - filled, len(view))
            pending.append(view[:take])
            filled += take
            view = view[take:]
            if filled == size:
                yield b"".join(pending)
                pending, filled = [], 0
    if filled or not pending:
        yield b"".join(pending)


def upload_parts(fs: Any, url: str, name: str, parts: Iterable[Buffer], size_hint: int) -> FileEntry:
    """Upload ``parts`` as ``url``: one PUT when it fits in a part, else a parallel multipart upload."""
    bucket, key, _ = fs.split_path(url)
    digests = FileDigests(size_hint)
    pieces = _cut(parts, REMOTE.part)
    first = next(pieces)
    second = next(pieces, None)

    if second is None:
        digests.consume(memoryview(first))
        retrying(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=first), what=url)
        return digests.entry(name)

    upload_id = retrying(lambda: fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key), what=url)["UploadId"]
    room = threading.Semaphore(REMOTE.transfers + 1)
    futures: list[Future[dict[str, Any]]] = []

    def send(number: int, body: bytes) -> dict[str, Any]:
        try:
            out = retrying(
                lambda: fs.call_s3(
                    "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                ),
                what=f"{url} (part {number})",
            )
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            room.release()

    try:
        with ThreadPoolExecutor(REMOTE.transfers, thread_name_prefix="safeckpt-part") as pool:
            for number, piece in enumerate(_chain(first, second, pieces), start=1):
                room.acquire()
                if any(f.done() and f.exception() is not None for f in futures):
                    room.release()
                    break
                digests.consume(memoryview(piece))
                futures.append(pool.submit(send, number, piece))
            done = [f.result() for f in futures]
        retrying(
            lambda: fs.call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            ),
            what=url,
        )
    except BaseException:
        try:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:
            pass
        raise
    fs.invalidate_cache(url)
    return digests.entry(name)


def _chain(first: bytes, second: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield second
    yield from rest

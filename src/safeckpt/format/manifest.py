"""The manifest: the format's table of contents and its commit marker.

``manifest.json`` is written last. It names the format and version, the training step, and
every file of the checkpoint with its size and SHA-256; a large file also carries the SHA-256
of each fixed-size chunk (format 1.1), so a reader can verify one file on every core. Parsing is
strict and lives here alone; serialisation is deterministic (sorted files, fixed key order).
"""

from __future__ import annotations

import datetime
import json
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard, Union

from ..errors import (
    LOAD_EARLIER,
    CheckpointCorruptedError,
    CheckpointUsageError,
    UnsupportedFormatError,
    damaged,
    short,
)
from . import limits

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "Chunks", "FileEntry", "Manifest", "build", "writer_version"]

FORMAT_NAME = "safeckpt"
FORMAT_VERSION = (1, 1)
"""The newest version this library reads and writes (it reads every 1.x)."""
MANIFEST_NAME = "manifest.json"

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]  # noqa: UP007

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_OBJECTS = re.compile(r"objects-[0-9A-Za-z-]{1,64}")


@dataclass(frozen=True)
class Chunks:
    """SHA-256 of each consecutive ``size``-byte piece of a file (the last may be shorter).

    A file's bytes are proven equally by its whole-file digest or by all of these, but the
    chunks can be hashed on as many cores as there are chunks: whole-file SHA-256 cannot be
    split, and it would otherwise bound a load by the time one core takes to hash the largest
    file.
    """

    size: int
    """Bytes per chunk: a power of two from ``limits.MIN_CHUNK_BYTES`` to ``MAX_CHUNK_BYTES``."""
    sha256: tuple[str, ...]
    """Lower-case hex digests, one per chunk, in file order."""

    def digest_spans(self, file_size: int) -> list[tuple[int, int, str]]:
        """``(start, end, digest)`` of each chunk of a file of ``file_size`` bytes."""
        return [
            (start, min(start + self.size, file_size), digest)
            for start, digest in zip(range(0, file_size, self.size), self.sha256, strict=True)
        ]


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, as the manifest records it."""

    name: str
    """File name inside the checkpoint folder (matches ``limits.FILE_NAME_PATTERN``)."""
    size: int
    """Exact size in bytes."""
    sha256: str
    """Lower-case hex SHA-256 of the whole file."""
    chunks: Chunks | None = None
    """Per-chunk digests (format 1.1, large files only), or None."""

    def to_json(self) -> dict[str, JSONValue]:
        doc: dict[str, JSONValue] = {"size": self.size, "sha256": self.sha256}
        if self.chunks is not None:
            doc["chunks"] = {"size": self.chunks.size, "sha256": list(self.chunks.sha256)}
        return doc


def writer_version(files: tuple[FileEntry, ...]) -> tuple[int, int]:
    """The lowest format version whose features ``files`` use: 1.1 with chunk digests, else 1.0."""
    return (1, 1) if any(entry.chunks is not None for entry in files) else (1, 0)


@dataclass(frozen=True)
class Manifest:
    """Parsed ``manifest.json``."""

    step: int
    """Training step the checkpoint was taken at."""
    files: tuple[FileEntry, ...]
    """Every file of the checkpoint except the manifest itself, sorted by name."""
    created: str = ""
    """UTC creation time, ISO 8601 (documented to vary between otherwise identical saves)."""
    producer: dict[str, str] = field(default_factory=dict)
    """Versions of the software that wrote it (``safeckpt``, ``torch``, ``python``)."""
    metadata: dict[str, JSONValue] = field(default_factory=dict)
    """User metadata passed to ``save_checkpoint(metadata=...)``."""
    format_version: tuple[int, int] = (1, 0)
    """(major, minor) of the format the checkpoint was written in (see :func:`writer_version`)."""
    objects: str = ""
    """Object stores only: the sub-prefix (``objects-...``) holding the files of this save; ""
    (never written on a local disk) means the files sit next to the manifest."""

    def file(self, name: str) -> FileEntry | None:
        """The entry named ``name``, or None."""
        for entry in self.files:
            if entry.name == name:
                return entry
        return None

    def to_json_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON encoding."""
        doc: dict[str, JSONValue] = {
            "format": FORMAT_NAME,
            "format_version": f"{self.format_version[0]}.{self.format_version[1]}",
            "step": self.step,
            "created": self.created,
            "producer": dict(sorted(self.producer.items())),
            "metadata": self.metadata,
            "files": {e.name: e.to_json() for e in sorted(self.files, key=lambda e: e.name)},
        }
        if self.objects:
            doc["objects"] = self.objects
        return (json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, source: str) -> Manifest:
        """Parse and validate; ``source`` names the file in error messages."""
        from .documents import load_json

        if len(data) > limits.MAX_MANIFEST_BYTES:
            raise CheckpointCorruptedError(
                f"{source}: manifest is {len(data)} bytes, over the limit of "
                f"{limits.MAX_MANIFEST_BYTES}; this is not a safeckpt manifest"
            )
        doc = load_json(data, source=source, limit=limits.MAX_MANIFEST_BYTES)
        return _parse(doc, source)


def _fail(source: str, what: str) -> CheckpointCorruptedError:
    cause = "the checkpoint is damaged or was not written by safeckpt"
    return damaged(source, f"invalid manifest: {what}", cause=cause, fix=LOAD_EARLIER)


def _parse(doc: object, source: str) -> Manifest:
    if not isinstance(doc, dict):
        raise _fail(source, f"expected a JSON object, found {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{source}: 'format' is {short(doc.get('format'))}, expected {FORMAT_NAME!r}; "
            "this file is not a safeckpt manifest"
        )
    version = doc.get("format_version")
    match = re.fullmatch(r"([0-9]{1,6})\.([0-9]{1,6})", version) if isinstance(version, str) else None
    if match is None:
        raise _fail(source, f"'format_version' is {short(version)}, expected 'MAJOR.MINOR'")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != FORMAT_VERSION[0]:
        raise UnsupportedFormatError(
            f"{source}: format version {major}.{minor} is not supported by this reader "
            f"(it reads {FORMAT_VERSION[0]}.x); upgrade safeckpt to load this checkpoint"
        )
    step = doc.get("step")
    if not _is_int(step) or not 0 <= step <= limits.MAX_STEP:
        raise _fail(source, f"'step' is {short(step)}, expected an integer from 0 to {limits.MAX_STEP}")
    created = doc.get("created", "")
    if not isinstance(created, str):
        raise _fail(source, "'created' must be a string")
    producer = doc.get("producer", {})
    if not isinstance(producer, dict) or not all(isinstance(v, str) for v in producer.values()):
        raise _fail(source, "'producer' must be an object of strings")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(source, "'metadata' must be an object")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise _fail(source, "'files' must be an object mapping file names to entries")
    if len(files) > limits.MAX_FILES:
        raise _fail(source, f"lists {len(files)} files, more than the limit of {limits.MAX_FILES}")
    entries = tuple(_parse_entry(name, e, source) for name, e in sorted(files.items()))
    objects = doc.get("objects", "")
    if not isinstance(objects, str) or (objects and not _OBJECTS.fullmatch(objects)):
        raise _fail(source, f"'objects' is {short(objects)}, expected 'objects-' and 1 to 64 letters, digits or '-'")
    return Manifest(
        step=step,
        files=entries,
        created=created,
        producer={str(k): v for k, v in producer.items() if isinstance(v, str)},
        metadata=metadata,
        format_version=(major, minor),
        objects=objects,
    )


def _parse_entry(name: str, entry: JSONValue, source: str) -> FileEntry:
    check_file_name(name, source=source)
    if not isinstance(entry, dict):
        raise _fail(source, f"entry for {name!r} must be an object")
    size, digest = entry.get("size"), entry.get("sha256")
    if not _is_int(size) or not 0 <= size < 2**63:
        raise _fail(source, f"'size' of {name!r} is {short(size)}, expected a non-negative 64-bit integer")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise _fail(source, f"'sha256' of {name!r} must be 64 lower-case hex digits")
    chunks = _parse_chunks(name, size, entry["chunks"], source) if "chunks" in entry else None
    return FileEntry(name, size, digest, chunks)


def _parse_chunks(name: str, file_size: int, chunks: JSONValue, source: str) -> Chunks:
    if not isinstance(chunks, dict):
        raise _fail(source, f"'chunks' of {name!r} must be an object with 'size' and 'sha256'")
    size, digests = chunks.get("size"), chunks.get("sha256")
    if not (
        _is_int(size)
        and limits.MIN_CHUNK_BYTES <= size <= limits.MAX_CHUNK_BYTES
        and size & (size - 1) == 0
    ):
        raise _fail(
            source,
            f"'chunks.size' of {name!r} is {short(size)}, expected a power of two from "
            f"{limits.MIN_CHUNK_BYTES} to {limits.MAX_CHUNK_BYTES}",
        )
    if file_size == 0:
        raise _fail(source, f"{name!r} is empty and so cannot have 'chunks'")
    count = -(-file_size // size)
    if not isinstance(digests, list) or len(digests) != count:
        raise _fail(
            source,
            f"'chunks.sha256' of {name!r} must list {count} digest{'s' if count > 1 else ''} "
            f"(one per {size} bytes of a {file_size}-byte file)",
        )
    if not all(isinstance(d, str) and _SHA256_HEX.fullmatch(d) for d in digests):
        raise _fail(source, f"'chunks.sha256' of {name!r} must hold 64 lower-case hex digits each")
    return Chunks(size, tuple(digests))  # type: ignore[arg-type]


def check_file_name(name: str, *, source: str) -> None:
    """Reject any name that could escape the checkpoint folder or is not one we write."""
    if (
        not isinstance(name, str)
        or len(name) > limits.MAX_FILE_NAME_LENGTH
        or not limits.FILE_NAME_PATTERN.fullmatch(name)
        or name == MANIFEST_NAME
    ):
        raise _fail(
            source,
            f"file name {short(name)} is not allowed (names must match "
            f"{limits.FILE_NAME_PATTERN.pattern}: no paths, no '..', no leading dot)",
        )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def build(
    step: int,
    files: Iterable[FileEntry],
    *,
    metadata: Mapping[str, JSONValue] | None = None,
    producer: Mapping[str, str] | None = None,
) -> Manifest:
    """The manifest of a checkpoint whose files are ``files`` (their entries as the writers
    returned them, from one process or merged from several ranks), stamped with the time and the
    producing versions. The format version is the lowest that holds every entry (1.1 only when
    some file has chunk digests), so older readers keep reading what they can.

    Example:
        >>> manifest = build(100, entries, metadata={"run": "a"})  # doctest: +SKIP
        >>> pending.commit(manifest)  # doctest: +SKIP
    """
    from .._version import __version__

    entries = tuple(sorted(files, key=lambda e: e.name))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise CheckpointUsageError(f"manifest.build: duplicate file names in {names}; each rank must write distinct files")
    return Manifest(
        step=step,
        files=entries,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        producer={"safeckpt": __version__, "python": platform.python_version(), **(producer or {})},
        metadata=dict(metadata or {}),
        format_version=writer_version(entries),
    )

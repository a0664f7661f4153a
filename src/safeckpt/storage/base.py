"""The storage seam: what the save and load pipelines need from wherever checkpoints live.

Everything above this package (the torch adapter, the numpy reader, the manager, the CLI) talks
to storage only through these protocols; :mod:`safeckpt.storage.local` is the first
implementation (POSIX files, see :mod:`safeckpt.storage.posix_commit` for its commit protocol);
:mod:`safeckpt.storage.objectstore` is the second (any fsspec URL, a *manifest-last* commit).
:func:`safeckpt.storage.locate.storage_for` picks one from the location.

Call sequence of a save (one process, or a coordinator and several ranks)::

    storage = LocalStorage(root)                          # a root of checkpoints
    with storage.begin(step, name=None) as pending:       # hidden, uniquely named staging area
        entries = pending.write_files(files)              # each file streamed, hashed, durable
        #  ... other processes (the ranks of a sharded save) write their own files into the same
        #  staging area: storage.join(pending.staging).write_files(theirs), and report their
        #  FileEntry digests to the coordinator, which alone commits ...
        manifest = safeckpt.format.manifest.build(step, all_entries, metadata=...)
        final = pending.commit(manifest, overwrite=False)  # manifest written LAST, then published
    # leaving the block without commit() discards the staging area; nothing else is touched

Call sequence of a load::

    folder = storage.open(location)                       # CheckpointNotFoundError if absent
    with folder:
        manifest = folder.read_manifest()                 # bounded, strictly parsed
        buffers = folder.read_files(manifest.files, verify=True)  # size + digests, all or nothing
        # or folder.audit(manifest.files): every digest, in bounded memory, nothing kept
        # or ranges = folder.open_verified(entries): verified now, read in parts later
        #    (ranges.read_into(name, offset, memory) ...; ranges.close()), see VerifiedRanges

Contract every implementation keeps:

* A checkpoint is visible to readers only once its ``manifest.json`` is complete: the manifest
  is the commit marker. ``commit`` writes it after every other file is durable.
* ``commit`` never replaces an existing checkpoint unless ``overwrite`` is True
  (:class:`~safeckpt.errors.CheckpointExistsError` otherwise); with ``overwrite`` readers see the
  old checkpoint or the new one, never a mixture. POSIX: ``renameat2`` NOREPLACE / EXCHANGE of a
  temporary folder. An object store (no rename, :mod:`.objectstore`): files go under a prefix
  unique to the save, then the manifest naming it with a create-only conditional PUT
  (``If-None-Match: *``); an overwrite replaces the manifest in one PUT and leaves the old
  prefix for readers until it is stale.
* A failed save raises :class:`~safeckpt.errors.CheckpointWriteError` and leaves earlier
  checkpoints untouched; its leftovers are invisible to readers and cleaned by a later save.
* ``read_files`` returns only once every file verified; no parser sees unverified bytes. With
  ``verify=True`` each buffer is a view of the start of a :class:`ReadArena` (fresh writable
  memory); a safetensors archive's arena has spare room after the file, which a reader may use to
  align tensors in place (:meth:`ReadArena.spare_room`).
* ``list_checkpoints`` returns committed checkpoints only (those with a manifest), oldest first.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Union

from ..errors import CheckpointUsageError
from ..format import limits
from ..format.manifest import FileEntry, Manifest

__all__ = [
    "Buffer",
    "CheckpointFolder",
    "CheckpointStorage",
    "FileSource",
    "Location",
    "ObjectPath",
    "PendingWrite",
    "ReadArena",
    "StagingArea",
    "VerifiedBuffers",
    "VerifiedRanges",
    "staging_parts",
]

Buffer = bytes | bytearray | memoryview
FileSource = tuple[str, Iterable[Buffer], int]
"""A file to write: its name, its bytes as a sequence of buffers, and its size if known (0 if not).

An implementation that may retry an upload iterates the buffers again when ``iter()`` of them
returns a fresh iterator (a list, or an object whose ``__iter__`` restarts); a one-shot
generator is written once."""


@dataclass(frozen=True)
class ObjectPath:
    """A location in an fsspec file system (``s3://bucket/run/step-00000100``): the
    object-store counterpart of :class:`~pathlib.Path`, with just what the pipelines use."""

    protocol: str
    """fsspec protocol (``s3``, ``memory``, ``gs``, ...)."""
    path: str
    """The path after ``protocol://``, without a trailing slash."""

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.protocol, f"{self.path}/{name}" if self.path else name)

    @property
    def name(self) -> str:
        """The last segment (``step-00000100``)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        """The location one segment up."""
        return ObjectPath(self.protocol, self.path.rsplit("/", 1)[0] if "/" in self.path else "")


Location = Union[Path, ObjectPath]  # noqa: UP007
"""Where a checkpoint or a root of checkpoints is: a local path or an object-store location."""


class ReadArena(mmap.mmap):
    """Memory a verified file is read into: anonymous, private, page-aligned and writable.

    Readers get a ``memoryview`` of the file's bytes at the start of an arena; for a safetensors
    archive the arena is longer than the file by :meth:`room_for_archive` bytes, so that the
    torch adapter can move tensors to ``limits.ALIGN``-byte aligned addresses in place rather
    than copy them. Every other buffer (``bytes``, a file map with ``verify=False``) has no room.
    """

    @classmethod
    def allocate(cls, size: int, *, room: int = 0) -> memoryview:
        """A view of ``size`` fresh bytes followed by ``room`` spare ones (0 for all but archives)."""
        # Private: a shared anonymous map is shmem, whose page faults cost half again as much. Not
        # huge pages (MADV_HUGEPAGE): filling them was five times faster when the kernel reused
        # freed ones, but two to three times slower in a new process on a VM whose free huge
        # blocks go back to the host (measured with benchmarks/compare_formats.py). Not
        # MAP_POPULATE: zeroing the pages costs the same whether faulted in now or as they fill.
        return memoryview(cls(-1, max(size + room, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))[:size]

    @staticmethod
    def room_for_archive(prefix: bytes, size: int) -> int:
        """Room to align every tensor of a safetensors archive of ``size`` bytes to ``limits.ALIGN``.

        Each tensor entry of a valid header takes well over 40 bytes of JSON, so the header length
        (``prefix``, the file's first 8 bytes, not trusted: the room is capped by the file size
        and the header limit, and only reserves address space until a verified archive is
        aligned) bounds the number of tensors, and each needs at most ``limits.ALIGN`` bytes to move.
        """
        if len(prefix) < 8:
            return 0
        (length,) = struct.unpack_from("<Q", prefix)
        return limits.ALIGN * (min(length, size, limits.MAX_SAFETENSORS_HEADER_BYTES) // 40 + 2)

    @staticmethod
    def spare_room(buffer: memoryview) -> int:
        """Bytes after ``buffer`` that its owner may overwrite: 0 unless ``buffer`` is a writable
        view of the start of an arena (so offsets into ``buffer.obj`` are offsets into ``buffer``)."""
        owner = buffer.obj
        if not isinstance(owner, ReadArena) or not buffer.contiguous or buffer.readonly or not len(buffer):
            return 0
        import ctypes  # only the torch adapter asks, and it has ctypes loaded already

        if ctypes.addressof(ctypes.c_char.from_buffer(buffer)) != ctypes.addressof(ctypes.c_char.from_buffer(owner)):
            return 0  # a slice further in: offsets into the owner are not offsets into the buffer
        return len(owner) - len(buffer)


class PendingWrite(Protocol):
    """One checkpoint being written (a context manager; leaving it uncommitted discards it)."""

    @property
    def step(self) -> int:
        """The training step being saved."""
        ...

    @property
    def final(self) -> Location:
        """Where the checkpoint appears once committed."""
        ...

    @property
    def staging(self) -> str:
        """Where this save's files go, relative to the storage's root (``.tmp-step-...``,
        ``step-.../objects-...``): what another process passes to
        :meth:`CheckpointStorage.join` to write files into this save."""
        ...

    def __enter__(self) -> PendingWrite: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Write, hash and make durable every file (in parallel); their manifest entries."""
        ...

    def commit(self, manifest: Manifest, *, overwrite: bool = False) -> Location:
        """Write ``manifest`` last and publish the checkpoint atomically; returns :attr:`final`."""
        ...


class StagingArea(Protocol):
    """The staging area of a save that another process began (and alone commits or discards):
    a rank of a sharded save writes its own files here."""

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Write, hash and make durable every file (in parallel); their manifest entries, for
        the process that commits."""
        ...


def staging_parts(staging: str) -> list[str]:
    """The segments of a :attr:`PendingWrite.staging` name, refusing one that could leave the
    root (absolute, empty, ``.`` or ``..`` segments)."""
    parts = staging.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CheckpointUsageError(
            f"{staging!r}: not the staging name of a save in this root of checkpoints; pass the "
            "PendingWrite.staging of the process that began the save"
        )
    return parts


class CheckpointFolder(Protocol):
    """One committed checkpoint, open for reading (a context manager)."""

    def __enter__(self) -> CheckpointFolder: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def read_manifest(self) -> Manifest:
        """The strictly parsed manifest (bounded in size); CheckpointNotFoundError if missing."""
        ...

    def read_files(self, entries: Sequence[FileEntry], *, verify: bool = True) -> dict[str, memoryview]:
        """Every file's bytes, checked against its entry (size always; digests with ``verify``)."""
        ...

    def audit(self, entries: Iterable[FileEntry]) -> None:
        """Check every file's size and every digest in bounded memory; keeps nothing."""
        ...

    def open_verified(self, entries: Sequence[FileEntry], *, verify: bool = True) -> VerifiedRanges:
        """The files, checked against their entries now (as :meth:`read_files`), to be read in
        byte ranges later: into the memory they end up in, without holding whole files."""
        ...


class VerifiedRanges(Protocol):
    """Files verified by :meth:`CheckpointFolder.open_verified`, read in parts afterwards."""

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of file ``name`` from ``offset`` on."""
        ...

    def close(self) -> None:
        """Release the files; CheckpointCorruptedError if one changed since it was verified."""
        ...


class VerifiedBuffers:
    """:class:`VerifiedRanges` over files :meth:`CheckpointFolder.read_files` already holds in
    memory: for storage where a second read would mean a second download."""

    def __init__(self, buffers: dict[str, memoryview]) -> None:
        self._buffers = buffers

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        view[:] = self._buffers[name][offset : offset + len(view)]

    def close(self) -> None:
        self._buffers = {}


class CheckpointStorage(Protocol):
    """A root of checkpoints (``step-N`` folders, or named ones with ``begin(name=...)``)."""

    def begin(self, step: int, *, name: str | None = None) -> PendingWrite:
        """Start writing the checkpoint of ``step`` (as ``name`` instead of ``step-N``)."""
        ...

    def join(self, staging: str) -> StagingArea:
        """Write files into the staging area of a save begun elsewhere (its
        :attr:`PendingWrite.staging`, as the process that began it sent it); that process
        commits them or discards them."""
        ...

    def open(self, location: Location) -> CheckpointFolder:
        """Open a committed checkpoint for reading."""
        ...

    def locate(self, location: Location) -> Location:
        """Resolve what a user passed (a checkpoint, its manifest, or a root: its newest)."""
        ...

    def list_checkpoints(self) -> list[tuple[int, Location]]:
        """Committed checkpoints, oldest step first."""
        ...

    def scan_steps(self) -> list[tuple[int, Location, bool]]:
        """Every ``step-N`` checkpoint of the root, committed or not: ``(step, location, committed)``."""
        ...

    def exists(self, location: Location) -> bool:
        """Whether anything (committed or not) is at ``location``."""
        ...

    def committed(self, location: Location) -> bool:
        """Whether ``location`` holds a committed checkpoint (its manifest is present)."""
        ...

    def remove(self, location: Location) -> None:
        """Delete a committed checkpoint so that no half-deleted one is ever visible."""
        ...

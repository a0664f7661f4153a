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
* ``read_files`` returns only once every file verified; no parser sees unverified bytes.
* ``list_checkpoints`` returns committed checkpoints only (those with a manifest), oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Union

from ..errors import CheckpointUsageError
from ..format.manifest import FileEntry, Manifest

__all__ = [
    "Buffer",
    "CheckpointFolder",
    "CheckpointStorage",
    "FileSource",
    "Location",
    "ObjectPath",
    "PendingWrite",
    "StagingArea",
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

"""The storage seam: what the save and load pipelines need from wherever checkpoints live.

Everything above this package (the torch adapter, the numpy reader, the manager, the CLI) talks
to storage only through these protocols; :mod:`safeckpt.storage.local` is the first
implementation (POSIX files, see :mod:`safeckpt.storage.posix_commit` for its commit protocol).
An object store implements the same protocols with a *manifest-last* commit.

Call sequence of a save (one process, or a coordinator and several ranks)::

    storage = LocalStorage(root)                          # a root of checkpoints
    with storage.begin(step, name=None) as pending:       # hidden, uniquely named staging area
        entries = pending.write_files(files)              # each file streamed, hashed, durable
        #  ... ranks may write their own files into the same staging area (pending.location)
        #  and report their FileEntry digests to the coordinator ...
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
  temporary folder. An object store (no rename): files go to their final keys, then the manifest
  with a create-only conditional PUT (``If-None-Match: *``); an overwrite removes the old
  manifest's files only after the new manifest is in place.
* A failed save raises :class:`~safeckpt.errors.CheckpointWriteError` and leaves earlier
  checkpoints untouched; its leftovers are invisible to readers and cleaned by a later save.
* ``read_files`` returns only once every file verified; no parser sees unverified bytes.
* ``list_checkpoints`` returns committed checkpoints only (those with a manifest), oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from ..format.manifest import FileEntry, Manifest

__all__ = ["Buffer", "CheckpointFolder", "CheckpointStorage", "FileSource", "PendingWrite"]

Buffer = bytes | bytearray | memoryview
FileSource = tuple[str, Iterable[Buffer], int]
"""A file to write: its name, its bytes as a sequence of buffers, and its size if known (0 if not)."""


class PendingWrite(Protocol):
    """One checkpoint being written (a context manager; leaving it uncommitted discards it)."""

    step: int
    final: Path
    """Where the checkpoint appears once committed."""

    def __enter__(self) -> PendingWrite: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Write, hash and make durable every file (in parallel); their manifest entries."""
        ...

    def commit(self, manifest: Manifest, *, overwrite: bool = False) -> Path:
        """Write ``manifest`` last and publish the checkpoint atomically; returns :attr:`final`."""
        ...


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

    def open(self, location: Path) -> CheckpointFolder:
        """Open a committed checkpoint for reading."""
        ...

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, oldest step first."""
        ...

    def remove(self, location: Path) -> None:
        """Delete a committed checkpoint so that no half-deleted one is ever visible."""
        ...

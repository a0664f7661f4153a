"""Checkpoints on a local (POSIX) file system: the first implementation of :mod:`.base`.

:class:`LocalStorage` is a root folder of checkpoints; saves go through
:class:`~safeckpt.storage.posix_commit.PosixPendingWrite` (temporary folder, ``flock``,
``renameat2``), reads through :class:`LocalFolder`, which holds the checkpoint folder open by
descriptor so every file is opened relative to it (``O_NOFOLLOW``: a file swapped for a symlink
is refused).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from ..errors import CheckpointNotFoundError
from ..format import limits
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from .posix import audit_files, read_bounded, read_files
from .posix_commit import PosixPendingWrite, list_checkpoints, remove_checkpoint

__all__ = ["LocalFolder", "LocalStorage"]


class LocalStorage:
    """A root folder of checkpoints on a local file system (see :mod:`.base` for the contract)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def begin(self, step: int, *, name: str | None = None) -> PosixPendingWrite:
        """A temporary folder for ``step`` that commits to ``root/step-N`` (or ``root/name``)."""
        return PosixPendingWrite(self.root, step, name=name)

    def open(self, location: Path) -> LocalFolder:
        """The checkpoint folder ``location`` (a path, not relative to the root), for reading."""
        return LocalFolder(location)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Committed ``step-N`` folders, oldest first."""
        return list_checkpoints(self.root)

    def remove(self, location: Path) -> None:
        """Delete a committed checkpoint (hidden rename first, then the files)."""
        remove_checkpoint(location)


class LocalFolder:
    """A checkpoint folder open for reading; use as a context manager (holds a descriptor)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd = -1

    def __enter__(self) -> LocalFolder:
        try:
            self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.folder}: checkpoint does not exist; check the path") from None
        except NotADirectoryError:
            raise CheckpointNotFoundError(f"{self.folder}: is not a checkpoint folder") from None
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_manifest(self) -> Manifest:
        """The strictly parsed manifest, read with a size limit."""
        source = str(self.folder / MANIFEST_NAME)
        raw = read_bounded(
            self._fd,
            MANIFEST_NAME,
            limit=limits.MAX_MANIFEST_BYTES,
            source=source,
            missing="missing; the checkpoint was never committed, load an earlier one",
        )
        return Manifest.from_json_bytes(bytes(raw), source=source)

    def read_files(self, entries: Sequence[FileEntry], *, verify: bool = True) -> dict[str, memoryview]:
        """Every file, checked against its entry (see :func:`safeckpt.storage.posix.read_files`)."""
        return read_files(self._fd, entries, folder=self.folder, verify=verify)

    def audit(self, entries: Iterable[FileEntry]) -> None:
        """Every file's size and digests, streamed (see :func:`safeckpt.storage.posix.audit_files`)."""
        audit_files(self._fd, entries, folder=self.folder)

"""Checkpoints on a local (POSIX) file system: the first implementation of :mod:`.base`.

:class:`LocalStorage` is a root folder of checkpoints, listed here by name
(:mod:`safeckpt.format.layout`); saves go through
:class:`~safeckpt.storage.posix_commit.PosixPendingWrite` (temporary folder, ``flock``,
``renameat2``), reads through :class:`LocalFolder`, which holds the checkpoint folder open by
descriptor so every file is opened relative to it (``O_NOFOLLOW``: a file swapped for a symlink
is refused).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import NEVER_COMMITTED, CheckpointExistsError, CheckpointNotFoundError
from ..format import limits
from ..format.layout import TMP_PREFIX, TRASH_PREFIX, parse_step
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from .base import FileSource, Location, staging_parts
from .posix import read_bounded, read_files
from .posix_stream import VerifiedFiles, audit_files

if TYPE_CHECKING:  # the transaction (flock, renameat2) is imported by the calls that write
    from .posix_commit import PosixPendingWrite

__all__ = [
    "LocalFolder",
    "LocalStaging",
    "LocalStorage",
    "describe_file",
    "describe_head",
    "list_checkpoints",
    "refuse_to_replace",
    "scan_steps",
    "subfolders",
]


_ZIP_MAGIC = b"PK\x03\x04"


def refuse_to_replace(target: Location) -> None:
    """Raise :class:`CheckpointExistsError` if the folder a caller named (``save_checkpoint(path=)``,
    ``safeckpt convert``) holds other files and no manifest: ``overwrite=True`` replaces a
    checkpoint (damaged or not), an empty folder, a file or a link, never a folder of someone's
    other files. In an object store an overwrite deletes only its own ``objects-*`` prefixes."""
    if not isinstance(target, Path) or target.is_symlink() or not target.is_dir():
        return
    try:
        if (target / MANIFEST_NAME).exists() or not any(target.iterdir()):
            return
    except OSError:
        return  # the save reports what is wrong with it
    raise CheckpointExistsError(
        f"{target}: is a folder of other files, not a checkpoint (no {MANIFEST_NAME}); a save never "
        "replaces it, even with overwrite=True. Save under another path, or move it away"
    )


def describe_file(path: Path) -> str | None:
    """What a regular file that is not a checkpoint looks like, with what to do; None when
    ``path`` is not a regular file or is a ``manifest.json`` (those are for the readers)."""
    if path.name == MANIFEST_NAME or not path.is_file():
        return None
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror})"
    return describe_head(str(path), head, convert=f"convert it with: safeckpt convert {path} CHECKPOINT_ROOT", hint=_parent_hint(path))


def describe_head(path: str, head: bytes, *, convert: str, hint: str = "") -> str:
    """What the file ``path``, starting with the bytes ``head``, is instead of a checkpoint:
    ``convert`` says how to convert a torch.save file, ``hint`` where its checkpoint may be."""
    if head.startswith(_ZIP_MAGIC):
        return (
            f"{path}: is a torch.save file (a zip archive holding a pickle), not a safeckpt "
            f"checkpoint; {convert}"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{path}: is a pickle file (perhaps a legacy torch.save file), not a safeckpt checkpoint; {convert}"
    if len(head) >= 9 and head[8:9] == b"{":
        return (
            f"{path}: looks like a safetensors file, not a safeckpt checkpoint; a checkpoint is "
            f"the folder holding {MANIFEST_NAME}{hint}"
        )
    return f"{path}: is a file, not a safeckpt checkpoint (a folder holding {MANIFEST_NAME}, or a root of step-* folders)"


def _parent_hint(path: Path) -> str:
    return f" (try {path.parent})" if (path.parent / MANIFEST_NAME).is_file() else ""


def subfolders(root: str | os.PathLike[str]) -> list[str]:
    """Names of the folders directly under ``root``, sorted; symbolic links are left out.
    FileNotFoundError / NotADirectoryError when ``root`` is missing or is a file."""
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))


def scan_steps(root: str | os.PathLike[str]) -> list[tuple[int, Path, bool]]:
    """Every ``step-N`` folder under ``root`` (not symlinks), oldest step first, with whether it
    is committed (holds a manifest); [] when ``root`` does not exist."""
    root = Path(root)
    try:
        names = subfolders(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(step, root / name, (root / name / MANIFEST_NAME).is_file()) for name in names if (step := parse_step(name)) is not None]
    return sorted(found)


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``root`` (folders with a manifest), oldest step first."""
    return [(step, path) for step, path, committed in scan_steps(root) if committed]


class LocalStorage:
    """A root folder of checkpoints on a local file system (see :mod:`.base` for the contract)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def begin(self, step: int, *, name: str | None = None) -> PosixPendingWrite:
        """A temporary folder for ``step`` that commits to ``root/step-N`` (or ``root/name``)."""
        from .posix_commit import PosixPendingWrite

        return PosixPendingWrite(self.root, step, name=name)

    def join(self, staging: str) -> LocalStaging:
        """The temporary folder ``root/staging`` of a save another process began."""
        return LocalStaging(self.root.joinpath(*staging_parts(staging)))

    def open(self, location: Location) -> LocalFolder:
        """The checkpoint folder ``location`` (a path, not relative to the root), for reading."""
        return LocalFolder(Path(str(location)))

    def locate(self, location: Location) -> Path:
        """A checkpoint folder, its ``manifest.json``, or a root of checkpoints (its newest)."""
        path = Path(str(location))
        if path.name == MANIFEST_NAME and path.is_file():
            return path.parent
        if (path / MANIFEST_NAME).exists():
            return path
        if path.is_dir():
            found = list_checkpoints(path)
            if found:
                return found[-1][1]
            if parse_step(path.name) is not None:
                raise CheckpointNotFoundError(f"{path / MANIFEST_NAME}: {NEVER_COMMITTED}")
            raise CheckpointNotFoundError(
                f"{path}: no checkpoint here (no {MANIFEST_NAME} and no committed step-* folders)"
            )
        raise CheckpointNotFoundError(describe_file(path) or f"{path}: checkpoint does not exist; check the path")

    def list_checkpoints(self) -> list[tuple[int, Location]]:
        """Committed ``step-N`` folders, oldest first."""
        return list(list_checkpoints(self.root))

    def scan_steps(self) -> list[tuple[int, Location, bool]]:
        """Every ``step-N`` folder with whether it is committed."""
        return list(scan_steps(self.root))

    def leftovers(self) -> list[tuple[Path, str]]:
        """Folders that saves and removals in progress, or interrupted, left in the root, by name:
        ``(path, "temporary")`` for ``.tmp-*``, ``(path, "trash")`` for ``.trash-*``. A later save
        cleans the dead ones (:mod:`.posix_commit`). FileNotFoundError / NotADirectoryError when
        the root is missing or is a file."""
        return [
            (self.root / name, "temporary" if name.startswith(TMP_PREFIX) else "trash")
            for name in subfolders(self.root)
            if name.startswith((TMP_PREFIX, TRASH_PREFIX))
        ]

    def exists(self, location: Location) -> bool:
        """Whether the folder exists (committed or not)."""
        return Path(str(location)).exists()

    def committed(self, location: Location) -> bool:
        """Whether the folder holds a ``manifest.json``."""
        return (Path(str(location)) / MANIFEST_NAME).is_file()

    def remove(self, location: Location) -> None:
        """Delete a committed checkpoint (hidden rename first, then the files)."""
        from .posix_commit import remove_checkpoint

        remove_checkpoint(Path(str(location)))


class LocalStaging:
    """The temporary folder of a save another process began (and holds locked until it commits
    or discards it): this process writes its own files there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"LocalStaging({str(self.path)!r})"

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Write, hash and fsync every file in the folder (the committing process fsyncs the
        folder itself); their manifest entries."""
        from .posix_commit import write_error, write_into

        try:
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            action = "open the save's temporary folder, which the coordinator created (every rank must see "
            action += "the same root folder: a shared file system for multi-node jobs)"
            raise write_error(exc, self.path, action) from exc
        try:
            return write_into(dir_fd, self.path, files)
        finally:
            os.close(dir_fd)


class LocalFolder:
    """A checkpoint folder open for reading; use as a context manager (holds a descriptor)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd = -1
        self._data_fd = -1
        self._data = self.folder
        self._manifest_read = False
        self._lock = threading.Lock()

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
        for fd in {self._fd, self._data_fd} - {-1}:
            os.close(fd)
        self._fd = self._data_fd = -1

    def read_manifest(self) -> Manifest:
        """The strictly parsed manifest, read with a size limit."""
        source = str(self.folder / MANIFEST_NAME)
        raw = read_bounded(
            self._fd,
            MANIFEST_NAME,
            limit=limits.MAX_MANIFEST_BYTES,
            source=source,
            missing=NEVER_COMMITTED,
        )
        manifest = Manifest.from_json_bytes(bytes(raw), source=source)
        self._manifest_read = True
        if manifest.objects and self._data_fd < 0:  # an object-store checkpoint copied to disk
            self._data = self.folder / manifest.objects
            try:
                self._data_fd = os.open(
                    manifest.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd
                )
            except OSError:
                raise CheckpointNotFoundError(
                    f"{self._data}: missing; manifest.json keeps its files there (an object-store "
                    "checkpoint copied without them), copy the whole checkpoint"
                ) from None
        return manifest

    def _files_fd(self) -> int:
        with self._lock:
            if not self._manifest_read:  # where the files are depends on the manifest ("objects")
                self.read_manifest()
        return self._data_fd if self._data_fd >= 0 else self._fd

    def read_files(self, entries: Sequence[FileEntry], *, verify: bool = True) -> dict[str, memoryview]:
        """Every file, checked against its entry (see :func:`safeckpt.storage.posix.read_files`)."""
        fd = self._files_fd()
        return read_files(fd, entries, folder=self._data, verify=verify)

    def open_verified(self, entries: Sequence[FileEntry], *, verify: bool = True) -> VerifiedFiles:
        """The files verified by streaming, kept open to read parts of (see
        :class:`safeckpt.storage.posix_stream.VerifiedFiles`)."""
        return VerifiedFiles(self._files_fd(), entries, folder=self._data, verify=verify)

    def audit(self, entries: Iterable[FileEntry]) -> None:
        """Every file's size and digests, streamed (see :func:`safeckpt.storage.posix_stream.audit_files`)."""
        fd = self._files_fd()
        audit_files(fd, entries, folder=self._data)

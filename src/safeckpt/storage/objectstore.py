"""Checkpoints in an object store (any fsspec URL: ``s3://``, ``memory://``, ``gs://``...): the
second implementation of :mod:`.base`, with a *manifest-last* commit (spec/FORMAT.md,
"Object stores").

Layout under a root ``R``::

    R/step-00000100/manifest.json                          the commit marker
    R/step-00000100/objects-20261202T031500Z-1a2b3c4d5e6f/model.safetensors, ...   one save's files

A save uploads its files under a fresh ``objects-<UTC start>-<random>`` prefix, then writes
``manifest.json`` (which names that prefix in ``"objects"``) with a create-only conditional
write (``If-None-Match: *``): of two writers of one step exactly one commits; the other's
objects are deleted. ``overwrite=True`` replaces the manifest with one plain PUT (atomic for a
single object), so a reader gets the old manifest, whose objects stay in place, or the new one;
the old prefix is deleted by a later save once older than ``REMOTE.stale_after_s``, as is any
uncommitted prefix. Removal deletes the manifest first.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from ..errors import (
    NEVER_COMMITTED,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    checkpoint_exists,
)
from ..format import limits
from ..format.layout import OBJECTS_PREFIX, objects_name, objects_started, parse_step, step_dirname
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from .base import FileSource, Location, ObjectPath, VerifiedBuffers, staging_parts
from .local import describe_head
from .objectio import (
    REMOTE,
    audit_object,
    checked_size,
    download_object,
    fetch_range,
    retrying,
    store_error,
    upload_object,
)
from .parallel import in_parallel

__all__ = ["ObjectFolder", "ObjectPendingWrite", "ObjectStaging", "ObjectStorage"]

logger = logging.getLogger("safeckpt")
T = TypeVar("T")



def _filesystem(protocol: str, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(
            f"{protocol}:// locations need fsspec (and s3fs for s3://): pip install 'safeckpt[remote]'"
        ) from None
    options = {"use_listings_cache": False, **(storage_options or {})}
    try:
        return fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        raise CheckpointError(f"{protocol}://: no usable fsspec file system ({exc}); pip install 'safeckpt[remote]'") from exc


def _object(location: Location) -> ObjectPath:
    if not isinstance(location, ObjectPath):
        raise CheckpointError(f"{location}: not an object-store location (expected protocol://...)")
    return location


def _ask(action: Callable[[], T], *, what: str, error: type[CheckpointError] = CheckpointError) -> T:
    """``retrying(action)``; a failure other than "not found" becomes a safeckpt error naming
    ``what`` and what to fix (an unreachable endpoint, missing credentials, access denied)."""
    try:
        return retrying(action, what=what)
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:
        raise store_error(what, exc, error=error) from exc


def _children(fs: Any, location: ObjectPath) -> list[str]:
    """Names one level below ``location`` ([] when there is nothing)."""
    try:
        names = _ask(lambda: fs.ls(str(location), detail=False), what=str(location))
    except FileNotFoundError:
        return []
    return sorted({str(n).rstrip("/").rsplit("/", 1)[-1] for n in names})


class ObjectStorage:
    """A root of checkpoints in an fsspec file system (see :mod:`.base` for the contract)."""

    def __init__(self, root: ObjectPath, storage_options: Mapping[str, Any] | None = None, *, fs: Any = None) -> None:
        self.root = root
        self.fs = fs if fs is not None else _filesystem(root.protocol, storage_options)

    def __repr__(self) -> str:
        return f"ObjectStorage({str(self.root)!r})"

    def begin(self, step: int, *, name: str | None = None) -> ObjectPendingWrite:
        """A fresh ``objects-*`` prefix under ``root/step-N`` (or ``root/name``)."""
        return ObjectPendingWrite(self, step, self.root / (name or step_dirname(step)))

    def join(self, staging: str) -> ObjectStaging:
        """The ``objects-*`` prefix ``root/staging`` of a save another process began."""
        return ObjectStaging(self.fs, self.root / "/".join(staging_parts(staging)))

    def open(self, location: Location) -> ObjectFolder:
        return ObjectFolder(self.fs, _object(location))

    def committed(self, location: Location) -> bool:
        url = str(_object(location) / MANIFEST_NAME)
        return bool(_ask(lambda: self.fs.exists(url), what=url))

    def exists(self, location: Location) -> bool:
        return bool(_children(self.fs, _object(location)))

    def scan_steps(self) -> list[tuple[int, Location, bool]]:
        names = _children(self.fs, self.root)
        if not names:
            self._check_bucket()
        found = [(parse_step(name), self.root / name) for name in names]
        return sorted((step, path, self.committed(path)) for step, path in found if step is not None)

    def _check_bucket(self) -> None:
        """Refuse a root whose bucket does not exist, which would otherwise look like a root
        with no checkpoint yet (a typo would restart training from step 0)."""
        call, split = getattr(self.fs, "call_s3", None), getattr(self.fs, "split_path", None)
        if not callable(call) or not callable(split):  # s3fs only: it tells "no such bucket" apart
            return
        bucket = split(self.root.path)[0]
        try:
            retrying(lambda: call("head_bucket", Bucket=bucket), what=f"{self.root.protocol}://{bucket}")
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.root.protocol}://{bucket}: bucket does not exist; check its name and the endpoint, or create it"
            ) from None
        except Exception:  # e.g. no permission to ask about the bucket itself: let the first save tell
            return

    def list_checkpoints(self) -> list[tuple[int, Location]]:
        return [(step, path) for step, path, committed in self.scan_steps() if committed]

    def locate(self, location: Location) -> Location:
        place = _object(location)
        if place.name == MANIFEST_NAME:
            return place.parent
        if self.committed(place):
            return place
        committed = ObjectStorage(place, fs=self.fs).list_checkpoints()  # checks the bucket
        if committed:
            return committed[-1][1]
        if parse_step(place.name) is not None and _children(self.fs, place):
            raise CheckpointNotFoundError(f"{place / MANIFEST_NAME}: {NEVER_COMMITTED}")
        raise CheckpointNotFoundError(
            self._describe_object(place) or f"{place}: no checkpoint here (no {MANIFEST_NAME} and no committed step-* prefixes)"
        )

    def _describe_object(self, place: ObjectPath) -> str | None:
        """What an object that is not a checkpoint is (a torch.save file, ...); None if none is there."""
        url = str(place)
        try:
            head = _ask(lambda: self.fs.cat_file(url, start=0, end=16) if self.fs.isfile(url) else None, what=url)
        except (FileNotFoundError, CheckpointError):
            return None
        if head is None:
            return None
        convert = f"download it and convert it with: safeckpt convert LOCAL_FILE {place.parent}"
        return describe_head(url, head, convert=convert)

    def remove(self, location: Location) -> None:
        """Delete the manifest first (the checkpoint is then uncommitted), then its objects."""
        place = _object(location)
        manifest = str(place / MANIFEST_NAME)
        try:
            _ask(lambda: self.fs.rm_file(manifest), what=manifest, error=CheckpointWriteError)
        except FileNotFoundError:
            pass
        _ask(lambda: self.fs.rm(str(place), recursive=True), what=str(place), error=CheckpointWriteError)

    def uploads(self, *, started_before: datetime.datetime | None = None) -> list[tuple[ObjectPath, datetime.datetime | None]]:
        """Every ``objects-*`` prefix no manifest names, with the start time its name records: a
        running save's, an interrupted or losing save's, or an overwritten checkpoint's (the
        object store's leftovers; a step whose manifest cannot be read is left out). With
        ``started_before``, only those whose recorded start is earlier."""
        found = []
        for step_name in _children(self.fs, self.root):
            place = self.root / step_name
            names = _children(self.fs, place)
            unnamed = [
                n for n in names
                if n.startswith(OBJECTS_PREFIX)
                and (started_before is None or ((started := objects_started(n)) is not None and started < started_before))
            ]  # fmt: skip
            if unnamed and MANIFEST_NAME in names:
                try:
                    with self.open(place) as folder:
                        unnamed = [n for n in unnamed if n != folder.read_manifest().objects]
                except CheckpointError:
                    continue  # an unreadable manifest: leave its objects for a person to look at
            found += [(place / name, objects_started(name)) for name in unnamed]
        return found

    def clean_stale(self, now: datetime.datetime | None = None) -> None:
        """Delete ``objects-*`` prefixes older than ``REMOTE.stale_after_s`` that no manifest names."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        for place, _ in self.uploads(started_before=now - datetime.timedelta(seconds=REMOTE.stale_after_s)):
            _ask(lambda: self.fs.rm(str(place), recursive=True), what=str(place), error=CheckpointWriteError)


class ObjectPendingWrite:
    """One checkpoint being uploaded (see the module docstring for the protocol)."""

    def __init__(self, storage: ObjectStorage, step: int, final: ObjectPath) -> None:
        self.storage, self.step, self.final = storage, step, final
        self.prefix = objects_name(datetime.datetime.now(datetime.timezone.utc), secrets.token_hex(6))
        self.location = final / self.prefix
        self._committed = False

    def __repr__(self) -> str:
        return f"ObjectPendingWrite({str(self.location)!r})"

    def __enter__(self) -> ObjectPendingWrite:
        try:
            self.storage.clean_stale()
        except Exception as exc:  # tidying must not fail a save
            logger.warning("%s: could not clean stale uploads: %s", self.storage.root, exc)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        try:
            self.storage.fs.rm(str(self.location), recursive=True)
        except Exception:
            pass

    @property
    def staging(self) -> str:
        """This save's prefix relative to the root (``step-N/objects-...``)."""
        return f"{self.final.name}/{self.prefix}"

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Upload every file under this save's prefix, several at once; their manifest entries."""
        return ObjectStaging(self.storage.fs, self.location).write_files(files)

    def commit(self, manifest: Manifest, *, overwrite: bool = False) -> ObjectPath:
        """Write the manifest (naming this save's prefix): create-only unless ``overwrite``."""
        data = dataclasses.replace(manifest, objects=self.prefix).to_json_bytes()
        url = str(self.final / MANIFEST_NAME)
        mode = "overwrite" if overwrite else "create"
        try:
            retrying(lambda: self.storage.fs.pipe_file(url, data, mode=mode), what=url)
        except FileExistsError:
            raise checkpoint_exists(self.final, self.step) from None
        except Exception as exc:
            raise CheckpointWriteError(
                f"{url}: writing the manifest failed ({type(exc).__name__}: {exc}); the checkpoint "
                "is not committed and earlier ones are untouched — save again"
            ) from exc
        self._committed = True
        return self.final


class ObjectStaging:
    """The ``objects-*`` prefix of a save (begun here or by another process, which commits it)."""

    def __init__(self, fs: Any, location: ObjectPath) -> None:
        self.fs, self.location = fs, location

    def __repr__(self) -> str:
        return f"ObjectStaging({str(self.location)!r})"

    def write_files(self, files: Sequence[FileSource]) -> list[FileEntry]:
        """Upload every file under the prefix, several at once; their manifest entries."""
        jobs = [
            (lambda f=file: upload_object(self.fs, str(self.location / f[0]), f[0], f[1], f[2])) for file in files
        ]
        return in_parallel(jobs, REMOTE.transfers, name="safeckpt-upload")


class ObjectFolder:
    """One committed checkpoint in an object store, open for reading."""

    def __init__(self, fs: Any, location: ObjectPath) -> None:
        self.fs, self.location = fs, location
        self._objects: ObjectPath | None = None
        self._lock = threading.Lock()
        """Where the files are: known once the manifest is read (its ``objects`` prefix)."""

    def __enter__(self) -> ObjectFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def read_manifest(self) -> Manifest:
        url = str(self.location / MANIFEST_NAME)
        try:
            raw = retrying(lambda: self.fs.cat_file(url, start=0, end=limits.MAX_MANIFEST_BYTES + 1), what=url)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{url}: {NEVER_COMMITTED}") from None
        except CheckpointError:
            raise
        except Exception as exc:
            raise store_error(url, exc) from exc
        manifest = Manifest.from_json_bytes(bytes(raw), source=url)
        self._objects = self.location / manifest.objects if manifest.objects else self.location
        return manifest

    def _files_at(self) -> ObjectPath:
        with self._lock:
            if self._objects is None:  # a caller that read the manifest elsewhere: read it here too
                self.read_manifest()
        assert self._objects is not None
        return self._objects

    def read_files(self, entries: Sequence[FileEntry], *, verify: bool = True) -> dict[str, memoryview]:
        objects = self._files_at()
        ordered = sorted(entries, key=lambda e: -e.size)
        with ThreadPoolExecutor(REMOTE.transfers, thread_name_prefix="safeckpt-download") as pool:
            return {
                e.name: download_object(self.fs, str(objects / e.name), e, verify=verify, pool=pool)
                for e in ordered
            }

    def open_verified(self, entries: Sequence[FileEntry], *, verify: bool = True) -> VerifiedBuffers:
        return VerifiedBuffers(self.read_files(entries, verify=verify))  # (one download, kept)

    def read_range(self, entry: FileEntry, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of ``entry``'s object, its size checked but not its digests:
        for listing an archive's header without downloading its tensors (``safeckpt inspect``)."""
        url = str(self._files_at() / entry.name)
        checked_size(self.fs, url, entry)
        if end <= start:
            return b""
        piece = bytearray(end - start)
        fetch_range(self.fs, url, start, end, memoryview(piece))
        return bytes(piece)

    def audit(self, entries: Iterable[FileEntry]) -> None:
        objects = self._files_at()
        jobs = [(lambda e=e: audit_object(self.fs, str(objects / e.name), e)) for e in entries]
        in_parallel(jobs, REMOTE.transfers, name="safeckpt-verify")

"""``Reader``: a DCP ``StorageReader`` that verifies what each rank reads before DCP copies it.

It reads through the storage seam (:mod:`safeckpt.storage.base`), so the checkpoint may be in a
local or shared folder or behind any fsspec URL (``s3://bucket/run``).

The order of DCP's calls, and what each does here:

1. every rank, ``read_metadata``: reads ``manifest.json``, then reads and checks the SHA-256 of
   ``sharding.json`` and parses it strictly (:mod:`.sharding`) into DCP's ``Metadata``.
2. every rank, ``prepare_local_plan``: refuses plans not made by :class:`~.planner.LoadPlanner`
   (DCP's own planners ``torch.load`` non-tensor values), then checks the size and SHA-256 (or
   every chunk digest) of every shard file this rank's plan touches, after checking that
   ``manifest.json`` is still the one step 1 read. Local files are streamed through small
   buffers and kept open (``CheckpointFolder.open_verified``); an object store's are downloaded
   and kept in memory. It parses the safetensors headers and msgpack documents. DCP runs this
   step on all ranks and collects failures before any rank goes on, so a damaged file makes
   every rank raise before any of them copies a byte into a parameter.
3. every rank, ``read_data``: reads each requested box of a stored chunk straight into the
   planner's destination when both are contiguous (otherwise through one reused buffer, reading
   only the box's own bytes when it is sparse in the file), decodes values with the tree
   decoder, then closes the files, refusing any that was modified since it was verified.

With ``keep_open`` set, a completed ``read_data`` keeps its verified files for the next load
through the same ``Reader``, which reads them without hashing them again (a load in two passes,
as :func:`safeckpt.distributed.api.load_checkpoint` does, hashes each file once); the load after
``keep_open`` is cleared closes them all, checked.

A resharded load (different world size, uneven shards) therefore verifies every file it reads
from, completely, even if it needs only part of it; no rank holds a whole shard file in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.distributed.checkpoint.planner import LoadPlanner as DCPLoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CheckpointCorruptedError
from ._core import (
    MANIFEST_NAME,
    TORCH_DTYPES,
    CheckpointFolder,
    FileEntry,
    Manifest,
    StorageLocation,
    TensorInfo,
    VerifiedRanges,
    as_location,
    header_end,
    is_sharded,
    load_msgpack,
    locate_checkpoint,
    parse_header,
    storage_for,
)
from .boxes import Staging, read_box
from .planner import PLANNER_MARK, LoadPlanner, decode_value
from .sharding import SHARDING_NAME, Location, Sharding, parse_sharding
from .writer import UsageError

__all__ = ["Reader", "is_sharded", "read_sharding"]


def dcp_metadata(sharding: Sharding) -> tuple[Metadata, dict[MetadataIndex, Location]]:
    """DCP's ``Metadata`` for a parsed ``sharding.json``, and where each chunk or value lives."""
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    where: dict[MetadataIndex, Location] = {}
    for fqn, entry in sharding.tensors.items():
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in entry.chunks]
        properties = TensorProperties(dtype=TORCH_DTYPES[entry.dtype])
        state[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(entry.shape), chunks=chunks)
        where.update((MetadataIndex(fqn, c.offsets), c.location) for c in entry.chunks)
    for fqn, location in sharding.values.items():
        state[fqn] = BytesStorageMetadata()
        where[MetadataIndex(fqn)] = location
    metadata = Metadata(state_dict_metadata=state, planner_data=dict(sharding.paths), storage_data=where)
    return metadata, where


def read_sharding(
    folder: StorageLocation, *, storage_options: Mapping[str, Any] | None = None
) -> tuple[Manifest, Sharding]:
    """Parse ``manifest.json``, verify and parse ``sharding.json`` (nothing else is read)."""
    with storage_for(folder, storage_options).open(folder) as opened:
        manifest = opened.read_manifest()
        entry = manifest.file(SHARDING_NAME)
        if entry is None:
            raise UsageError(
                f"{folder}: is a single-process checkpoint (no {SHARDING_NAME}); load it with "
                "safeckpt.load_checkpoint, which also loads it into sharded models"
            )
        data = opened.read_files([entry], verify=True)[SHARDING_NAME]
    files = {e.name: e for e in manifest.files}
    return manifest, parse_sharding(data, files=files, source=str(folder / SHARDING_NAME))


class Reader(StorageReader):
    """Read a sharded safeckpt checkpoint through ``torch.distributed.checkpoint``, verified.

    Args:
        path: a checkpoint folder, its ``manifest.json``, or a root of checkpoints (the newest
            committed one), the same on every rank; or an fsspec URL (``s3://bucket/run``).
        verify: check the SHA-256 of every file read (sizes and headers are always checked).
        storage_options: options of the fsspec file system of a URL ``path`` (e.g.
            ``{"endpoint_url": ...}`` for s3fs).

    Example:
        >>> dcp.load(state, storage_reader=sd.Reader("ckpts"), planner=sd.LoadPlanner())  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | StorageLocation,
        *,
        verify: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = as_location(path)
        self.verify = verify
        self.storage_options = dict(storage_options) if storage_options else None
        self.folder: StorageLocation | None = None
        self.manifest: Manifest | None = None
        self.sharding: Sharding | None = None
        self.metadata: Metadata | None = None
        self._where: dict[MetadataIndex, Location] = {}
        self.rank = 0
        self.keep_open = False
        self._kept = False
        self._files: _OpenFiles | None = None
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._values: dict[str, dict[str, object]] = {}

    def __repr__(self) -> str:
        return f"Reader(path={str(self.folder or self.path)!r}, verify={self.verify})"

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and as_location(checkpoint_id) != self.path:
            self.path = as_location(checkpoint_id)
            self.folder = self.manifest = self.sharding = self.metadata = None
        self.close()

    def close(self) -> None:
        """Forget the files of the last plan, closing them unchecked: those a load left open
        because it failed between DCP's planning and its reads (another rank's error); a load
        that completes closes them itself, checked."""
        files, self._files = self._files, None
        self._headers, self._values, self._kept = {}, {}, False
        if files is not None:
            with contextlib.suppress(CheckpointCorruptedError):
                files.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_reader=Reader(...) explicitly

    def read_metadata(self) -> Metadata:
        if self.metadata is None:
            folder = locate_checkpoint(self.path, storage_options=self.storage_options)
            self.manifest, self.sharding = read_sharding(folder, storage_options=self.storage_options)
            self.metadata, self._where = dcp_metadata(self.sharding)
            self.folder = folder
        return self.metadata

    def read_files(self, entries: Sequence[FileEntry]) -> dict[str, memoryview]:
        """Files of the checkpoint :meth:`read_metadata` found, each checked against its entry
        (size always, digests with ``verify``); refuses if ``manifest.json`` changed meanwhile
        (the checkpoint was overwritten), so one load never mixes two saves."""
        with self._same_checkpoint() as opened:
            return opened.read_files(entries, verify=self.verify)

    def open_files(self, entries: Sequence[FileEntry]) -> VerifiedRanges:
        """As :meth:`read_files`, but the verified files are kept for reading in parts."""
        with self._same_checkpoint() as opened:
            return opened.open_verified(entries, verify=self.verify)

    @contextlib.contextmanager
    def _same_checkpoint(self) -> Iterator[CheckpointFolder]:
        """The checkpoint :meth:`read_metadata` found, open, its manifest checked unchanged."""
        folder, manifest = self.folder, self.manifest
        if folder is None or manifest is None:
            raise UsageError("safeckpt.distributed.Reader: files requested before read_metadata")
        with storage_for(folder, self.storage_options).open(folder) as opened:
            if opened.read_manifest() != manifest:
                raise CheckpointCorruptedError(
                    f"{folder / MANIFEST_NAME}: changed while the checkpoint was being loaded (it was "
                    "overwritten by another save); load again"
                )
            yield opened

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if plan.storage_data != PLANNER_MARK:
            raise UsageError(
                "safeckpt.distributed.Reader needs planner=safeckpt.distributed.LoadPlanner(): "
                "DCP's own load planners (the default one, _load_state_dict_from_keys) hand "
                "non-tensor values to torch.load, which runs pickle"
            )
        if not self._kept:  # files of a load that failed after this step, unread
            self.close()
        self._kept = False
        if not plan.items:
            return plan
        assert self.folder is not None and self.manifest is not None and self.sharding is not None
        locations = self._where
        needed: dict[str, FileEntry] = {}
        for item in plan.items:
            name = locations[item.storage_index].file
            entry = self.manifest.file(name)
            if entry is None:  # parse_sharding checked this; a changed manifest object would land here
                raise CheckpointCorruptedError(f"{self.folder / name}: not listed in manifest.json")
            needed[name] = entry
        if self._files is None:
            self._files = _OpenFiles()
        files = self._files
        try:
            new = [entry for name, entry in needed.items() if name not in files]
            if new:
                files.add(self.open_files(new), [entry.name for entry in new])
            for name, entry in needed.items():
                if name in self._headers or name in self._values:
                    continue
                source = str(self.folder / name)
                if name.endswith(".safetensors"):
                    self._headers[name] = {info.name: info for info in _read_header(files, entry, source)}
                    continue
                document = load_msgpack(bytes(_read(files, name, 0, entry.size)), source=source)
                if not isinstance(document, dict):
                    raise CheckpointCorruptedError(f"{source}: expected a map of keys to values; the file is damaged")
                self._values[name] = document
            for item in plan.items:
                self._check(item.storage_index.fqn, locations[item.storage_index])
        except BaseException:
            self.close()
            raise
        return plan

    def _check(self, fqn: str, location: Location) -> None:
        """The chunk or value named in ``sharding.json`` exists and has the declared dtype/shape."""
        assert self.folder is not None and self.sharding is not None
        source = str(self.folder / location.file)
        if location.file.endswith(".msgpack"):
            if location.name not in self._values[location.file]:
                raise CheckpointCorruptedError(
                    f"{source}: has no value {location.name!r}, which {SHARDING_NAME} places there"
                )
            return
        info = self._headers[location.file].get(location.name)
        if info is None:
            raise CheckpointCorruptedError(
                f"{source}: has no tensor {location.name!r}, which {SHARDING_NAME} places there"
            )
        dtype = self.sharding.tensors[fqn].dtype
        if info.dtype != dtype or info.shape != location.shape:
            raise CheckpointCorruptedError(
                f"{source}: tensor {location.name!r} is {TORCH_DTYPES[info.dtype]} of shape {info.shape}, "
                f"{SHARDING_NAME} declares {TORCH_DTYPES[dtype]} of shape {location.shape}; the checkpoint is damaged"
            )

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: DCPLoadPlanner) -> Future[None]:
        if not isinstance(planner, LoadPlanner):
            raise UsageError("safeckpt.distributed.Reader needs planner=safeckpt.distributed.LoadPlanner()")
        assert self.folder is not None and self.sharding is not None
        locations = self._where
        files, staging = self._files, Staging()
        try:
            for item in plan.items:
                location = locations[item.storage_index]
                source = str(self.folder / location.file)
                if item.type == LoadItemType.BYTE_IO:
                    value = decode_value(self._values[location.file][location.name], source=f"{source} [{location.name!r}]")
                    planner.set_value(item, value)
                    continue
                assert files is not None
                info = self._headers[location.file][location.name]
                target = planner.resolve_tensor(item).detach()
                if tuple(target.shape) != tuple(item.lengths) or any(
                    o + n > d for o, n, d in zip(item.storage_offsets, item.lengths, info.shape, strict=True)
                ):
                    raise CheckpointCorruptedError(
                        f"{source}: chunk {location.name!r} of shape {info.shape} has no box of shape "
                        f"{tuple(item.lengths)} at {tuple(item.storage_offsets)} to fill one of shape "
                        f"{tuple(target.shape)}; the checkpoint is damaged"
                    )
                read_box(files, location.file, info, item.storage_offsets, target, source=source, staging=staging)
                planner.commit_tensor(item, target)
            if self.keep_open:
                self._kept = True
            elif files is not None:
                self._files = None
                files.close()  # refuses a file modified since it was verified
        finally:
            if not self._kept:
                self.close()
        future: Future[None] = Future()
        future.set_result(None)
        return future


class _OpenFiles:
    """The verified files of one or more loads' plans, as one :class:`VerifiedRanges`."""

    def __init__(self) -> None:
        self._by_name: dict[str, VerifiedRanges] = {}
        self._opened: list[VerifiedRanges] = []

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def add(self, files: VerifiedRanges, names: Sequence[str]) -> None:
        self._opened.append(files)
        self._by_name.update(dict.fromkeys(names, files))

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        self._by_name[name].read_into(name, offset, view)

    def close(self) -> None:
        """Close every file; the first refusal (a file modified since verified) is raised."""
        opened, self._opened, self._by_name = self._opened, [], {}
        error: CheckpointCorruptedError | None = None
        for files in opened:
            try:
                files.close()
            except CheckpointCorruptedError as exc:
                error = error or exc
        if error is not None:
            raise error


def _read(files: VerifiedRanges, name: str, offset: int, size: int) -> bytearray:
    data = bytearray(size)
    files.read_into(name, offset, memoryview(data))
    return data


def _read_header(files: VerifiedRanges, entry: FileEntry, source: str) -> list[TensorInfo]:
    """The tensors of a verified archive, from its header alone."""
    end = header_end(_read(files, entry.name, 0, min(8, entry.size)), total=entry.size, source=source)
    infos, _ = parse_header(_read(files, entry.name, 0, end), source=source, total=entry.size)
    return infos

"""``Reader``: a DCP ``StorageReader`` that verifies what each rank reads before DCP copies it.

It reads through the storage seam (:mod:`safeckpt.storage.base`), so the checkpoint may be in a
local or shared folder or behind any fsspec URL (``s3://bucket/run``).

The order of DCP's calls, and what each does here:

1. every rank, ``read_metadata``: reads ``manifest.json``, then reads and checks the SHA-256 of
   ``sharding.json`` and parses it strictly (:mod:`.sharding`) into DCP's ``Metadata``.
2. every rank, ``prepare_local_plan``: refuses plans not made by :class:`~.planner.LoadPlanner`
   (DCP's own planners ``torch.load`` non-tensor values), then reads every shard file this
   rank's plan touches *whole* into memory (``CheckpointFolder.read_files``, after checking
   that ``manifest.json`` is still the one step 1 read) and checks its size and SHA-256 (or
   every chunk digest), and parses the verified bytes (safetensors header, msgpack document). DCP runs this
   step on all ranks and collects failures before any rank goes on, so a damaged file makes
   every rank raise before any of them copies a byte into a parameter.
3. every rank, ``read_data``: copies each requested box out of the verified tensors into the
   planner's destination, decodes values with the tree decoder, then drops the buffers.

A resharded load (different world size, uneven shards) therefore verifies every file it reads
from, completely, even if it needs only part of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
    FileEntry,
    Manifest,
    StorageLocation,
    as_location,
    is_sharded,
    load_msgpack,
    locate_checkpoint,
    storage_for,
    tensors_from_buffer,
)
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
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._values: dict[str, dict[str, object]] = {}

    def __repr__(self) -> str:
        return f"Reader(path={str(self.folder or self.path)!r}, verify={self.verify})"

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and as_location(checkpoint_id) != self.path:
            self.path = as_location(checkpoint_id)
            self.folder = self.manifest = self.sharding = self.metadata = None
        self._tensors, self._values = {}, {}

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
        folder, manifest = self.folder, self.manifest
        if folder is None or manifest is None:
            raise UsageError("safeckpt.distributed.Reader.read_files called before read_metadata")
        with storage_for(folder, self.storage_options).open(folder) as opened:
            if opened.read_manifest() != manifest:
                raise CheckpointCorruptedError(
                    f"{folder / MANIFEST_NAME}: changed while the checkpoint was being loaded (it was "
                    "overwritten by another save); load again"
                )
            return opened.read_files(entries, verify=self.verify)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if plan.storage_data != PLANNER_MARK:
            raise UsageError(
                "safeckpt.distributed.Reader needs planner=safeckpt.distributed.LoadPlanner(): "
                "DCP's own load planners (the default one, _load_state_dict_from_keys) hand "
                "non-tensor values to torch.load, which runs pickle"
            )
        self._tensors, self._values = {}, {}
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
        buffers = self.read_files(list(needed.values()))
        for name, buffer in buffers.items():
            source = str(self.folder / name)
            if name.endswith(".safetensors"):
                self._tensors[name], _ = tensors_from_buffer(buffer, source=source)
            else:
                document = load_msgpack(bytes(buffer), source=source)
                if not isinstance(document, dict):
                    raise CheckpointCorruptedError(f"{source}: expected a map of keys to values; the file is damaged")
                self._values[name] = document
        for item in plan.items:
            self._check(item.storage_index.fqn, locations[item.storage_index])
        return plan

    def _check(self, fqn: str, location: Location) -> None:
        """The chunk or value named in ``sharding.json`` exists and has the declared dtype/shape."""
        assert self.folder is not None and self.sharding is not None
        source = str(self.folder / location.file)
        if location.file.endswith(".msgpack"):
            if location.name not in self._values[location.file]:
                raise CheckpointCorruptedError(f"{source}: has no value {location.name!r}, which {SHARDING_NAME} places there")
            return
        tensor = self._tensors[location.file].get(location.name)
        if tensor is None:
            raise CheckpointCorruptedError(f"{source}: has no tensor {location.name!r}, which {SHARDING_NAME} places there")
        dtype = TORCH_DTYPES[self.sharding.tensors[fqn].dtype]
        if tensor.dtype != dtype or tuple(tensor.shape) != location.shape:
            raise CheckpointCorruptedError(
                f"{source}: tensor {location.name!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, "
                f"{SHARDING_NAME} declares {dtype} of shape {location.shape}; the checkpoint is damaged"
            )

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: DCPLoadPlanner) -> Future[None]:
        if not isinstance(planner, LoadPlanner):
            raise UsageError("safeckpt.distributed.Reader needs planner=safeckpt.distributed.LoadPlanner()")
        assert self.folder is not None and self.sharding is not None
        locations = self._where
        try:
            for item in plan.items:
                location = locations[item.storage_index]
                source = str(self.folder / location.file)
                if item.type == LoadItemType.BYTE_IO:
                    value = decode_value(self._values[location.file][location.name], source=f"{source} [{location.name!r}]")
                    planner.set_value(item, value)
                    continue
                stored = self._tensors[location.file][location.name]
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                    stored = stored.narrow(dim, start, length)
                target = planner.resolve_tensor(item).detach()
                if target.shape != stored.shape:
                    raise CheckpointCorruptedError(
                        f"{source}: chunk {location.name!r} gives shape {tuple(stored.shape)} where "
                        f"{tuple(target.shape)} was planned; the checkpoint is damaged"
                    )
                target.copy_(stored)
                planner.commit_tensor(item, target)
        finally:
            self._tensors, self._values = {}, {}
        future: Future[None] = Future()
        future.set_result(None)
        return future

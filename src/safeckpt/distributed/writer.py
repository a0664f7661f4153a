"""``Writer``: a DCP ``StorageWriter`` that commits a sharded checkpoint like safeckpt's own saves,
through the storage seam (:mod:`safeckpt.storage.base`): a local or shared folder, or any fsspec
URL (``s3://bucket/run``).

The order of DCP's calls, and what each does here:

1. every rank, ``set_up_storage_writer``: refuses ``use_collectives=False`` (without collectives
   no single process sees every rank's files, so nobody could commit them).
2. every rank, ``prepare_local_plan``: refuses plans not made by :class:`~.planner.SavePlanner`
   (any other planner pickles non-tensor values).
3. coordinator, ``prepare_global_plan``: refuses an existing step (unless ``overwrite``) and
   begins the save (``storage.begin``: a locked temporary folder on a file system, a fresh
   ``objects-*`` prefix in an object store); tells every rank the staging name
   (``PendingWrite.staging``, relative to the root) and the file names to write.
4. every rank, ``write_data``: writes ``shard-RRRRR.safetensors`` (its tensor chunks),
   ``shard-RRRRR-whole.safetensors`` (the whole, unsharded tensors it writes, when it also writes
   pieces of sharded ones) and ``shard-RRRRR.msgpack`` (its non-tensor values) into the staging area
   (``storage.join(staging)``), hashing while writing, making them durable (fsync, or a
   completed upload), and reports size and SHA-256 in its ``WriteResult``s.
5. coordinator, ``finish`` (only once every rank's ``write_data`` succeeded): writes
   ``config.json``/``vocab.json`` if given, ``sharding.json``, then ``manifest.json`` listing
   every file's digest as the ranks reported it (no file is read back) and commits
   (``PendingWrite.commit``): on a file system it fsyncs the folder, renames it to
   ``step-NNNNNNNN`` and fsyncs the root; in an object store the manifest is the last object,
   written create-only.

If any rank fails, DCP never calls ``finish``: the staging area is removed by
:meth:`Writer.abort` (which ``safeckpt.distributed.save`` calls on every failure) or, when the
coordinator died, by a later save in that root. Nothing half-written is ever visible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.planner import SavePlanner as DCPSavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..errors import CheckpointUsageError
from ._core import (
    DTYPE_NAMES,
    FileEntry,
    FileSource,
    PendingWrite,
    StorageLocation,
    TensorCollector,
    archive_parts,
    as_location,
    build,
    checkpoint_exists,
    dump_msgpack,
    step_dirname,
    storage_for,
)
from .planner import PLANNER_MARK, SavePlanner
from .sharding import SHARDING_NAME, Chunk, Location, TensorEntry, dump_sharding

__all__ = ["SHARDED_FORMAT_VERSION", "Writer", "WriterOptions", "shard_name"]

SHARDED_FORMAT_VERSION = (1, 2)
"""Format version of a sharded checkpoint's manifest (1.2 adds ``sharding.json``)."""


UsageError = CheckpointUsageError
"""A DCP call configured so that safeckpt cannot give its guarantees (the message says what to
pass instead): ``safeckpt.errors.CheckpointUsageError``."""


class _Step(TypedDict):
    step: int


class WriterOptions(_Step, total=False):
    """The keywords of :class:`Writer` after ``root``, as one value: ``step`` (required),
    ``name``, ``overwrite``, ``documents``, ``metadata``, ``storage_options``; what
    ``safeckpt.distributed.save`` and ``async_save`` take besides the state, the root and the
    group."""

    name: str | None
    overwrite: bool
    documents: Mapping[str, bytes] | None
    metadata: Mapping[str, object] | None
    storage_options: Mapping[str, Any] | None


WHOLE_SUFFIX = "-whole"
"""``shard-RRRRR-whole.safetensors``: the whole tensors of a rank that also writes pieces."""


def shard_name(rank: int) -> str:
    """Base name of the files rank ``rank`` writes (``shard-00003``)."""
    return f"shard-{rank:05d}"


@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank in ``prepare_global_plan``."""

    staging: str
    """Where the files go, relative to the root (``PendingWrite.staging``)."""
    base: str
    """File base name for this rank's shard files."""


class _Archive:
    """A shard's safetensors bytes, produced afresh by each ``iter()`` so an upload can be retried."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __iter__(self) -> Iterator[memoryview | bytes]:
        return archive_parts(self.tensors, None)


@dataclass(frozen=True)
class _Written:
    """``WriteResult.storage_data``: where an item went and the digest of the file holding it."""

    location: Location
    entry: FileEntry


def _sharding(metadata: Metadata, locations: dict[MetadataIndex, Location], world_size: int) -> bytes:
    """``sharding.json`` from DCP's global metadata and where the ranks wrote each item."""
    tensors: dict[str, TensorEntry] = {}
    values: dict[str, Location] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            values[fqn] = locations[MetadataIndex(fqn)]
            continue
        dtype = DTYPE_NAMES.get(md.properties.dtype)
        if dtype is None:
            raise UsageError(f"{fqn}: tensor dtype {md.properties.dtype} is not one the format stores")
        chunks = tuple(
            Chunk(tuple(c.offsets), tuple(c.sizes), locations[MetadataIndex(fqn, c.offsets)]) for c in md.chunks
        )
        tensors[fqn] = TensorEntry(dtype, tuple(md.size), chunks)
    paths = {fqn: tuple(path) for fqn, path in (metadata.planner_data or {}).items()}
    return dump_sharding(tensors, values, paths, world_size)


class Writer(StorageWriter):
    """Write one sharded checkpoint ``root/step-NNNNNNNN`` through ``torch.distributed.checkpoint``.

    Args:
        root: folder of the run's checkpoints, the same on every rank (a shared file system for
            multi-node jobs), or an fsspec URL (``s3://bucket/run``; needs ``safeckpt[remote]``).
        step: training step; names the checkpoint ``step-NNNNNNNN``.
        name: commit the checkpoint as ``root/name`` instead (what
            ``save_checkpoint(path=root/name)`` does).
        overwrite: replace an existing checkpoint for ``step`` instead of raising
            :class:`~safeckpt.CheckpointExistsError`.
        documents: extra files the coordinator writes (``config.json``, ``vocab.json``) as
            name -> bytes.
        metadata: JSON-compatible values recorded in ``manifest.json``.
        storage_options: options of the fsspec file system of a URL ``root`` (e.g.
            ``{"endpoint_url": ...}`` for s3fs), the same on every rank.

    Example:
        >>> import torch.distributed.checkpoint as dcp  # doctest: +SKIP
        >>> from safeckpt import distributed as sd  # doctest: +SKIP
        >>> dcp.save(state, storage_writer=sd.Writer("ckpts", step=100), planner=sd.SavePlanner())  # doctest: +SKIP
        >>> dcp.save(state, storage_writer=sd.Writer("s3://bucket/run", step=200), planner=sd.SavePlanner())  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | StorageLocation,
        *,
        step: int,
        name: str | None = None,
        overwrite: bool = False,
        documents: Mapping[str, bytes] | None = None,
        metadata: Mapping[str, object] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UsageError(f"step: expected a non-negative int, got {step!r}")
        if name is not None and (name in ("", ".", "..") or name.startswith(".") or "/" in name):
            raise UsageError(f"name: {name!r} must be a plain folder name that is not hidden (e.g. 'final')")
        self.storage_options = dict(storage_options) if storage_options else None
        self.root = as_location(root)
        self.storage = storage_for(self.root, self.storage_options)
        self.step = step
        self.name = name
        self.overwrite = overwrite
        self.documents = dict(documents or {})
        self.metadata = dict(metadata or {})
        self.is_coordinator = False
        self.rank = 0
        self.world_size = 1
        self.pending: PendingWrite | None = None
        self.committed: StorageLocation | None = None

    def __repr__(self) -> str:
        return f"Writer(root={str(self.root)!r}, step={self.step}, committed={self.committed is not None})"

    @property
    def final(self) -> StorageLocation:
        """Where the checkpoint appears once committed."""
        return self.root / (self.name or step_dirname(self.step))

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.abort()
        if checkpoint_id is not None:
            self.root = as_location(checkpoint_id)
            self.storage = storage_for(self.root, self.storage_options)
        self.committed = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_writer=Writer(...) explicitly

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise UsageError(
                "safeckpt.distributed.Writer needs use_collectives=True: without collectives no "
                "coordinator sees every rank's files, so the checkpoint could never be committed; "
                "drop use_collectives=False"
            )
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if plan.storage_data != PLANNER_MARK:
            raise UsageError(
                "safeckpt.distributed.Writer needs planner=safeckpt.distributed.SavePlanner(): "
                "DCP's default planner stores non-tensor values with torch.save (pickle)"
            )
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.abort()
        if not self.overwrite and self.storage.committed(self.final):
            raise checkpoint_exists(self.final, self.step)
        pending = self.storage.begin(self.step, name=self.name).__enter__()
        self.pending = pending
        self.world_size = len(plans)
        return [
            SavePlan(plan.items, storage_data=_RankPlan(pending.staging, shard_name(rank)), planner_data=plan.planner_data)
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: DCPSavePlanner) -> Future[list[WriteResult]]:
        if not isinstance(planner, SavePlanner):
            raise UsageError("safeckpt.distributed.Writer needs planner=safeckpt.distributed.SavePlanner()")
        rank_plan = plan.storage_data
        if not isinstance(rank_plan, _RankPlan):
            raise UsageError("safeckpt.distributed.Writer: the plan was not prepared by a safeckpt Writer")
        # A reader verifies every file it touches whole, and every rank needs the whole tensors
        # (AdamW's step counts, which DCP has one rank write for all): kept apart from this rank's
        # pieces of sharded tensors, they do not make another rank read and hash those pieces.
        pieces = any(item.type == WriteItemType.SHARD for item in plan.items)
        archives: dict[str, tuple[TensorCollector, list[tuple[MetadataIndex, str, int]]]] = {}
        values: dict[str, object] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                values[item.index.fqn] = planner.value_document(item)
                continue
            whole = pieces and item.type != WriteItemType.SHARD
            archive, tensors = archives.setdefault(
                f"{rank_plan.base}{WHOLE_SUFFIX if whole else ''}.safetensors", (TensorCollector(f"rank {self.rank}: "), [])
            )
            tensor = planner.tensor(item).detach()
            offsets = item.index.offset or ()
            stored = archive.add_named(f"{item.index.fqn}@{','.join(map(str, offsets))}", tensor)
            tensors.append((item.index, stored, tensor.nbytes))
        value_file = f"{rank_plan.base}.msgpack"
        files: list[FileSource] = [
            (name, _Archive(archive.tensors), sum(t.nbytes for t in archive.tensors.values()))
            for name, (archive, _) in archives.items()
        ]
        if values:
            data = dump_msgpack(values, source=f"{self.root}/{rank_plan.staging}/{value_file}")
            files.append((value_file, (data,), len(data)))
        entries = {entry.name: entry for entry in self.storage.join(rank_plan.staging).write_files(files)}
        results = [
            WriteResult(index, nbytes, _Written(Location(name, stored), entries[name]))
            for name, (_, tensors) in archives.items()
            for index, stored, nbytes in tensors
        ]
        results += [
            WriteResult(item.index, 0, _Written(Location(value_file, item.index.fqn), entries[value_file]))
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        pending = self.pending
        if pending is None:
            raise UsageError("safeckpt.distributed.Writer.finish called without prepare_global_plan")
        try:
            entries: dict[str, FileEntry] = {}
            locations: dict[MetadataIndex, Location] = {}
            for rank_results in results:
                for result in rank_results:
                    written = result.storage_data
                    if not isinstance(written, _Written):
                        raise UsageError("safeckpt.distributed.Writer: a rank reported results of another writer")
                    entries[written.entry.name] = written.entry
                    locations[result.index] = written.location
            sharding = _sharding(metadata, locations, self.world_size)
            files = [(name, (data,), len(data)) for name, data in (*self.documents.items(), (SHARDING_NAME, sharding))]
            entries.update((entry.name, entry) for entry in pending.write_files(files))
            manifest = build(self.step, entries.values(), metadata=self.metadata, producer={"torch": torch.__version__})  # type: ignore[arg-type]
            manifest = dataclasses.replace(manifest, format_version=SHARDED_FORMAT_VERSION)
            self.committed = pending.commit(manifest, overwrite=self.overwrite)  # manifest.json last
        finally:
            self.abort()

    def abort(self) -> None:
        """Discard this save's staging area if it was not committed (coordinator only; safe to
        call any number of times)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.__exit__(None, None, None)

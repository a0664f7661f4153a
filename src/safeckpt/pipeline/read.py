"""Locate a checkpoint and read its files, verified: the half of loading that needs no torch.

``locate_checkpoint`` resolves what the user passed; ``read_checkpoint_files`` parses the manifest,
then reads every file it lists and checks its size, its SHA-256 and, where the manifest has them
(format 1.1), the SHA-256 of each chunk as it arrives (so the work spreads over the cores), and
returns only once all of them verified, so no parser ever sees a byte that failed verification.
With ``verify=False`` files are memory-mapped and only their sizes are checked. The torch loader
(:mod:`safeckpt.torch.loader`) and the numpy reader (:mod:`safeckpt.numpy`) share it;
``verify_checkpoint`` uses ``audit_checkpoint_files``, which checks every digest and keeps nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import CheckpointCorruptedError, CheckpointError, CheckpointUsageError, damaged
from ..format.documents import load_json, load_msgpack
from ..format.manifest import MANIFEST_NAME, Manifest
from ..format.tree import decode_document
from ..storage.base import Buffer, Location
from ..storage.locate import as_location, storage_for

__all__ = [
    "MODEL_ALIASES_KEY",
    "CheckpointContents",
    "audit_checkpoint_files",
    "is_sharded",
    "locate_checkpoint",
    "model_aliases",
    "read_checkpoint_files",
]

TensorT = TypeVar("TensorT")

SHARDING_NAME = "sharding.json"
"""The file that makes a checkpoint a sharded one (format 1.2; see :mod:`safeckpt.distributed.sharding`)."""


@dataclass
class CheckpointContents(Generic[TensorT]):
    """What a checkpoint holds; each reader fixes the tensor type (torch or numpy)."""

    path: Location
    """The checkpoint's folder (a :class:`~pathlib.Path`, or an ``ObjectPath`` for a URL)."""
    step: int
    config: object | None
    vocab: object | None
    model_state: dict[str, TensorT]
    """State dict; tied names map to the very same tensor."""
    optimizer_state: object | None
    extra: dict[str, object] = field(default_factory=dict)
    metadata: dict[str, object] = field(default_factory=dict)
    manifest: Manifest | None = None
    scheduler_state: object | None = None
    rng_state: object | None = None

    _repr_name: ClassVar[str] = "Checkpoint"

    def __repr__(self) -> str:
        return (
            f"{self._repr_name}(path={str(self.path)!r}, step={self.step}, "
            f"tensors={len(self.model_state)}, optimizer={self.optimizer_state is not None})"
        )



MODEL_ALIASES_KEY = "safeckpt.aliases"
"""``model.safetensors`` metadata key: JSON ``{alias: stored name}`` of tied tensors stored once."""


def locate_checkpoint(path: str | os.PathLike[str] | Location, *, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve a checkpoint folder, its ``manifest.json``, or a root of checkpoints (newest);
    ``path`` may be an fsspec URL (``s3://bucket/run``), opened with ``storage_options``."""
    location = as_location(path)
    return storage_for(location, storage_options).locate(location)


def locate_local(path: str | os.PathLike[str] | Location) -> Path:
    """:func:`locate_checkpoint` for callers that work on local folders only (sharded
    checkpoints, the framework integrations, the command line's file commands)."""
    found = locate_checkpoint(path)
    if not isinstance(found, Path):
        raise CheckpointUsageError(
            f"{found}: this operation works on local checkpoint folders only, not object-store URLs; "
            "copy the checkpoint to a local folder first"
        )
    return found


def is_sharded(folder: Location, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the committed checkpoint ``folder`` is a sharded one (it holds ``sharding.json``);
    False when its manifest cannot be read (the loader then says why)."""
    if isinstance(folder, Path):  # a look at the folder (or a copied object-store layout), no parse
        return (folder / SHARDING_NAME).is_file() or any(folder.glob(f"objects-*/{SHARDING_NAME}"))
    try:
        with storage_for(folder, storage_options).open(folder) as opened:
            return opened.read_manifest().file(SHARDING_NAME) is not None
    except CheckpointError:
        return False


def read_checkpoint_files(
    folder: Location, *, verify: bool = True, storage_options: Mapping[str, Any] | None = None
) -> tuple[Manifest, dict[str, memoryview]]:
    """Parse the manifest, then read every listed file and check size and hash, in parallel.

    Returns only once all files verified: a single bad file fails the whole load before any
    of them is parsed.
    """
    with storage_for(folder, storage_options).open(folder) as opened:
        manifest = _checked(opened.read_manifest(), folder)
        return manifest, opened.read_files(manifest.files, verify=verify)


def audit_checkpoint_files(folder: Location, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Parse the manifest and check every file's size and every digest it records, in bounded
    memory (see :func:`safeckpt.storage.posix_stream.audit_files`); returns the manifest."""
    with storage_for(folder, storage_options).open(folder) as opened:
        manifest = _checked(opened.read_manifest(), folder)
        opened.audit(manifest.files)
        return manifest


def _checked(manifest: Manifest, folder: Location) -> Manifest:
    if manifest.file("model.safetensors") is None and manifest.file(SHARDING_NAME) is None:  # 1.2: sharded
        raise CheckpointCorruptedError(
            f"{folder / MANIFEST_NAME}: does not list model.safetensors; the checkpoint is invalid"
        )
    return manifest


def model_aliases(metadata: dict[str, str], stored: Collection[str], *, source: str) -> dict[str, str]:
    """The tied-tensor aliases recorded in a model archive's metadata, validated against ``stored``.

    Each alias must name a tensor that is not itself stored, and point at one that is.
    """
    if MODEL_ALIASES_KEY not in metadata:
        return {}
    aliases = load_json(metadata[MODEL_ALIASES_KEY].encode(), source=source)
    if not isinstance(aliases, dict) or not all(
        isinstance(v, str) and v in stored and k not in stored for k, v in aliases.items()
    ):
        raise damaged(
            source,
            f"invalid {MODEL_ALIASES_KEY} metadata (expected a JSON object mapping names that are not "
            "stored to names that are)",
        )
    return aliases


def decode_tree(
    name: str,
    buffers: Mapping[str, Buffer],
    folder: Location,
    make_arrays: Callable[[Buffer, str], Mapping[str, TensorT]],
) -> object | None:
    """The state tree ``name`` (``name.msgpack`` + ``name.safetensors``), or None if the checkpoint
    has none: the one decode every reader shares. ``make_arrays(buffer, source)`` turns the
    verified archive into the reader's arrays (torch tensors, numpy arrays) by stored name."""
    doc_name, archive_name = f"{name}.msgpack", f"{name}.safetensors"
    if doc_name not in buffers and archive_name not in buffers:
        return None
    for needed in (doc_name, archive_name):
        if needed not in buffers:
            raise CheckpointCorruptedError(
                f"{folder / MANIFEST_NAME}: lists {name} state without {needed}; the checkpoint is invalid"
            )
    arrays = make_arrays(buffers[archive_name], str(folder / archive_name))
    document = load_msgpack(bytes(buffers[doc_name]), source=str(folder / doc_name))

    def resolve(stored: str) -> TensorT:
        if stored not in arrays:
            raise CheckpointCorruptedError(f"{folder / doc_name}: refers to tensor {stored!r}, absent from {archive_name}")
        return arrays[stored]

    return decode_document(document, source=str(folder / doc_name), resolve_tensor=resolve)

"""The command line's torch side: read a checkpoint's files verified (with progress) and decode
them into tensors and state trees, one part at a time when a command needs only some.

Every core function the torch commands (``diff``, ``export``) use is imported here, so that
moving core modules changes this file only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..format.tree import TREE_NAMES
from ..pipeline.read import decode_tree
from ..storage.base import Buffer, Location
from ..torch.loader import Checkpoint
from ..torch.tensors import tensors_from_buffer
from . import _files

__all__ = ["Checkpoint", "decode_part", "load", "read_part"]


def decode_part(part: str, buffers: Mapping[str, memoryview], folder: Location) -> object | None:
    """Decode one part from verified buffers (None when the checkpoint does not hold it)."""
    if part == "model":
        source = str(folder / "model.safetensors")
        tensors, metadata = tensors_from_buffer(buffers["model.safetensors"], source=source)
        for alias, stored in _files.model_aliases(metadata, set(tensors), source=source).items():
            tensors[alias] = tensors[stored]  # tied names: the very same tensor
        return tensors
    if part in ("config", "vocab"):
        return _files.decode_document(part, buffers, folder)
    return decode_tree(part, buffers, folder, _tensors)


def _tensors(buffer: Buffer, source: str) -> dict[str, torch.Tensor]:
    return tensors_from_buffer(buffer, source=source)[0]


def read_part(
    folder: Location,
    manifest: _files.Manifest,
    part: str,
    *,
    done: Callable[[int], object] = lambda size: None,
    storage_options: _files.Options = None,
) -> object | None:
    """Read, verify and decode one part of a checkpoint."""
    entries = [entry for entry in manifest.files if entry.name in _files.files_of(part)]
    return decode_part(part, _files.read_verified(folder, entries, done=done, storage_options=storage_options), folder)


def load(
    folder: Location,
    manifest: _files.Manifest,
    *,
    done: Callable[[int], object] = lambda size: None,
    storage_options: _files.Options = None,
) -> Checkpoint:
    """Everything the checkpoint holds, verified, as a :class:`~safeckpt.Checkpoint` (nothing is
    restored anywhere)."""
    buffers = _files.read_verified(folder, list(manifest.files), done=done, storage_options=storage_options)
    trees = {part: decode_part(part, buffers, folder) for part in TREE_NAMES}
    model = decode_part("model", buffers, folder)
    assert isinstance(model, dict)
    extra = trees["extra"]
    return Checkpoint(
        path=folder,
        step=manifest.step,
        config=decode_part("config", buffers, folder),
        vocab=decode_part("vocab", buffers, folder),
        model_state=model,
        optimizer_state=trees["optimizer"],
        extra=extra if isinstance(extra, dict) else {},
        metadata=dict(manifest.metadata),
        manifest=manifest,
        scheduler_state=trees["scheduler"],
        rng_state=trees["rng"],
    )

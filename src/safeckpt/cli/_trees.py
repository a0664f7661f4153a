"""The command line's torch side: read a checkpoint's files verified (with progress) and decode
them into tensors and state trees, one part at a time when a command needs only some.

Every core function the torch commands (``diff``, ``export``) use is imported here, so that
moving core modules changes this file only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..loader import Checkpoint, _decode_tree, _model_state
from ..manifest import Manifest
from . import _files

__all__ = ["TREES", "Checkpoint", "decode_part", "load", "read_part"]

TREES = ("optimizer", "scheduler", "rng", "extra")
"""The state trees besides the model, each stored as ``NAME.msgpack`` + ``NAME.safetensors``."""


def decode_part(part: str, buffers: Mapping[str, memoryview], folder: Path) -> object | None:
    """Decode one part from verified buffers (None when the checkpoint does not hold it)."""
    if part == "model":
        return _model_state(buffers, folder, "cpu")
    if part in ("config", "vocab"):
        return _files.decode_document(part, buffers, folder)
    return _decode_tree(part, buffers, folder, "cpu", aligned=False)


def read_part(
    folder: Path, manifest: Manifest, part: str, *, done: Callable[[int], object] = lambda size: None
) -> object | None:
    """Read, verify and decode one part of a checkpoint."""
    entries = [entry for entry in manifest.files if entry.name in _files.files_of(part)]
    return decode_part(part, _files.read_verified(folder, entries, done=done), folder)


def load(folder: Path, manifest: Manifest, *, done: Callable[[int], object] = lambda size: None) -> Checkpoint:
    """Everything the checkpoint holds, verified, as a :class:`~safeckpt.Checkpoint` (nothing is
    restored anywhere)."""
    buffers = _files.read_verified(folder, list(manifest.files), done=done)
    trees = {part: decode_part(part, buffers, folder) for part in TREES}
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

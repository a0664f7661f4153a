"""Locate a checkpoint and read its files, verified: the half of loading that needs no torch.

``locate_checkpoint`` resolves what the user passed; ``read_checkpoint_files`` parses the manifest,
then reads every file it lists and checks its size and SHA-256, and returns only once all of
them verified, so no parser ever sees a byte that failed verification. The torch loader
(:mod:`safeckpt.loader`) and the numpy reader (:mod:`safeckpt.numpy`) share it;
``verify_checkpoint`` uses ``audit_checkpoint_files``, which checks every digest and keeps nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from . import limits
from .commit import list_checkpoints, parse_step
from .documents import load_json
from .errors import CheckpointCorruptedError, CheckpointNotFoundError
from .fileio import audit_files, read_bounded, read_files
from .manifest import MANIFEST_NAME, Manifest

__all__ = [
    "MODEL_ALIASES_KEY",
    "CheckpointContents",
    "audit_checkpoint_files",
    "locate_checkpoint",
    "model_aliases",
    "read_checkpoint_files",
]

TensorT = TypeVar("TensorT")


@dataclass
class CheckpointContents(Generic[TensorT]):
    """What a checkpoint holds; each reader fixes the tensor type (torch or numpy)."""

    path: Path
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


def locate_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint folder, its ``manifest.json``, or a root of checkpoints (newest)."""
    path = Path(path)
    if path.name == MANIFEST_NAME and path.is_file():
        return path.parent
    if (path / MANIFEST_NAME).exists():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
        if parse_step(path.name) is not None:
            raise CheckpointNotFoundError(
                f"{path / MANIFEST_NAME}: missing; the checkpoint was never committed (its save "
                "was interrupted) — load an earlier checkpoint"
            )
        raise CheckpointNotFoundError(
            f"{path}: no checkpoint here (no {MANIFEST_NAME} and no committed step-* folders)"
        )
    raise CheckpointNotFoundError(f"{path}: checkpoint does not exist; check the path")


def read_checkpoint_files(folder: Path, *, verify: bool = True) -> tuple[Manifest, dict[str, memoryview]]:
    """Parse the manifest, then read every listed file and check size and hash, in parallel.

    Returns only once all files verified: a single bad file fails the whole load before any
    of them is parsed.
    """
    with _folder(folder) as dir_fd:
        manifest = _manifest(dir_fd, folder)
        return manifest, read_files(dir_fd, manifest.files, folder=folder, verify=verify)


def audit_checkpoint_files(folder: Path) -> Manifest:
    """Parse the manifest and check every file's size and every digest it records, in bounded
    memory (see :func:`safeckpt.fileio.audit_files`); returns the manifest."""
    with _folder(folder) as dir_fd:
        manifest = _manifest(dir_fd, folder)
        audit_files(dir_fd, manifest.files, folder=folder)
        return manifest


@contextlib.contextmanager
def _folder(folder: Path) -> Iterator[int]:
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{folder}: checkpoint does not exist; check the path") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{folder}: is not a checkpoint folder") from None
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def _manifest(dir_fd: int, folder: Path) -> Manifest:
    raw = read_bounded(
        dir_fd,
        MANIFEST_NAME,
        limit=limits.MAX_MANIFEST_BYTES,
        source=str(folder / MANIFEST_NAME),
        missing="missing; the checkpoint was never committed, load an earlier one",
    )
    manifest = Manifest.from_json_bytes(bytes(raw), source=str(folder / MANIFEST_NAME))
    if manifest.file("model.safetensors") is None and manifest.file("sharding.json") is None:  # 1.2: sharded
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
        raise CheckpointCorruptedError(
            f"{source}: invalid {MODEL_ALIASES_KEY} metadata (expected a JSON object mapping names "
            "that are not stored to names that are); the file is damaged"
        )
    return aliases

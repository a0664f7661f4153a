"""``verify_checkpoint``: prove a checkpoint is complete and uncorrupted without restoring it."""

from __future__ import annotations

import os

from ..format.manifest import Manifest
from .read import audit_checkpoint_files, locate_checkpoint

__all__ = ["verify_checkpoint"]


def verify_checkpoint(path: str | os.PathLike[str]) -> Manifest:
    """Check every file's size and SHA-256 against the manifest; returns the manifest.

    Checks every digest the manifest records: the whole-file SHA-256 and, for large files,
    each chunk's (loading trusts either, so an audit checks both). Files are streamed, so the
    memory used stays small whatever the size of the checkpoint.

    Raises :class:`~safeckpt.errors.CheckpointNotFoundError` or
    :class:`~safeckpt.errors.CheckpointCorruptedError` naming the first bad file.

    Example:
        >>> safeckpt.verify_checkpoint("checkpoints/step-00000100").step  # doctest: +SKIP
        100
    """
    return audit_checkpoint_files(locate_checkpoint(path))

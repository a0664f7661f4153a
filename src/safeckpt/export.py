"""Export a checkpoint for tools that read other formats: :func:`export_checkpoint`.

Targets (``to=``):

* ``torch``: one ``torch.save`` file ``{"safeckpt_export": 1, "model": state_dict, "step": ...,
  "optimizer", "scheduler", "config", "vocab", "extra", "metadata"}`` (absent parts omitted;
  tied weights stay one tensor). :func:`safeckpt.convert.import_torch_checkpoint` recognises
  the marker and puts every part back where it was.
* ``safetensors``: the model weights as a plain safetensors file, complete (a tied weight is
  written under each of its names) so ``safetensors.torch.load_file`` returns a state dict that
  ``load_state_dict(strict=True)`` accepts.

A target is one entry of :data:`EXPORT_TARGETS`, ``name -> "module:function"``, imported only
when used; the function takes ``(checkpoint: Checkpoint, target: Path, *, overwrite: bool)``
and returns what it wrote. The file is written beside the target under a temporary name,
fsynced, and only then published; an existing target is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointUsageError
from .storage.base import ObjectPath
from .storage.locate import as_location
from .storage.posix_write import file_exists, write_new_file

if TYPE_CHECKING:
    from .torch.loader import Checkpoint

__all__ = ["EXPORT_TARGETS", "export_checkpoint", "local_target"]

EXPORT_TARGETS: dict[str, str] = {
    "torch": "safeckpt.export:write_torch_file",
    "safetensors": "safeckpt.export:write_safetensors_file",
    "hf": "safeckpt.integrations.hf_export:write_hf_folder",
}
"""Export formats: name -> ``"module:function"`` (see the module docstring)."""


def export_checkpoint(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    target: str | os.PathLike[str],
    *,
    to: str = "torch",
    overwrite: bool = False,
    model_type: str | None = None,
) -> Path:
    """Write ``checkpoint`` (a path, verified on loading, or a loaded ``Checkpoint``) as ``to``.

    ``model_type`` (e.g. ``"gpt2"``) is for ``to="hf"`` only, when the checkpoint's config does
    not record it (see :func:`safeckpt.integrations.hf_export.export_hf`).

    Raises:
        ValueError: ``to`` is not one of :data:`EXPORT_TARGETS`.
        CheckpointExistsError: ``target`` exists and ``overwrite`` is False.
        CheckpointUsageError: ``target`` is a URL (exports are written locally).
        CheckpointWriteError: ``target`` could not be written (e.g. its folder does not exist).

    Example:
        >>> export_checkpoint("checkpoints", "model.safetensors", to="safetensors")  # doctest: +SKIP
        PosixPath('model.safetensors')
    """
    if to not in EXPORT_TARGETS:
        raise ValueError(f"export: unknown target {to!r}; choose one of {', '.join(sorted(EXPORT_TARGETS))}")
    if model_type is not None and to != "hf":
        raise CheckpointUsageError(f"export: model_type= applies to to='hf' only, not to {to!r}; drop it")
    target = local_target(target)
    if not overwrite and os.path.lexists(target):  # checked again when publishing
        raise file_exists(target)
    if isinstance(checkpoint, (str, os.PathLike)):
        from .torch.loader import load_checkpoint

        checkpoint = load_checkpoint(checkpoint, restore_rng=False)
    module, _, name = EXPORT_TARGETS[to].partition(":")
    writer: Callable[..., Path] = getattr(importlib.import_module(module), name)
    options = {} if model_type is None else {"model_type": model_type}
    return writer(checkpoint, target, overwrite=overwrite, **options)


def local_target(target: str | os.PathLike[str]) -> Path:
    """``target`` as a local path; an fsspec URL (``s3://bucket/model.pt``) is refused with
    :class:`~safeckpt.errors.CheckpointUsageError`: exports are written locally, then uploaded."""
    if isinstance(as_location(target), ObjectPath):
        raise CheckpointUsageError(
            f"{os.fspath(target)}: export writes local files only, and this is a URL; pass a local path "
            "as OUT and upload the result afterwards (e.g. aws s3 cp model.pt s3://bucket/model.pt)"
        )
    return Path(target)


def _torch_save(doc: dict[str, object], path: Path) -> None:
    """``torch.save``, whose write failures (a full disk) are RuntimeErrors, as OSErrors, so that
    :func:`write_new_file` reports them with the file's name."""
    import torch

    try:
        torch.save(doc, path)
    except RuntimeError as exc:
        raise OSError(0, f"torch.save failed: {exc}") from exc


def write_torch_file(checkpoint: Checkpoint, target: Path, *, overwrite: bool) -> Path:
    """The ``torch`` target (see the module docstring)."""
    from .convert import EXPORT_MARKER

    doc: dict[str, object] = {EXPORT_MARKER: 1, "model": checkpoint.model_state, "step": checkpoint.step}
    for name, value in (
        ("optimizer", checkpoint.optimizer_state),
        ("scheduler", checkpoint.scheduler_state),
        ("config", checkpoint.config),
        ("vocab", checkpoint.vocab),
    ):
        if value is not None:
            doc[name] = value
    if checkpoint.extra:
        doc["extra"] = checkpoint.extra
    if checkpoint.metadata:
        doc["metadata"] = checkpoint.metadata
    return write_new_file(target, lambda path: _torch_save(doc, path), overwrite=overwrite)


def write_safetensors_file(checkpoint: Checkpoint, target: Path, *, overwrite: bool) -> Path:
    """The ``safetensors`` target (see the module docstring)."""
    from .torch.tensors import archive_parts

    tensors = {name: tensor.detach().cpu() for name, tensor in checkpoint.model_state.items()}
    metadata = {"format": "pt", "safeckpt.step": str(checkpoint.step)}
    return write_new_file(target, archive_parts(tensors, metadata), overwrite=overwrite)

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

from .storage.posix_write import file_exists, write_new_file

if TYPE_CHECKING:
    from .torch.loader import Checkpoint

__all__ = ["EXPORT_TARGETS", "export_checkpoint"]

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
) -> Path:
    """Write ``checkpoint`` (a path, verified on loading, or a loaded ``Checkpoint``) as ``to``.

    Raises:
        ValueError: ``to`` is not one of :data:`EXPORT_TARGETS`.
        CheckpointExistsError: ``target`` exists and ``overwrite`` is False.

    Example:
        >>> export_checkpoint("checkpoints", "model.safetensors", to="safetensors")  # doctest: +SKIP
        PosixPath('model.safetensors')
    """
    if to not in EXPORT_TARGETS:
        raise ValueError(f"export: unknown target {to!r}; choose one of {', '.join(sorted(EXPORT_TARGETS))}")
    target = Path(target)
    if not overwrite and os.path.lexists(target):  # checked again when publishing
        raise file_exists(target)
    if isinstance(checkpoint, (str, os.PathLike)):
        from .torch.loader import load_checkpoint

        checkpoint = load_checkpoint(checkpoint, restore_rng=False)
    module, _, name = EXPORT_TARGETS[to].partition(":")
    writer: Callable[..., Path] = getattr(importlib.import_module(module), name)
    return writer(checkpoint, target, overwrite=overwrite)


def write_torch_file(checkpoint: Checkpoint, target: Path, *, overwrite: bool) -> Path:
    """The ``torch`` target (see the module docstring)."""
    import torch

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
    return write_new_file(target, lambda path: torch.save(doc, path), overwrite=overwrite)


def write_safetensors_file(checkpoint: Checkpoint, target: Path, *, overwrite: bool) -> Path:
    """The ``safetensors`` target (see the module docstring)."""
    from .torch.tensors import archive_parts

    tensors = {name: tensor.detach().cpu() for name, tensor in checkpoint.model_state.items()}
    metadata = {"format": "pt", "safeckpt.step": str(checkpoint.step)}
    return write_new_file(target, archive_parts(tensors, metadata), overwrite=overwrite)

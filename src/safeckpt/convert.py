"""Migration to and from ``torch.save`` files.

:func:`import_torch_checkpoint` reads a legacy ``.pt`` / ``.pth`` / ``.bin`` file with
``torch.load(..., weights_only=True)`` — torch's restricted unpickler, which refuses to build
arbitrary objects — and writes it as a verified safeckpt checkpoint. This is the only place in
safeckpt that touches a pickle-based format, and it is never on the load path of a safeckpt
checkpoint. :func:`export_torch_checkpoint` writes a checkpoint back out with ``torch.save`` for
tools that only read that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointCorruptedError, CheckpointNotFoundError, UnsupportedValueError
from .torch.loader import load_checkpoint
from .torch.saver import save_checkpoint

__all__ = ["export_torch_checkpoint", "import_torch_checkpoint"]

_MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module", "net")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict")
_STEP_KEYS = ("step", "global_step", "iteration", "epoch")


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _pick(doc: Mapping[str, object], keys: tuple[str, ...]) -> tuple[str | None, object]:
    for key in keys:
        if key in doc:
            return key, doc[key]
    return None, None


def import_torch_checkpoint(
    source: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a ``torch.save`` checkpoint into a safeckpt checkpoint; returns its path.

    Understands a bare model state dict and the common dict layout ``{"model": ...,
    "optimizer": ..., "scheduler": ..., "step"/"epoch": ...}``; every other top-level entry
    is kept in ``extra``. ``step`` defaults to the file's own step (or 0).

    Example:
        >>> import_torch_checkpoint("legacy/model.pt", "checkpoints")  # doctest: +SKIP
        PosixPath('checkpoints/step-00001000')
    """
    source = Path(source)
    if not source.is_file():
        raise CheckpointNotFoundError(f"{source}: file does not exist; check the path")
    try:
        # weights_only=True: torch's restricted unpickler; refuses arbitrary classes and code.
        doc = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointCorruptedError(
            f"{source}: cannot be read with torch.load(weights_only=True) ({exc}); only files "
            "holding tensors and plain containers can be converted safely"
        ) from None
    if _is_state_dict(doc):
        model, rest = doc, {}
    elif isinstance(doc, Mapping):
        rest = dict(doc)
        key, model = _pick(rest, _MODEL_KEYS)
        if key is None or not _is_state_dict(model):
            raise UnsupportedValueError(
                f"{source}: found no model state dict (looked for a bare state dict or the keys "
                f"{', '.join(_MODEL_KEYS)}); convert it yourself with save_checkpoint"
            )
        del rest[key]
    else:
        raise UnsupportedValueError(f"{source}: holds a {type(doc).__qualname__}, not a dict")
    parts: dict[str, object] = {}
    for name, keys in (("optimizer", _OPTIMIZER_KEYS), ("scheduler", _SCHEDULER_KEYS)):
        key, value = _pick(rest, keys)
        if key is not None:
            parts[name] = rest.pop(key)
    if step is None:
        key, value = _pick(rest, _STEP_KEYS)
        step = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
    return save_checkpoint(  # type: ignore[call-overload]
        model,
        parts.get("optimizer"),
        None,
        None,
        step,
        directory=directory,
        scheduler=parts.get("scheduler"),
        extra=rest or None,
        metadata={"converted_from": source.name},
        rng=False,
        overwrite=overwrite,
    )


def export_torch_checkpoint(checkpoint: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Write a verified checkpoint as one ``torch.save`` file (``model``, ``optimizer``, ...).

    Example:
        >>> export_torch_checkpoint("checkpoints", "model.pt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(checkpoint, restore_rng=False)
    doc: dict[str, object] = {"model": ckpt.model_state, "step": ckpt.step}
    for name, value in (
        ("optimizer", ckpt.optimizer_state),
        ("scheduler", ckpt.scheduler_state),
        ("config", ckpt.config),
        ("vocab", ckpt.vocab),
    ):
        if value is not None:
            doc[name] = value
    if ckpt.extra:
        doc["extra"] = ckpt.extra
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(doc, tmp)
    os.replace(tmp, target)
    return target

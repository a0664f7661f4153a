"""Arguments in the wrong place, caught before anything is read or written.

A scheduler passed as ``optimizer=`` would save (it has ``state_dict()``) and fail only at
resume; an optimizer passed as ``model=`` would fail with a list of every key. These checks
recognise the obvious swaps by type and say which argument the object belongs in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointUsageError

__all__ = ["check_extra", "check_load_arguments", "check_save_arguments"]


def _role(obj: object) -> str | None:
    """What ``obj`` evidently is: "model", "optimizer", "scheduler", "data" or None (unknown)."""
    if isinstance(obj, torch.nn.Module):
        return "model"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    if isinstance(obj, (torch.utils.data.DataLoader, torch.utils.data.Sampler)):
        return "data"
    return None


_WHERE = {
    "model": "model=",
    "optimizer": "optimizer=",
    "scheduler": "scheduler= (or extra=)",
    "data": "extra= (as a StatefulDataLoader or safeckpt.data.ResumableSampler)",
}


def _check(verb: str, given: dict[str, object], allowed: dict[str, set[str | None]]) -> None:
    for argument, obj in given.items():
        if obj is None:
            continue
        role = _role(obj)
        if role not in allowed[argument]:
            raise CheckpointUsageError(
                f"{verb}: {argument}= got {_article(type(obj).__qualname__)}, which is {_article(role)}, not "
                f"the {argument}; pass it as {_WHERE.get(role or '', 'the matching argument')}"
                if role is not None
                else f"{verb}: {argument}= got {_article(type(obj).__qualname__)}; expected {_article(argument)}"
            )


def check_save_arguments(model: object, optimizer: object, scheduler: object) -> None:
    """Raise :class:`CheckpointUsageError` when ``save_checkpoint`` got a model, optimizer or
    scheduler in another one's place (state dicts and unknown objects are accepted)."""
    _check(
        "save_checkpoint",
        {"model": model, "optimizer": optimizer, "scheduler": scheduler},
        {"model": {"model", None}, "optimizer": {"optimizer", None}, "scheduler": {"scheduler", None}},
    )


def check_load_arguments(model: object, optimizer: object, scheduler: object) -> None:
    """As :func:`check_save_arguments`, for ``load_checkpoint``: ``model=`` must be a module."""
    if model is not None and not isinstance(model, torch.nn.Module):
        role = _role(model)
        hint = f"; pass it as {_WHERE[role]}" if role is not None else ""
        raise CheckpointUsageError(
            f"load_checkpoint: model= must be a torch.nn.Module to load the weights into, got "
            f"{_article(type(model).__qualname__)}{hint}"
        )
    _check(
        "load_checkpoint",
        {"optimizer": optimizer, "scheduler": scheduler},
        {"optimizer": {"optimizer", None}, "scheduler": {"scheduler", None}},
    )


def check_extra(verb: str, extra: object) -> None:
    """Refuse a data loader or sampler in ``extra=`` that cannot report its position: a plain
    ``DataLoader`` or sampler has no ``state_dict()``, so its place in the data would be lost."""
    if not isinstance(extra, Mapping):
        return
    for name, obj in extra.items():
        if _role(obj) == "data" and not callable(getattr(obj, "state_dict", None)):
            raise CheckpointUsageError(
                f"{verb}: extra[{name!r}] is a {type(obj).__qualname__}, which has no state_dict(), "
                "so its position in the data cannot be saved. Use torchdata's "
                "torchdata.stateful_dataloader.StatefulDataLoader in place of DataLoader, or give "
                "your DataLoader sampler=safeckpt.data.ResumableSampler(dataset, ...) (or "
                "batch_sampler=) and pass that sampler in extra="
            )


def _article(role: str) -> str:
    return f"an {role}" if role[:1].lower() in "aeiou" else f"a {role}"

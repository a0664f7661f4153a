"""Canonical parameter names: a model's state-dict keys without the names its wrappers add.

``DistributedDataParallel`` and ``DataParallel`` put their model under ``module.``,
``torch.compile`` under ``_orig_mod.``, FSDP1 and activation checkpointing under
``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.``, at the top or anywhere inside.
A checkpoint stores the names the unwrapped model has (as torch.distributed.checkpoint's
``get_model_state_dict`` does), so it loads into the model wrapped or not, and a loader maps the
canonical names back onto whatever wrapping the target has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["canonical_names", "strip_wrapper_prefix"]

_ALWAYS_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Attribute names that only wrappers use: dropped wherever they appear."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes a checkpoint written by other tools (or older safeckpt) may carry on every key."""


def _wrapper_attribute(module: torch.nn.Module) -> str | None:
    """The attribute under which ``module`` holds the module it wraps, if it is a wrapper."""
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return "module"
    # torch.compile's OptimizedModule; matched by name so that torch._dynamo is never imported.
    if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        return "_orig_mod"
    return None


def _canonical(model: torch.nn.Module, key: str) -> str:
    parts = key.split(".")
    kept: list[str] = []
    module: torch.nn.Module | None = model
    for part in parts:
        wrapped_under = _wrapper_attribute(module) if module is not None else None
        child = getattr(module, "_modules", {}).get(part) if module is not None else None
        if part in _ALWAYS_WRAPPERS or (wrapped_under == part and child is not None):
            module = child
            continue
        kept.append(part)
        module = child  # None once past the last module: parameter and buffer names stay as they are
    return ".".join(kept)


def canonical_names(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """``{key: canonical key}`` for state-dict ``keys`` of ``model`` (identity when unwrapped)."""
    return {key: _canonical(model, key) for key in keys}


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state`` with a ``module.`` / ``_orig_mod.`` prefix removed from every key, when every
    key has it and the model's canonical names (``expected``) do not; else ``state`` unchanged.

    Checkpoints saved by other tools from a wrapped model carry the prefix; torch offers
    ``consume_prefix_in_state_dict_if_present`` for the same case.
    """
    wanted = set(expected)
    current = dict(state)
    changed = True
    while changed and current and not (current.keys() & wanted):
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in current):
                current = {k[len(prefix):]: v for k, v in current.items()}
                changed = True
                break
    return current if current.keys() & wanted else dict(state)

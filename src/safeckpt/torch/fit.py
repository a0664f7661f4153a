"""Does a saved state fit a live model or optimizer? Checked before anything is copied, so a
mismatch never leaves a model half-restored.

Names are compared canonically (see :mod:`safeckpt.torch.names`), so a checkpoint loads into
the model whether or not it is wrapped in DDP, DataParallel or ``torch.compile``. The result
maps the saved tensors onto the model's own keys and reports what ``strict=False`` skipped,
like torch's ``load_state_dict``; a non-strict load that would copy nothing is an error, never
a silent no-op. Messages stay a few lines long however big the model is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import CheckpointMismatchError
from .names import canonical_names, strip_wrapper_prefix

__all__ = ["ModelFit", "check_model", "check_optimizer"]

EXAMPLES = 3
"""How many keys a mismatch message names per kind of problem."""


@dataclass(frozen=True)
class ModelFit:
    """How a checkpoint's model state maps onto a model."""

    state: dict[str, torch.Tensor]
    """The saved tensors under the model's own state-dict keys (wrapper prefixes included)."""
    missing_keys: list[str]
    """Canonical names the model has and the checkpoint lacks (left as they were)."""
    unexpected_keys: list[str]
    """Canonical names the checkpoint has and the model lacks (not loaded)."""


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _listing(what: str, items: Sequence[str]) -> str:
    """``missing keys: a, b`` or, when long, ``28 missing keys, e.g. a, b, c``."""
    if len(items) <= EXAMPLES:
        return f"{what}: {', '.join(items)}"
    return f"{len(items)} {what}, e.g. {', '.join(items[:EXAMPLES])}"


def _details(items: Sequence[str], what: str) -> str:
    """``1 tensor differs in shape: a: ...`` or ``28 tensors differ in shape, e.g. a: ...; ...``."""
    if len(items) == 1:
        return f"1 tensor differs in {what}: {items[0]}"
    shown = "; ".join(items[:EXAMPLES])
    return f"{len(items)} tensors differ in {what}" + (f": {shown}" if len(items) <= EXAMPLES else f", e.g. {shown}")


def check_model(
    model: torch.nn.Module, saved: Mapping[str, torch.Tensor], *, strict: bool, source: str
) -> ModelFit:
    """Map ``saved`` (canonical names) onto ``model``; raise :class:`CheckpointMismatchError`
    naming what does not fit: missing or unexpected keys (when ``strict``), shapes (always),
    dtypes (when ``strict``; otherwise torch casts), or nothing at all in common."""
    own = model.state_dict()
    to_own = {canonical: key for key, canonical in canonical_names(model, own).items()}
    saved = strip_wrapper_prefix(saved, to_own)
    missing = [name for name in to_own if name not in saved]
    unexpected = [name for name in saved if name not in to_own]
    shapes: list[str] = []
    dtypes: list[str] = []
    for name, tensor in saved.items():
        key = to_own.get(name)
        if key is None:
            continue
        target = own[key]
        if target.shape != tensor.shape:
            shapes.append(f"{name}: checkpoint has {_describe(tensor)}, model has {_describe(target)}")
        elif strict and target.dtype != tensor.dtype:
            dtypes.append(f"{name}: checkpoint has {_describe(tensor)}, model has {_describe(target)}")
    kind = type(model).__qualname__
    if shapes:  # strict=False raises the same, so it is not offered
        problems = [_details(shapes, "shape")]
        if strict and (missing or unexpected):
            problems += [_listing(w, k) for w, k in (("missing keys", missing), ("unexpected keys", unexpected)) if k]
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not fit {kind}: {'; '.join(problems)}. "
            "Build the model with the configuration it was saved with"
        )
    if saved and own and len(unexpected) == len(saved):
        raise CheckpointMismatchError(
            f"{source}: no tensor of the checkpoint matches {kind} (checkpoint has "
            f"{_listing('keys', list(saved))}; model has {_listing('keys', list(to_own))}); nothing "
            "would be loaded. Pass the model the checkpoint was saved from"
        )
    problems = []
    if strict:
        problems = [_listing(w, k) for w, k in (("missing keys", missing), ("unexpected keys", unexpected)) if k]
    if dtypes:
        problems.append(_details(dtypes, "dtype"))
    if problems:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not fit {kind}: {'; '.join(problems)}. Build the model with "
            "the configuration it was saved with, or pass strict=False to load the tensors that "
            "match (dtypes are then cast; Checkpoint.missing_keys / unexpected_keys list the rest)"
        )
    state = {to_own[name]: tensor for name, tensor in saved.items() if name in to_own}
    return ModelFit(state=state, missing_keys=missing, unexpected_keys=unexpected)


def check_optimizer(optimizer: torch.optim.Optimizer, state: object, *, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` if ``state`` was not saved from a like optimizer."""
    def fail(what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{source}: optimizer state does not fit {type(optimizer).__qualname__}: {what}. "
            "Create the optimizer over the same parameters, in the same groups, as when saving"
        )

    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise fail("it has no param_groups")
    saved, current = state["param_groups"], optimizer.param_groups
    if len(saved) != len(current):
        raise fail(f"checkpoint has {len(saved)} parameter groups, optimizer has {len(current)}")
    params: list[torch.Tensor] = []
    for index, (s, c) in enumerate(zip(saved, current, strict=True)):
        count = len(s.get("params", [])) if isinstance(s, dict) else -1
        if count != len(c["params"]):
            raise fail(f"group {index} has {count} parameters in the checkpoint, {len(c['params'])} here")
        params.extend(c["params"])
    ids = [pid for g in saved for pid in g["params"]]
    for pid, pstate in (state.get("state") or {}).items():
        if pid not in ids:
            raise fail(f"state for unknown parameter id {pid!r}")
        param = params[ids.index(pid)]
        for name in _PARAM_SHAPED.intersection(pstate if isinstance(pstate, dict) else ()):
            value = pstate[name]
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise fail(
                    f"{name} of parameter {pid} has shape {tuple(value.shape)}, "
                    f"the parameter has {tuple(param.shape)}"
                )


_PARAM_SHAPED = frozenset(
    "exp_avg exp_avg_sq max_exp_avg_sq momentum_buffer square_avg acc_delta sum exp_inf ax "
    "prev step_size grad_avg".split()
)
"""Per-parameter buffers of torch.optim optimizers that always have the parameter's shape."""

"""User objects <-> state trees: what gets saved from a model, optimizer, config, vocabulary or
any stateful object, and how a loaded state is checked against, then copied into, live objects.

Checks run for every target before anything is copied, so a mismatch never leaves a model
half-restored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from ..configs import json_plain
from ..errors import CheckpointMismatchError, UnsupportedValueError
from .names import canonical_names
from .tensors import TensorCollector

__all__ = [
    "check_optimizer",
    "model_archive",
    "restore_types",
    "state_of",
    "vocab_to_json",
]

ALIASES_KEY = "safeckpt.aliases"
"""safetensors ``__metadata__`` key holding a JSON map ``{alias: stored name}`` of tied tensors."""


def model_archive(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> tuple[TensorCollector, dict[str, str]]:
    """Collect a model's state dict under canonical names (without the ``module.`` /
    ``_orig_mod.`` of DDP, DataParallel or ``torch.compile``, see :mod:`.names`); tied tensors
    are stored once and their aliases returned."""
    if isinstance(model, torch.nn.Module):
        own = model.state_dict()
        names = canonical_names(model, own)
        state: Mapping[str, object] = {names[key]: value for key, value in own.items()}
    elif isinstance(model, Mapping):
        state = model
    else:
        raise UnsupportedValueError(
            f"model: expected a torch.nn.Module or a state dict, got {type(model).__qualname__}"
        )
    archive, aliases = TensorCollector("model"), {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise UnsupportedValueError(
                f"model[{name!r}]: model state must map str to tensors, found "
                f"{type(tensor).__qualname__} (move non-tensor module state into extra=)"
            )
        stored = archive.add_named(name, tensor)
        if stored != name:
            aliases[name] = stored
    return archive, aliases


def state_of(obj: object, label: str) -> object:
    """The state tree of ``obj``: its ``state_dict()`` if it has one, else ``obj`` itself."""
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, Mapping):
        return state_dict()
    return obj


def restore_types(target: object) -> None:
    """Give back container types the format stores as plain ones, after ``load_state_dict``.

    State trees keep dicts, not their subclasses: ``MultiStepLR.milestones`` is saved from a
    ``collections.Counter`` and loads as a dict, which breaks ``step(epoch)`` (it calls
    ``.elements()``). Rebuild it, also inside ``SequentialLR`` / ``ChainedScheduler``.
    """
    if isinstance(target, torch.optim.lr_scheduler.MultiStepLR) and not isinstance(target.milestones, Counter):
        target.milestones = Counter(target.milestones)
    for inner in getattr(target, "_schedulers", None) or ():
        restore_types(inner)


def vocab_to_json(vocab: object) -> object:
    """A token list or a token->id dict, as JSON."""
    if not isinstance(vocab, (list, tuple, Mapping)):
        raise UnsupportedValueError(
            f"vocab: expected a list of tokens or a dict, got {type(vocab).__qualname__}"
        )
    return json_plain(vocab, "vocab")


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

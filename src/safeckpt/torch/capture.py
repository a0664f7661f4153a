"""User objects -> state trees: what gets saved from a model, an optimizer, a vocabulary or any
stateful object (the capture half of a save; the checks of a load are in :mod:`.fit`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..configs import json_plain
from ..errors import UnsupportedValueError
from ..pipeline.read import MODEL_ALIASES_KEY
from .names import canonical_names
from .tensors import TensorCollector

__all__ = ["MODEL_ALIASES_KEY", "model_archive", "state_of", "vocab_to_json"]


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


def vocab_to_json(vocab: object) -> object:
    """A token list or a token->id dict, as JSON."""
    if not isinstance(vocab, (list, tuple, Mapping)):
        raise UnsupportedValueError(
            f"vocab: expected a list of tokens or a dict, got {type(vocab).__qualname__}"
        )
    return json_plain(vocab, "vocab")

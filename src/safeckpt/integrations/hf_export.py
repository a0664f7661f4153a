"""``export_hf``: a verified checkpoint -> a Hugging Face model folder (``model.safetensors`` +
``config.json``), the layout ``AutoModelForCausalLM.from_pretrained(folder)`` reads. Used by
``safeckpt export CKPT OUT --to hf``. Needs neither transformers nor pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configs import TRANSFORMERS_CONFIG_KEY
from ..errors import CheckpointExistsError, UnsupportedValueError
from ..storage.posix_write import write_new_file
from ..torch.loader import Checkpoint, load_checkpoint

__all__ = ["export_hf", "write_hf_folder"]

_WRITTEN = ("model.safetensors", "config.json")


def export_hf(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    model_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the weights and config of a checkpoint as a Hugging Face model folder ``out``.

    ``checkpoint`` is a path (verified while loading) or a loaded :class:`Checkpoint`.
    ``model_type`` (e.g. ``"gpt2"``) is needed only when the checkpoint's config does not record
    it (a config saved as a plain dict). Tied weights are written once, as transformers does.
    An ``out`` that already holds ``model.safetensors`` or ``config.json`` is refused with
    :class:`CheckpointExistsError` unless ``overwrite``.

    Example:
        >>> export_hf("out/checkpoint-500", "exported")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("exported")  # doctest: +SKIP
    """
    out = Path(out)
    if not overwrite and any(os.path.lexists(out / name) for name in _WRITTEN):
        raise CheckpointExistsError(
            f"{out}: already holds {' or '.join(_WRITTEN)}; pass overwrite=True (CLI: --overwrite) or "
            "choose another folder"
        )
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, restore_rng=False)
    if not isinstance(ckpt.config, dict):
        raise UnsupportedValueError(
            f"{ckpt.path}: has no config, so there is no config.json to write; save the model's "
            "transformers config as config= (safeckpt.hf.Trainer does)"
        )
    recorded = ckpt.metadata.get(TRANSFORMERS_CONFIG_KEY)
    kind = model_type or ckpt.config.get("model_type") or (recorded.get("model_type") if isinstance(recorded, dict) else None)
    if not isinstance(kind, str) or not kind:
        raise UnsupportedValueError(
            f"{ckpt.path}: its config has no model_type, so transformers could not tell which model "
            "it describes; pass model_type= (CLI: --model-type), e.g. 'gpt2'"
        )
    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in ckpt.model_state.items():  # stored tensors come before their aliases
        if id(tensor) not in seen:
            seen.add(id(tensor))
            weights[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    write_new_file(out / "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}), overwrite=True)
    config = json.dumps({**ckpt.config, "model_type": kind}, indent=2, sort_keys=True) + "\n"
    write_new_file(out / "config.json", [config.encode()], overwrite=True)
    return out


def write_hf_folder(checkpoint: Checkpoint, target: Path, *, overwrite: bool, model_type: str | None = None) -> Path:
    """:func:`export_hf` with the signature of an ``EXPORT_TARGETS`` writer (``--to hf``,
    ``--model-type``)."""
    return export_hf(checkpoint, target, model_type=model_type, overwrite=overwrite)

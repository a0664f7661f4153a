"""``import_hf_checkpoint``: a stock ``transformers.Trainer`` ``checkpoint-N`` folder -> a safeckpt
checkpoint (``safeckpt convert checkpoint-N OUT``), without importing transformers.

Like :mod:`safeckpt.convert`, this is the only kind of module that touches pickle-based files,
and it is never on the load path of a safeckpt checkpoint. ``.pt`` / ``.pth`` / ``.bin`` files are
read with ``torch.load(weights_only=True)`` only; a file that needs more (arbitrary pickled
objects) is refused, naming it. ``training_args.bin`` always holds a pickled ``TrainingArguments``
object and is not training state: it is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import CheckpointCorruptedError, CheckpointNotFoundError, UnsupportedValueError
from ..format.manifest import MANIFEST_NAME
from ..storage.local import refuse_to_replace
from ..torch.plan import plan_trees
from ..torch.saver import write_checkpoint

__all__ = ["import_hf_checkpoint"]

_SKIPPED = {"training_args.bin": "it holds a pickled TrainingArguments object, which is not training state"}
_STATE_FILES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler", "rng_state.pth": "rng"}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TEXT_SUFFIXES = (".json", ".txt", ".model", ".jinja")
"""Other files of a checkpoint folder (tokenizer, generation config) kept as verified documents."""


def _torch_load(path: Path, *, numpy: bool = False) -> object:
    """``torch.load(weights_only=True)``; ``numpy`` also allows NumPy arrays (RNG state), as
    transformers itself does when it reads ``rng_state.pth``."""
    allowed: list[Any] = []
    if numpy:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsupportedValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc)[:300]}); safeckpt never unpickles arbitrary objects, so it refuses this file. "
            "Delete it from a copy of the folder to convert the rest"
        ) from None


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    for index_name, single in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise CheckpointCorruptedError(f"{index}: shard name {shard!r} points outside the folder")
                part = _torch_load(folder / shard) if single else load_file(folder / shard)
                if not isinstance(part, Mapping):
                    raise UnsupportedValueError(f"{folder / shard}: is not a state dict")
                state.update(part)
            return state
    if (folder / "pytorch_model.bin").is_file():
        loaded = _torch_load(folder / "pytorch_model.bin")
        if isinstance(loaded, dict):
            return loaded
        raise UnsupportedValueError(f"{folder / 'pytorch_model.bin'}: is not a state dict")
    raise CheckpointNotFoundError(
        f"{folder}: has no model weights (looked for {', '.join(_WEIGHTS)}); is it a transformers checkpoint folder?"
    )


def _rng_tree(state: object, source: Path) -> dict[str, object]:
    """transformers' ``rng_state.pth`` layout -> safeckpt's RNG tree (see :mod:`safeckpt.rng`)."""
    if not isinstance(state, dict) or not {"python", "numpy", "cpu"} <= set(state):
        raise UnsupportedValueError(f"{source}: expected the keys python, numpy and cpu of transformers' RNG state")
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tree: dict[str, object] = {
        "python": state["python"],
        "torch": state["cpu"],
        "numpy": (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "generators": {},
    }
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor):
        tree["cuda"] = [cuda]
    elif isinstance(cuda, (list, tuple)):
        tree["cuda"] = list(cuda)
    return tree


def import_hf_checkpoint(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Convert a stock ``transformers.Trainer`` ``checkpoint-N`` folder into the safeckpt
    checkpoint folder ``target``; returns ``target``.

    Weights, config, optimizer, scheduler, scaler, RNG state and ``trainer_state.json`` are kept,
    so ``safeckpt.hf.Trainer(...).train(resume_from_checkpoint=target)`` continues the run.

    Example:
        >>> import_hf_checkpoint("out/checkpoint-500", "safe/checkpoint-500")  # doctest: +SKIP
    """
    folder, target = Path(source), Path(target)
    refuse_to_replace(target)  # before reading: converting into its own folder would delete it
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: is not a folder; pass a transformers checkpoint-N folder")
    if (folder / MANIFEST_NAME).is_file():
        raise UnsupportedValueError(f"{folder}: is already a safeckpt checkpoint; there is nothing to convert")
    states: dict[str, object] = {}
    documents: dict[str, bytes] = {}
    extra: dict[str, object] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or name in _WEIGHTS or name.startswith("."):
            continue
        if name in _SKIPPED:
            warnings.warn(f"{path}: skipped; {_SKIPPED[name]}", UserWarning, stacklevel=2)
        elif name in _STATE_FILES:
            states[_STATE_FILES[name]] = _torch_load(path, numpy=name == "rng_state.pth")
        elif name.endswith((".pt", ".pth", ".bin")):
            extra[name] = _torch_load(path)  # e.g. rng_state_1.pth of other ranks: kept, as state
        elif name.endswith(_TEXT_SUFFIXES) and not name.endswith(".index.json"):
            documents[name] = path.read_bytes()
    config = json.loads(documents.pop("config.json")) if "config.json" in documents else None
    trainer_state = json.loads(documents.get("trainer_state.json", b"{}"))
    step = trainer_state.get("global_step") if isinstance(trainer_state, dict) else None
    if not isinstance(step, int) or step < 0:
        digits = folder.name.rsplit("-", 1)[-1]
        step = int(digits) if digits.isdigit() else 0
    if "scaler" in states:
        extra["scaler"] = states.pop("scaler")
    if "rng" in states:
        states["rng"] = _rng_tree(states["rng"], folder / "rng_state.pth")
    plan = plan_trees(
        _load_weights(folder), {**states, "extra": extra or None}, step, config=config,
        metadata={"converted_from": f"transformers checkpoint {folder.name}"},
    )  # fmt: skip
    plan.documents.update(documents)
    written = write_checkpoint(plan, path=target, overwrite=overwrite)
    assert isinstance(written, Path)  # a local path in, a local path out
    return written

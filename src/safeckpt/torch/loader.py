"""``load_checkpoint``: locate -> parse manifest -> read and verify every file -> parse the
verified bytes -> unflatten -> check against the targets -> restore into them.

Nothing is deserialized until every file the manifest lists has been read and its size and
SHA-256 checked, and what is parsed is the very buffer that was hashed. No pickle anywhere.
With ``verify=False`` the files are memory-mapped instead of read (sizes and headers are still
checked strictly), so only the bytes actually used are ever read.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import (
    CheckpointError,
    CheckpointMismatchError,
    MissingRNGStateWarning,
)
from ..format.documents import load_json
from ..format.tree import TREE_NAMES
from ..pipeline.read import (
    CheckpointContents,
    decode_tree,
    is_sharded,
    locate_checkpoint,
    model_aliases,
    read_checkpoint_files,
)
from ..storage.base import Buffer, Location
from .fit import check_model, check_optimizer
from .rng import restore_rng as restore_rng_state
from .tensors import tensors_from_buffer
from .usage import check_extra, check_load_arguments

__all__ = ["Checkpoint", "load_checkpoint", "locate_checkpoint", "read_checkpoint_files"]

_MISSING_RNG = (
    "it was saved with rng=False (or by a tool that does not capture RNG state); pass "
    "restore_rng=False to load it anyway, knowing the resumed run will not repeat the original's "
    "random draws"
)


@dataclass(repr=False)
class Checkpoint(CheckpointContents[torch.Tensor]):
    """Everything a checkpoint holds, as returned by :func:`load_checkpoint`.

    ``missing_keys`` / ``unexpected_keys`` are what a ``strict=False`` load into ``model=``
    skipped (canonical names, as in torch's ``load_state_dict``); empty otherwise."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _decode_tree(
    name: str,
    buffers: Mapping[str, Buffer],
    folder: Location,
    device: str | torch.device,
    *,
    aligned: bool = True,
    copy: bool = False,
) -> object | None:
    # Tensors handed to an optimizer must be 64-byte aligned like torch's own allocations: some
    # kernels (LBFGS's dot products) round differently on other addresses, and a resumed run
    # would drift in the last bits. Verified buffers are aligned in place (at most a memmove).
    def make_tensors(buffer: Buffer, source: str) -> dict[str, torch.Tensor]:
        return tensors_from_buffer(buffer, source=source, device=device, aligned=aligned, copy=copy)[0]

    return decode_tree(name, buffers, folder, make_tensors)


def _model_state(buffers: Mapping[str, Buffer], folder: Location, device: str | torch.device) -> dict[str, torch.Tensor]:
    source = str(folder / "model.safetensors")
    tensors, metadata = tensors_from_buffer(buffers["model.safetensors"], source=source, device=device)
    for alias, target in model_aliases(metadata, tensors, source=source).items():
        tensors[alias] = tensors[target]
    return tensors


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



def load_checkpoint(
    path: str | os.PathLike[str] | Location,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: object | None = None,
    extra: Mapping[str, object] | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    verify: bool = True,
    restore_rng: bool | Mapping[str, object] = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Verify a checkpoint, restore it into the given objects, and return all it holds.

    Args:
        path: a checkpoint folder, its ``manifest.json``, or a root holding ``step-*`` folders
            (the newest committed one is loaded); or an fsspec URL such as
            ``s3://bucket/run`` (needs ``safeckpt[remote]``).
        model: module to load the weights into (tied weights stay tied).
        optimizer: optimizer to load the state into; must be built over the same parameters.
        scheduler: LR scheduler, ``GradScaler`` or other object with ``load_state_dict``.
        extra: objects with ``load_state_dict`` (or generators) to restore in place, by name.
        map_location: device for the returned tensors.
        strict: require the model's keys, shapes and dtypes to match exactly.
        verify: check every file's SHA-256 (sizes and headers are always checked). With
            ``False`` the files are memory-mapped (private, copy-on-write) and read lazily: for
            storage you trust; returned tensors may be views of the mapped files.
        restore_rng: restore the captured RNG state (default); a mapping of names to
            generators restores those too. Raises if the checkpoint has no RNG state.
        storage_options: options of the fsspec file system of a URL ``path`` (e.g.
            ``{"endpoint_url": ...}`` for s3fs).

    Returns:
        A :class:`Checkpoint` with step, config, vocab and all state trees.

    Raises:
        CheckpointNotFoundError: the checkpoint or one of its files is missing.
        CheckpointCorruptedError: a file failed verification or parsing.
        CheckpointMismatchError: the state does not fit ``model`` / ``optimizer`` / ``scheduler``.

    Example:
        >>> ckpt = load_checkpoint("checkpoints", model=model, optimizer=opt)  # doctest: +SKIP
        >>> ckpt.step  # doctest: +SKIP
        100
    """
    check_load_arguments(model, optimizer, scheduler)
    check_extra("load_checkpoint", extra)
    folder = locate_checkpoint(path, storage_options=storage_options)
    if (torch.distributed.is_available() and torch.distributed.is_initialized()) or is_sharded(
        folder, storage_options=storage_options
    ):
        from ..distributed import api as sharded  # sharded checkpoints, FSDP2/DTensor/DDP models

        if sharded.handles_load(path, model, storage_options=storage_options):
            return sharded.load_checkpoint(
                path, model, optimizer, scheduler=scheduler, extra=extra, map_location=map_location, strict=strict,
                verify=verify, restore_rng=restore_rng, storage_options=storage_options,
            )  # fmt: skip
    manifest, buffers = read_checkpoint_files(folder, verify=verify, storage_options=storage_options)
    device = map_location
    model_state = _model_state(buffers, folder, device)
    # Unverified buffers are lazy memory maps: state restored into live objects must not stay
    # backed by the files for the rest of the run (a page written there is copied then, one
    # truncated faults), so a tree is copied when it is restored, and only then.
    restored = {"optimizer": optimizer is not None, "scheduler": scheduler is not None, "extra": bool(extra)}
    trees = {
        name: _decode_tree(name, buffers, folder, device, aligned=verify, copy=not verify and restored.get(name, False))
        for name in TREE_NAMES
    }
    config = load_json(bytes(buffers["config.json"]), source=str(folder / "config.json")) if "config.json" in buffers else None
    vocab = load_json(bytes(buffers["vocab.json"]), source=str(folder / "vocab.json")) if "vocab.json" in buffers else None
    del buffers
    extra_state = trees["extra"] if isinstance(trees["extra"], dict) else {}

    # Check every target before copying into any of them.
    fit = None if model is None else check_model(model, model_state, strict=strict, source=str(folder))
    if optimizer is not None:
        if trees["optimizer"] is None:
            raise CheckpointMismatchError(f"{folder}: has no optimizer state; load without optimizer=")
        check_optimizer(optimizer, trees["optimizer"], source=str(folder))
    if scheduler is not None and trees["scheduler"] is None:
        raise CheckpointMismatchError(f"{folder}: has no scheduler state; load without scheduler=")
    for name in extra or {}:
        if name not in extra_state:
            raise CheckpointMismatchError(
                f"{folder}: has no extra state {name!r} (saved: {sorted(map(str, extra_state))})"
            )
    if trees["rng"] is None and restore_rng is not False:
        raise CheckpointMismatchError(f"{folder}: has no RNG state: {_MISSING_RNG}")
    if trees["rng"] is None and (optimizer is not None or scheduler is not None):
        # The user opted out of the error but is resuming training: say so loudly, once per load.
        warnings.warn(
            f"{folder}: has no RNG state (saved with rng=False); training resumes with this "
            "process's random state, so dropout, shuffling and sampling will differ from the "
            "original run",
            MissingRNGStateWarning,
            stacklevel=2,
        )

    if model is not None and fit is not None:
        model.load_state_dict(fit.state, strict=strict)
    if optimizer is not None:
        _restore_in_place(optimizer, trees["optimizer"], f"{folder}: optimizer")
    if scheduler is not None:
        _restore_in_place(scheduler, trees["scheduler"], f"{folder}: scheduler")
    for name, target in (extra or {}).items():
        _restore_in_place(target, extra_state[name], f"{folder}: extra[{name!r}]")
    if restore_rng is not False:
        restore_rng_state(
            trees["rng"], restore_rng if isinstance(restore_rng, Mapping) else None, source=str(folder)
        )
    return Checkpoint(
        path=folder,
        step=manifest.step,
        config=config,
        vocab=vocab,
        model_state=model_state,
        optimizer_state=trees["optimizer"],
        extra=extra_state,
        metadata=dict(manifest.metadata),
        manifest=manifest,
        scheduler_state=trees["scheduler"],
        rng_state=trees["rng"],
        missing_keys=[] if fit is None else fit.missing_keys,
        unexpected_keys=[] if fit is None else fit.unexpected_keys,
    )


def _restore_in_place(target: object, state: object, label: str) -> None:
    load = getattr(target, "load_state_dict", None)
    if callable(load):
        try:
            load(state)
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
            # The checks before copying cannot know every key a torch optimizer or scheduler
            # expects; a state that passes them and still does not fit must not escape as KeyError.
            raise CheckpointMismatchError(
                f"{label}: the saved state does not fit {type(target).__qualname__} "
                f"({type(exc).__name__}: {str(exc)[:200]}); the checkpoint is damaged or was saved "
                "from a different kind of object"
            ) from exc
        restore_types(target)
    else:
        raise CheckpointMismatchError(
            f"{label}: cannot restore into {type(target).__qualname__}; pass objects with "
            "load_state_dict(), or read the value from Checkpoint.extra"
        )

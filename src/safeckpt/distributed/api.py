"""``save_checkpoint`` / ``load_checkpoint`` for sharded models: what the public API calls when a
process group is initialised and the model is FSDP2/DTensor-sharded or DDP-wrapped, and what
``load_checkpoint`` calls for a sharded checkpoint in any process.

Every rank calls these together. Checks that can fail (a damaged file, a model that does not
fit, RNG state that cannot be mapped) run on every rank and are agreed on before anything is
restored, so either every rank restores or every rank raises the same error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..errors import (
    CheckpointError,
    CheckpointMismatchError,
    MissingRNGStateWarning,
    UnsupportedValueError,
)
from . import dcp_calls
from ._core import (
    TORCH_DTYPES,
    PendingSave,
    SaveOptions,
    StorageLocation,
    as_location,
    core_loader,
    core_saver,
    load_json,
    locate_checkpoint,
    plan_documents,
    standard_trees,
)
from ._core import restore_rng as restore_rng_state
from .layout import PER_RANK, decode_tree, encode_tree, group_rank, has_prefix, rank_key, template
from .reader import Reader, is_sharded
from .sharding import Sharding
from .writer import WriterOptions

__all__ = ["handles_load", "handles_save", "is_coordinator", "load_checkpoint", "process_group_of", "save_checkpoint"]

T = TypeVar("T")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_sharded_model(model: object) -> bool:
    if isinstance(model, DistributedDataParallel):
        return True
    if isinstance(model, torch.nn.Module):
        return any(isinstance(p, DTensor) for p in model.parameters())
    return False


def handles_save(model: object) -> bool:
    """Whether ``save_checkpoint(model, ...)`` must go through DCP (sharded or DDP model in a job)."""
    return _initialised() and _is_sharded_model(model)


def handles_load(
    path: str | os.PathLike[str] | StorageLocation, model: object, *, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Whether ``load_checkpoint(path, model)`` is this module's: a sharded checkpoint, or a sharded
    or DDP model in a job."""
    if handles_save(model):
        return True
    try:
        return is_sharded(locate_checkpoint(path, storage_options=storage_options), storage_options=storage_options)
    except CheckpointError:
        return False  # the core loader reports it


def process_group_of(model: object) -> dist.ProcessGroup | None:
    """The ranks a model is spread over: DDP's group, a 1-D device mesh's group, else the job."""
    if not _initialised():
        return None
    if isinstance(model, DistributedDataParallel):
        return model.process_group
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            if isinstance(param, DTensor) and param.device_mesh.ndim == 1:
                return param.device_mesh.get_group()
    return None


def save_checkpoint(
    model: object, optimizer: object | None, config: object | None, vocab: object | None, step: int, options: SaveOptions
) -> StorageLocation | PendingSave:
    """``safeckpt.save_checkpoint`` for a sharded or DDP model; called on every rank, with the same
    ``options.directory``/``options.path`` (a shared folder or an fsspec URL).

    The plan is the single-process one (:mod:`safeckpt.torch.plan`) laid out for DCP: the model
    and optimizer as DCP's state dicts, each named tree encoded (:func:`~.layout.encode_tree`)
    once (``scheduler``) or per rank (:data:`~.layout.PER_RANK` trees), the documents and the
    metadata written by the coordinator."""
    final = core_saver().checkpoint_target(options.directory, options.path, step)  # directory/step-N, or path
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedValueError(f"model: a sharded save needs the nn.Module itself, got {type(model).__qualname__}")
    group = process_group_of(model)
    rank, _ = group_rank(group)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedValueError(
            f"optimizer: a sharded save needs the torch.optim.Optimizer itself, got {type(optimizer).__qualname__}"
        )
    trees = standard_trees(None, options)  # DCP shards the optimizer's state itself
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    own = {name: encode_tree(tree, name) for name, tree in trees.items() if name in PER_RANK}
    state.update((name, encode_tree(tree, name)) for name, tree in trees.items() if name not in PER_RANK)
    if own:
        state[rank_key(rank)] = own
    documents, metadata = plan_documents(config, vocab, options.metadata)
    writer = WriterOptions(
        step=step, name=final.name, overwrite=options.overwrite, documents=documents, metadata=metadata,
        storage_options=options.storage_options,
    )  # fmt: skip
    if options.async_:
        return dcp_calls.async_save(state, final.parent, process_group=group, on_commit=options.on_commit, **writer)
    done = dcp_calls.save(state, final.parent, process_group=group, **writer)
    if options.on_commit is not None:
        options.on_commit(done)
    return done


def _locate(
    path: str | os.PathLike[str] | StorageLocation,
    group: dist.ProcessGroup | None,
    *,
    together: bool,
    storage_options: Mapping[str, Any] | None,
) -> StorageLocation:
    """The checkpoint folder, as the coordinator resolves it (a root's newest may change)."""
    if not (together and _initialised()):
        return locate_checkpoint(path, storage_options=storage_options)
    found: list[object] = [None]
    if dist.get_rank(group) == 0:
        try:
            found[0] = str(locate_checkpoint(path, storage_options=storage_options))
        except CheckpointError as exc:
            found[0] = exc
    dist.broadcast_object_list(found, group_src=0, group=group)
    if isinstance(found[0], BaseException):
        raise found[0]
    return as_location(str(found[0]))


def _check_model(model_state: Mapping[str, Any], sharding: Sharding, *, strict: bool, source: str) -> None:
    """Keys, shapes and dtypes of the model against the checkpoint, before anything is copied."""
    saved = {
        path[1]: sharding.tensors.get(fqn)
        for fqn, path in sharding.paths.items()
        if path[0] == "model" and len(path) == 2
    }
    problems = []
    for key, value in model_state.items():
        md = saved.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if md is None:
            problems.append(f"{key!r} is missing from the checkpoint")
        elif md.shape != tuple(value.shape) or TORCH_DTYPES[md.dtype] != value.dtype:
            problems.append(
                f"{key!r} is {TORCH_DTYPES[md.dtype]} {md.shape} in the checkpoint, "
                f"{value.dtype} {tuple(value.shape)} in the model"
            )
    if strict:
        problems += [f"unexpected key {key!r} in the checkpoint" for key in sorted(set(saved) - set(model_state))]
    if problems:
        raise CheckpointMismatchError(f"{source}: the model does not fit: {'; '.join(problems[:10])}")


def _documents(folder: StorageLocation, reader: Reader) -> dict[str, object]:
    assert reader.manifest is not None
    entries = [e for e in reader.manifest.files if e.name in ("config.json", "vocab.json")]
    buffers = reader.read_files(entries)
    return {name: load_json(bytes(data), source=str(folder / name)) for name, data in buffers.items()}


def _placed(tree: Any, device: str | torch.device) -> Any:
    """``tree`` with every tensor on ``device`` (those already there are kept, not copied)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: _placed(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        placed = [_placed(value, device) for value in tree]
        return tuple(placed) if isinstance(tree, tuple) else placed
    return tree


_MISSING_RNG = (
    "pass restore_rng=False to load it anyway, knowing the resumed run will not repeat the "
    "original's random draws"
)


def load_checkpoint(
    path: str | os.PathLike[str] | StorageLocation,
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
) -> Any:
    """``safeckpt.load_checkpoint`` for a sharded checkpoint or a sharded/DDP model.

    With a sharded or DDP model in a job, every rank of its group calls it together; otherwise
    (a plain model, or none) this process loads alone, assembling full tensors.

    ``map_location``: in a process loading alone, the device of every tensor of the returned
    ``Checkpoint`` (model, optimizer, scheduler and extra state), as for a single-process
    checkpoint; the model and optimizer given are restored in place on their own devices. With a
    process group it is ignored: each rank loads into its own shards of the model and optimizer,
    on their devices, and the returned model and optimizer state are those (DTensor) state dicts.
    """
    together = model is not None and handles_save(model)
    group = process_group_of(model) if together else None
    folder = _locate(path, group, together=together, storage_options=storage_options)
    if not is_sharded(folder, storage_options=storage_options):
        from .single import load_single_into_sharded

        assert model is not None
        return load_single_into_sharded(
            folder, model, optimizer, group=group, scheduler=scheduler, extra=extra, strict=strict,
            verify=verify, restore_rng=restore_rng, storage_options=storage_options,
        )  # fmt: skip
    rank, world = group_rank(group) if together else (0, 1)
    reader = Reader(folder, verify=verify, storage_options=storage_options)
    dcp_calls.agree(group, reader.read_metadata, together=together)
    sharding, manifest = reader.sharding, reader.manifest
    assert sharding is not None and manifest is not None
    own = rank_key(rank)
    mapped = sharding.world_size == world

    def check() -> None:
        source = str(folder)
        if model is not None:
            _check_model(get_model_state_dict(model), sharding, strict=strict, source=source)
        if optimizer is not None and not has_prefix(sharding, "optimizer"):
            raise CheckpointMismatchError(f"{source}: has no optimizer state; load without optimizer=")
        if scheduler is not None and not has_prefix(sharding, "scheduler"):
            raise CheckpointMismatchError(f"{source}: has no scheduler state; load without scheduler=")
        ranks = f"it was saved on {sharding.world_size} rank(s) and is loaded on {world}"
        if extra and not mapped:
            raise CheckpointMismatchError(
                f"{source}: per-rank extra state cannot be restored: {ranks}, so ranks do not map one "
                "to one; load without extra= and rebuild the data position for the new world size"
            )
        if extra and not has_prefix(sharding, own, "extra"):
            raise CheckpointMismatchError(f"{source}: has no extra state for {own}; load without extra=")
        if restore_rng is not False and not mapped:
            raise CheckpointMismatchError(f"{source}: per-rank RNG state cannot be restored: {ranks}; {_MISSING_RNG}")
        if restore_rng is not False and not has_prefix(sharding, own, "rng"):
            raise CheckpointMismatchError(f"{source}: has no RNG state (saved with rng=False); {_MISSING_RNG}")

    dcp_calls.agree(group, check, together=together)
    prefixes = ["scheduler"] + ([own] if mapped else [])
    if model is None:
        prefixes += ["model", "optimizer"]
    state: dict[str, Any] = template(sharding, prefixes)
    if model is not None:
        state["model"] = get_model_state_dict(model)
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp_calls.load(state, folder, process_group=group, reader=reader, single_process=not together)
    documents = dcp_calls.agree(group, lambda: _documents(folder, reader), together=together)

    source = str(folder)
    trees = {
        name: decode_tree(entry, source=f"{source} [{name}]") if entry is not None else None
        for name, entry in (
            ("scheduler", state.get("scheduler")),
            ("rng", state.get(own, {}).get("rng")),
            ("extra", state.get(own, {}).get("extra")),
        )
    }
    if not together:  # a process loading alone: the returned state goes to map_location
        for name in ("scheduler", "extra"):
            trees[name] = _placed(trees[name], map_location)
    if restore_rng is False and trees["rng"] is None and (optimizer is not None or scheduler is not None):
        warnings.warn(
            f"{folder}: no RNG state restored on rank {rank}; training resumes with this process's "
            "random state, so dropout, shuffling and sampling will differ from the original run",
            MissingRNGStateWarning,
            stacklevel=3,
        )
    if model is not None:
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
    loader = core_loader()
    if scheduler is not None:
        loader._restore_in_place(scheduler, trees["scheduler"], f"{folder}: scheduler")
    extra_state = trees["extra"] if isinstance(trees["extra"], dict) else {}
    for name, target in (extra or {}).items():
        if name not in extra_state:
            raise CheckpointMismatchError(f"{folder}: has no extra state {name!r} (saved: {sorted(map(str, extra_state))})")
        loader._restore_in_place(target, extra_state[name], f"{folder}: extra[{name!r}]")
    if restore_rng is not False:
        generators = restore_rng if isinstance(restore_rng, Mapping) else None
        restore_rng_state(trees["rng"], generators, source=f"{folder} ({own})")
    return loader.Checkpoint(
        path=folder,
        step=manifest.step,
        config=documents.get("config.json"),
        vocab=documents.get("vocab.json"),
        model_state=state.get("model", {}) if together else _placed(state.get("model", {}), map_location),
        optimizer_state=state.get("optimizer") if together else _placed(state.get("optimizer"), map_location),
        extra=extra_state,
        metadata=dict(manifest.metadata),
        manifest=manifest,
        scheduler_state=trees["scheduler"],
        rng_state=trees["rng"],
    )



def is_coordinator(model: object) -> bool:
    """Whether this rank is the one that commits (and prunes) for ``model``'s group."""
    return group_rank(process_group_of(model))[0] == 0

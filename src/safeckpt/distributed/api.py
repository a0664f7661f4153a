"""``save_checkpoint`` / ``load_checkpoint`` for sharded models: what the public API calls when a
process group is initialised and the model is FSDP2/DTensor-sharded or DDP-wrapped, and what
``load_checkpoint`` calls for a sharded checkpoint in any process.

Every rank calls these together. Checks that can fail (a damaged file, a model that does not
fit, RNG state that cannot be mapped) run on every rank and are agreed on before anything is
restored, so either every rank restores or every rank raises the same error.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
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
    CheckpointUsageError,
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

__all__ = [
    "handles_load",
    "handles_save",
    "is_coordinator",
    "load_checkpoint",
    "process_group_of",
    "save_checkpoint",
    "warn_if_unsharded",
]

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


def warn_if_unsharded(model: object, *, stacklevel: int) -> None:
    """Warn on every rank but 0 of a job that saves a model neither sharded nor DDP (``ddp.module``,
    a plain ``nn.Module``, a state dict): that is a single-process save, and if every rank makes
    it they all write the same folder, so all but one raise ``CheckpointExistsError`` (or, with
    ``overwrite=True``, replace each other's). Rank 0 alone saving is the usual pattern: silent."""
    if not _initialised() or dist.get_world_size() < 2 or dist.get_rank() == 0 or _is_sharded_model(model):
        return
    warnings.warn(
        f"rank {dist.get_rank()} of {dist.get_world_size()} is saving a {type(model).__qualname__} that is "
        "neither DDP nor sharded (FSDP2/DTensor): that is a single-process checkpoint of this rank alone. If "
        "every rank saves it to the same folder they race for it and all but one fail with "
        "CheckpointExistsError. Save on one rank (if torch.distributed.get_rank() == 0), or pass the "
        "DDP or fully_shard model itself so the ranks save together; ignore this if each rank has a "
        "folder of its own",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


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
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedValueError(f"model: a sharded save needs the nn.Module itself, got {type(model).__qualname__}")
    group = process_group_of(model)
    rank, _ = group_rank(group)
    # The coordinator commits with its own step, folder and documents: a rank that chose
    # otherwise would be told of a checkpoint that does not exist, or lose its config.
    final = dcp_calls.agree(group, lambda: core_saver().checkpoint_target(options.directory, options.path, step))
    _same_on_every_rank(
        group, "save_checkpoint", step=step, folder=str(final), overwrite=options.overwrite,
        config="given" if config is not None else None, vocab="given" if vocab is not None else None,
    )  # fmt: skip

    def prepare() -> tuple[dict[str, Any], WriterOptions]:
        # A value one rank cannot encode must fail on every rank, before DCP's collectives.
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
        return state, writer

    state, writer = dcp_calls.agree(group, prepare)
    if options.async_:
        on_commit = _committed_everywhere(options.on_commit, dcp_calls.checkpoint_group(group))
        return dcp_calls.async_save(state, final.parent, process_group=group, on_commit=on_commit, **writer)
    done = dcp_calls.save(state, final.parent, process_group=group, **writer)
    commit = _committed_everywhere(options.on_commit, group)
    if commit is not None:
        commit(done)
    return done


def _same_on_every_rank(group: dist.ProcessGroup | None, caller: str, **choices: object) -> None:
    """Raise :class:`CheckpointUsageError` on every rank if any rank's ``choices`` differ from
    the coordinator's (only the coordinator's are used)."""
    gathered: list[dict[str, object]] = [{}] * dist.get_world_size(group)
    dist.all_gather_object(gathered, choices, group=group)
    coordinator = gathered[0]
    for rank, mine in enumerate(gathered):
        keys = [key for key in choices if mine[key] != coordinator[key]]
        if keys:
            theirs = ", ".join(f"{key}={mine[key]!r}" for key in keys)
            ours = ", ".join(f"{key}={coordinator[key]!r}" for key in keys)
            raise CheckpointUsageError(
                f"{caller}: rank {rank} passed {theirs}, the coordinator (rank 0) {ours}; every rank must "
                "pass the same step, directory or path, overwrite, and config/vocab (or None on every "
                "rank), since the coordinator alone commits the checkpoint"
            )


def _committed_everywhere(
    on_commit: Callable[[StorageLocation], object] | None, group: dist.ProcessGroup | None
) -> Callable[[StorageLocation], object] | None:
    """``on_commit`` (a manager's pruning) run by the coordinator alone, every rank of ``group``
    waiting for it and raising its error: what it removes is gone on every rank when the save
    returns."""
    if on_commit is None:
        return None

    def run(folder: StorageLocation) -> None:
        def coordinator_only() -> None:
            if group_rank(group)[0] != 0:
                return
            try:
                on_commit(folder)
            except CheckpointError:
                raise
            except Exception as exc:
                raise dcp_calls.DistributedCheckpointError(
                    f"{folder} was committed, but what runs after the commit failed on the coordinator: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

        dcp_calls.agree(group, coordinator_only)

    return run


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


def _check_model(
    model_state: Mapping[str, Any], sharding: Sharding, *, strict: bool, source: str
) -> tuple[list[str], list[str]]:
    """Keys, shapes and dtypes of the model against the checkpoint, before anything is copied;
    returns (missing, unexpected) keys, which only ``strict`` refuses (as it does dtypes)."""
    saved = {
        path[1]: sharding.tensors.get(fqn)
        for fqn, path in sharding.paths.items()
        if path[0] == "model" and len(path) == 2
    }
    tensors = {key: value for key, value in model_state.items() if isinstance(value, torch.Tensor)}
    missing = [key for key in tensors if key not in saved]
    unexpected = sorted(str(key) for key in set(saved) - set(model_state))
    shapes, dtypes = [], []
    for key, value in tensors.items():
        md = saved.get(key)
        if md is None:
            continue
        found = f"{key!r} is {TORCH_DTYPES[md.dtype]} {md.shape} in the checkpoint, {value.dtype} {tuple(value.shape)} in the model"
        if md.shape != tuple(value.shape):
            shapes.append(found)
        elif TORCH_DTYPES[md.dtype] != value.dtype:
            dtypes.append(found)
    problems = list(shapes)
    if strict:
        problems += [f"{key!r} is missing from the checkpoint" for key in missing] + dtypes
        problems += [f"unexpected key {key!r} in the checkpoint" for key in unexpected]
    elif saved and tensors and len(missing) == len(tensors):
        problems.append(f"no tensor of the checkpoint matches the model ({len(saved)} saved); nothing would be loaded")
    if problems:
        fix = "" if shapes or not strict else (
            "; or pass strict=False to load the tensors that match (dtypes are then cast; "
            "Checkpoint.missing_keys / unexpected_keys list the rest)"
        )
        raise CheckpointMismatchError(
            f"{source}: the model does not fit: {'; '.join(problems[:10])}. Build the model with the "
            f"configuration it was saved with{fix}"
        )
    return missing, unexpected


def _check_optimizer(
    live: Mapping[str, Any], saved_groups: object, sharding: Sharding, *, source: str
) -> dict[str, Any]:
    """The live optimizer (``get_optimizer_state_dict``) against the checkpoint's parameter
    groups and per-parameter state keys, as :func:`safeckpt.torch.fit.check_optimizer` does for
    single-process checkpoints; returns the template DCP loads into: the live state of the
    parameters the checkpoint has state for (those without stay without, as after
    ``Optimizer.load_state_dict``)."""

    def fail(what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{source}: optimizer state does not fit the optimizer: {what}. Create the optimizer "
            "over the same parameters, in the same groups, with the same options, as when saving"
        )

    groups = saved_groups if isinstance(saved_groups, list) else []
    if len(groups) != len(live["param_groups"]):
        raise fail(f"the checkpoint has {len(groups)} parameter group(s), the optimizer {len(live['param_groups'])}")
    for index, (group, mine) in enumerate(zip(groups, live["param_groups"], strict=True)):
        theirs = group.get("params") if isinstance(group, dict) else None
        if theirs != mine["params"]:
            raise fail(f"group {index} holds {theirs} in the checkpoint, {mine['params']} here")
    saved_keys: dict[str, set[str]] = {}
    for path in sharding.paths.values():
        if len(path) == 4 and path[0] == "optimizer" and path[1] == "state":
            saved_keys.setdefault(str(path[2]), set()).add(str(path[3]))
    state = {}
    for name, keys in saved_keys.items():
        have = set(live["state"].get(name, {}))
        if keys != have:
            raise fail(
                f"the state of {name!r} holds {sorted(keys)} in the checkpoint, {sorted(have)} in this "
                "optimizer (an option such as amsgrad or momentum differs)"
            )
        state[name] = live["state"][name]
    return {"state": state, "param_groups": live["param_groups"]}


@contextlib.contextmanager
def _grads_set_aside(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Every parameter's ``.grad`` set to None meanwhile: ``get_optimizer_state_dict`` creates a
    fresh optimizer's state (which DCP loads into) by a zero-gradient step, but silently skips it
    when any parameter has a gradient, leaving no state to load the checkpoint's into."""
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad


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


def _model_template(live: Mapping[str, Any], sharding: Sharding, missing: list[str]) -> dict[str, Any]:
    """What DCP loads the model into: its own tensors (so in place), less the ``missing`` keys,
    and a copy in the checkpoint's dtype where that differs (``strict=False`` casts on restore)."""
    saved = {path[1]: sharding.tensors.get(fqn) for fqn, path in sharding.paths.items() if path[0] == "model" and len(path) == 2}
    out: dict[str, Any] = {}
    for key, value in live.items():
        md = saved.get(key)
        if key in missing:
            continue
        if isinstance(value, torch.Tensor) and md is not None and TORCH_DTYPES[md.dtype] != value.dtype:
            value = value.to(TORCH_DTYPES[md.dtype])
        out[key] = value
    return out


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
    reader = Reader(folder, verify=verify, storage_options=storage_options)
    try:
        return _load_sharded(
            folder, reader, model, optimizer, group=group, together=together, scheduler=scheduler, extra=extra,
            map_location=map_location, strict=strict, restore_rng=restore_rng,
        )  # fmt: skip
    finally:
        reader.close()


def _load_sharded(
    folder: StorageLocation,
    reader: Reader,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    group: dist.ProcessGroup | None,
    together: bool,
    scheduler: object | None,
    extra: Mapping[str, object] | None,
    map_location: str | torch.device,
    strict: bool,
    restore_rng: bool | Mapping[str, object],
) -> Any:
    """:func:`load_checkpoint` of the sharded checkpoint ``folder``, read through ``reader``."""
    rank, world = group_rank(group) if together else (0, 1)
    dcp_calls.agree(group, reader.read_metadata, together=together)
    sharding, manifest = reader.sharding, reader.manifest
    assert sharding is not None and manifest is not None
    own = rank_key(rank)
    mapped = sharding.world_size == world

    def check() -> tuple[list[str], list[str]] | None:
        source = str(folder)
        fit = None
        if model is not None:
            fit = _check_model(get_model_state_dict(model), sharding, strict=strict, source=source)
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
        return fit

    found = dcp_calls.agree(group, check, together=together)
    missing, unexpected = found if found is not None else ([], [])
    # First the small trees (and the optimizer's parameter groups), checked on every rank
    # together; the model's and optimizer's own tensors are loaded in place afterwards, from
    # the files the first pass verified without hashing them again (keep_open). Every rank
    # takes part in both passes, even one with nothing of its own to read in the first.
    prefixes: list[str | tuple[str, ...]] = ["scheduler", *([own] if mapped else [])]
    if model is None:
        prefixes.extend(("model", "optimizer"))
    elif optimizer is not None:
        prefixes.append(("optimizer", "param_groups"))
    state: dict[str, Any] = template(sharding, prefixes)
    reader.keep_open = model is not None
    if state or together:
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
    extra_state = trees["extra"] if isinstance(trees["extra"], dict) else {}

    def check_loaded() -> dict[str, Any]:
        for name in extra or {}:
            if name not in extra_state:
                raise CheckpointMismatchError(
                    f"{source}: has no extra state {name!r} for {own} (saved: {sorted(map(str, extra_state))}); "
                    "load without it"
                )
        if model is None:
            return {}
        live = _model_template(get_model_state_dict(model), sharding, missing)
        if optimizer is None:
            return {"model": live}
        with _grads_set_aside(optimizer):
            optim = get_optimizer_state_dict(model, optimizer)
        return {"model": live, "optimizer": _check_optimizer(optim, state["optimizer"]["param_groups"], sharding, source=source)}

    targets = dcp_calls.agree(group, check_loaded, together=together)
    reader.keep_open = False
    if targets:
        dcp_calls.load(targets, folder, process_group=group, reader=reader, single_process=not together)
        state.update(targets)
    if not together:  # a process loading alone: the returned state goes to map_location
        for name in ("scheduler", "extra"):
            trees[name] = _placed(trees[name], map_location)
        extra_state = trees["extra"] if isinstance(trees["extra"], dict) else {}
    if restore_rng is False and trees["rng"] is None and (optimizer is not None or scheduler is not None):
        warnings.warn(
            f"{folder}: no RNG state restored on rank {rank}; training resumes with this process's "
            "random state, so dropout, shuffling and sampling will differ from the original run",
            MissingRNGStateWarning,
            stacklevel=3,
        )
    if model is not None:
        try:
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
            if optimizer is not None:  # checked above; a parameter without saved state stays without
                set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointMismatchError(
                f"{folder}: torch could not restore the loaded state into the model or optimizer on rank "
                f"{rank} ({type(exc).__name__}: {exc}); they may be partly restored, so rebuild them "
                "before loading again"
            ) from exc
    loader = core_loader()
    if scheduler is not None:
        loader._restore_in_place(scheduler, trees["scheduler"], f"{folder}: scheduler")
    for name, target in (extra or {}).items():
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
        missing_keys=missing,
        unexpected_keys=unexpected,
    )



def is_coordinator(model: object) -> bool:
    """Whether this rank is the one that commits (and prunes) for ``model``'s group."""
    return group_rank(process_group_of(model))[0] == 0

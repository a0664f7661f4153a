"""``save_checkpoint``: plan (:mod:`safeckpt.torch.plan`) -> write -> manifest -> commit.

:func:`save` takes the options as one :class:`~safeckpt.torch.plan.SaveOptions` and sends a
sharded model to :mod:`safeckpt.distributed`; everything else is planned, with all validation
and encoding done before the first byte is written, so an unsupported value never leaves
anything on disk. :func:`write_checkpoint` streams the planned files into a temporary folder,
hashing as it writes, and commits it (see :mod:`safeckpt.storage.posix_commit`);
:func:`write_plan` does that in the background with ``async_``, one save in flight at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import torch

from ..errors import CheckpointUsageError, checkpoint_exists
from ..format.layout import step_dirname
from ..format.manifest import build as build_manifest
from ..storage.base import Location
from ..storage.local import refuse_to_replace
from ..storage.locate import as_location, storage_for
from .background import PendingSave, acquire_slot, keep_snapshot
from .plan import CheckpointPlan, SaveOptions, plan_checkpoint

__all__ = [
    "PendingSave",
    "checkpoint_target",
    "save",
    "save_checkpoint",
    "write_checkpoint",
    "write_checkpoint_async",
    "write_plan",
]


def checkpoint_target(
    directory: str | os.PathLike[str] | Location | None, path: str | os.PathLike[str] | Location | None, step: int
) -> Location:
    """The folder a save commits to: ``directory/step-NNNNNNNN``, or exactly ``path`` (either may
    be an fsspec URL)."""
    if directory is not None and path is not None:
        raise CheckpointUsageError(
            f"save_checkpoint: pass either directory= (a root of step-N folders) or path= (the exact "
            f"checkpoint folder), not both (got directory={str(directory)!r}, path={str(path)!r})"
        )
    if path is not None:
        target = as_location(path)
        if target.name in ("", ".", "..") or target.name.startswith("."):
            raise CheckpointUsageError(
                f"{path}: path= must name the checkpoint folder itself, not '.', '..' or a hidden name; "
                "pass e.g. path='runs/final'"
            )
        return target
    return as_location("checkpoints" if directory is None else directory) / step_dirname(step)


def write_checkpoint(
    plan: CheckpointPlan,
    directory: str | os.PathLike[str] | Location | None = None,
    *,
    path: str | os.PathLike[str] | Location | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Location:
    """Write the planned files and commit them as ``directory/step-NNNNNNNN`` or exactly ``path``;
    returns that folder."""
    final = checkpoint_target(directory, path, plan.step)
    storage = storage_for(final.parent, storage_options)
    if not overwrite and storage.committed(final):
        raise checkpoint_exists(final, plan.step)
    with storage.begin(plan.step, name=final.name) as pending:
        entries = pending.write_files(sorted(plan.files(), key=lambda f: -f[2]))
        manifest = build_manifest(
            plan.step, entries, metadata=plan.metadata, producer={"torch": torch.__version__}  # type: ignore[arg-type]
        )
        return pending.commit(manifest, overwrite=overwrite)


@overload
def save_checkpoint(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, object] | None,
    config: object | None,
    vocab: object | None,
    step: int,
    *,
    directory: str | os.PathLike[str] | Location | None = ...,
    path: str | os.PathLike[str] | Location | None = ...,
    scheduler: object | None = ...,
    extra: Mapping[str, object] | None = ...,
    metadata: Mapping[str, object] | None = ...,
    rng: bool | Mapping[str, object] = ...,
    overwrite: bool = ...,
    async_: Literal[False] = ...,
    storage_options: Mapping[str, Any] | None = ...,
) -> Location: ...


@overload
def save_checkpoint(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, object] | None,
    config: object | None,
    vocab: object | None,
    step: int,
    *,
    directory: str | os.PathLike[str] | Location | None = ...,
    path: str | os.PathLike[str] | Location | None = ...,
    scheduler: object | None = ...,
    extra: Mapping[str, object] | None = ...,
    metadata: Mapping[str, object] | None = ...,
    rng: bool | Mapping[str, object] = ...,
    overwrite: bool = ...,
    async_: Literal[True],
    storage_options: Mapping[str, Any] | None = ...,
) -> PendingSave: ...


def save_checkpoint(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, object] | None,
    config: object | None,
    vocab: object | None,
    step: int,
    *,
    directory: str | os.PathLike[str] | Location | None = None,
    path: str | os.PathLike[str] | Location | None = None,
    scheduler: object | None = None,
    extra: Mapping[str, object] | None = None,
    metadata: Mapping[str, object] | None = None,
    rng: bool | Mapping[str, object] = True,
    overwrite: bool = False,
    async_: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Location | PendingSave:
    """Save the complete training state as one verified checkpoint folder.

    Args:
        model: an ``nn.Module`` or its state dict; tied weights are stored once and stay tied.
        optimizer: an ``Optimizer``, its state dict, or None.
        config: training configuration (dict, dataclass or ``argparse.Namespace``) or None.
        vocab: a list of tokens, a token->id dict, or None.
        step: the training step (non-negative int); names the folder ``step-NNNNNNNN``.
        directory: root folder of the run's checkpoints, created if missing (default
            ``"checkpoints"``); the checkpoint is committed as ``directory/step-NNNNNNNN``.
        path: the exact folder to commit the checkpoint to instead (e.g. ``"runs/final"``), with
            the same atomic protocol: written into a hidden sibling folder, renamed into place
            without replacing anything (``overwrite=True`` swaps the old folder out in one step;
            a folder of other files, holding no ``manifest.json``, is never replaced).
            Mutually exclusive with ``directory``. :func:`load_checkpoint` opens any folder
            holding a ``manifest.json``.
        scheduler: an LR scheduler, ``GradScaler`` or any object with ``state_dict()``.
        extra: named additional state: nested containers of tensors and plain values, or
            objects with ``state_dict()``.
        metadata: JSON-compatible values recorded in ``manifest.json``.
        rng: capture Python, NumPy, torch CPU and CUDA generators (default); a mapping of
            names to ``torch.Generator`` / ``numpy.random.Generator`` captures those too.
        overwrite: replace an existing checkpoint for ``step`` instead of raising
            :class:`CheckpointExistsError`.
        async_: copy the state to CPU memory, then write and commit it on a background thread
            and return a :class:`PendingSave` at once; its ``wait()`` returns the path. One
            save is in flight at a time: any save first waits for the one before it.
        storage_options: options of the fsspec file system when ``directory`` or ``path`` is
            a URL (``s3://bucket/run``, ``memory://run``; needs ``safeckpt[remote]``), e.g.
            ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for s3fs. Object stores
            commit by writing the manifest last with a create-only write (spec/FORMAT.md).

    Returns:
        The committed checkpoint folder (or a :class:`PendingSave` with ``async_=True``).

    Example:
        >>> path = save_checkpoint(model, opt, {"lr": 3e-4}, ["a", "b"], 100)  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'step-00000100'
    """
    options = SaveOptions(
        directory=directory, path=path, scheduler=scheduler, extra=extra, metadata=metadata, rng=rng,
        overwrite=overwrite, async_=async_, storage_options=storage_options,
    )  # fmt: skip
    if path is not None:  # any folder the caller names: never one of other files
        refuse_to_replace(checkpoint_target(directory, path, step))
    return save(model, optimizer, config, vocab, step, options)


def save(
    model: object, optimizer: object | None, config: object | None, vocab: object | None, step: int, options: SaveOptions
) -> Location | PendingSave:
    """:func:`save_checkpoint` with its keyword options as one value (what ``CheckpointManager``
    calls); ``options.on_commit`` runs once the checkpoint is committed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from ..distributed import api as sharded  # FSDP2/DTensor/DDP models go through DCP

        if sharded.handles_save(model):
            return sharded.save_checkpoint(model, optimizer, config, vocab, step, options)
        sharded.warn_if_unsharded(model, stacklevel=3)  # the caller of save_checkpoint / manager.save
    plan = plan_checkpoint(
        model, optimizer, config, vocab, step,
        scheduler=options.scheduler, extra=options.extra, metadata=options.metadata, rng=options.rng,
    )  # fmt: skip
    return write_plan(plan, options)


def write_plan(plan: CheckpointPlan, options: SaveOptions) -> Location | PendingSave:
    """Write and commit ``plan`` where ``options`` say (their ``directory``, ``path``,
    ``overwrite``, ``storage_options``), in the background with ``async_``: after the save in
    flight, if any, and before the next one; then ``on_commit(path)``. The plan's own options
    (``scheduler``, ``extra``, ``metadata``, ``rng``) were used when it was made."""
    if options.async_:
        return write_checkpoint_async(
            plan, options.directory, path=options.path, overwrite=options.overwrite,
            on_commit=options.on_commit, storage_options=options.storage_options,
        )  # fmt: skip
    release = acquire_slot()
    try:
        final = write_checkpoint(
            plan, options.directory, path=options.path, overwrite=options.overwrite,
            storage_options=options.storage_options,
        )  # fmt: skip
    finally:
        release()
    if options.on_commit is not None:
        options.on_commit(final)
    return final


def write_checkpoint_async(
    plan: CheckpointPlan,
    directory: str | os.PathLike[str] | Location | None = None,
    *,
    path: str | os.PathLike[str] | Location | None = None,
    overwrite: bool = False,
    on_commit: Callable[[Location], object] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> PendingSave:
    """:func:`write_checkpoint` in the background: what ``save_checkpoint(..., async_=True)`` does
    once the state is planned, for callers that plan themselves (e.g. a checkpoint manager).

    Waits for the save in flight (raising its error if nobody collected it), refuses an existing
    step unless ``overwrite``, copies the plan's tensors, then returns a :class:`PendingSave`.
    ``on_commit(path)`` runs on the background thread right after the commit (e.g. to prune old
    checkpoints); an error it raises is the save's error.
    """
    release = acquire_slot()
    try:
        final = checkpoint_target(directory, path, plan.step)
        if not overwrite and storage_for(final.parent, storage_options).committed(final):
            raise checkpoint_exists(final, plan.step)
        plan.snapshot()

        def finish() -> None:
            keep_snapshot({name: archive.tensors for name, archive in plan.archives.items()})
            release()

        return PendingSave(
            plan.step,
            final,
            lambda: write_checkpoint(plan, path=final, overwrite=overwrite, storage_options=storage_options),
            on_commit=on_commit,
            on_exit=finish,
        )
    except BaseException:
        release()
        raise

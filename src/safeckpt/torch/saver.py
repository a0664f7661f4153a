"""``save_checkpoint``: user objects -> state trees -> archives and documents -> manifest -> commit.

All validation and encoding happens in :func:`plan_checkpoint`, before the first byte is written,
so an unsupported value never leaves anything on disk. :func:`write_checkpoint` streams the
planned files into a temporary folder, hashing as it writes, and commits it (see
:mod:`safeckpt.storage.posix_commit`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from ..configs import config_metadata, config_to_json, json_plain
from ..errors import CheckpointUsageError, UnsupportedValueError, checkpoint_exists
from ..format.documents import dump_json, dump_msgpack
from ..format.manifest import build as build_manifest
from ..format.tree import encode_document
from ..storage.base import Location
from ..storage.locate import as_location, storage_for
from ..storage.posix_commit import step_dirname
from .background import PendingSave, acquire_slot, keep_snapshot, take_snapshot
from .rng import capture_rng
from .state import ALIASES_KEY, model_archive, state_of, vocab_to_json
from .tensors import TensorCollector, archive_parts
from .usage import check_extra, check_save_arguments

__all__ = ["PendingSave", "plan_checkpoint", "save_checkpoint", "write_checkpoint", "write_checkpoint_async"]

TREES = ("optimizer", "scheduler", "rng", "extra")
"""State trees stored as ``<name>.safetensors`` + ``<name>.msgpack``, in this order."""

Buffer = bytes | bytearray | memoryview


@dataclass
class CheckpointPlan:
    """Everything to write, validated and encoded; tensors still live in the caller's memory."""

    step: int
    metadata: dict[str, object]
    archives: dict[str, tuple[TensorCollector, dict[str, str] | None]] = field(default_factory=dict)
    documents: dict[str, bytes] = field(default_factory=dict)

    def snapshot(self) -> None:
        """Copy every tensor so the caller may keep training while the files are written.

        The copies reuse the memory of the last finished background save's copies where they
        fit (see :mod:`safeckpt.background`)."""
        reuse = take_snapshot()
        for name, (archive, _) in self.archives.items():
            archive.snapshot(reuse.get(name))

    def file_size(self, name: str) -> int:
        """Bytes the data of file ``name`` will take (tensor bytes of an archive, a document's
        length); used to start the largest files first."""
        if name in self.documents:
            return len(self.documents[name])
        archive = self.archives[name.removesuffix(".safetensors")][0]
        return sum(t.nbytes for t in archive.tensors.values())

    def files(self) -> Iterator[tuple[str, Iterable[Buffer], int]]:
        """Each file's name, its content as a lazy sequence of buffers and :meth:`file_size`,
        in writing order."""
        for name, (archive, meta) in self.archives.items():
            file = f"{name}.safetensors"
            yield file, _Restartable(archive.tensors, meta), self.file_size(file)
        for name, data in self.documents.items():
            yield name, (data,), len(data)


class _Restartable:
    """An archive's buffers, produced afresh by each ``iter()``, so an upload can be retried."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        self.tensors, self.metadata = tensors, metadata

    def __iter__(self) -> Iterator[memoryview | bytes]:
        return archive_parts(self.tensors, self.metadata)


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UnsupportedValueError(f"step: expected a non-negative int, got {step!r}")
    return step


def plan_checkpoint(
    model: object,
    optimizer: object | None,
    config: object | None,
    vocab: object | None,
    step: int,
    *,
    scheduler: object | None = None,
    extra: Mapping[str, object] | None = None,
    metadata: Mapping[str, object] | None = None,
    rng: bool | Mapping[str, object] = True,
) -> CheckpointPlan:
    """Validate and encode everything :func:`save_checkpoint` will write; writes nothing."""
    check_save_arguments(model, optimizer, scheduler)
    check_extra("save_checkpoint", extra)
    plan = CheckpointPlan(step=_check_step(step), metadata={})
    if metadata is not None:
        plan.metadata = dict(_as_json_object(metadata, "metadata"))
    archive, aliases = model_archive(model)  # type: ignore[arg-type]
    plan.archives["model"] = (
        archive,
        {"format": "pt", **({ALIASES_KEY: json.dumps(aliases, sort_keys=True, separators=(",", ":"))} if aliases else {})},
    )
    if extra is not None and not isinstance(extra, Mapping):
        raise UnsupportedValueError(f"extra: expected a mapping of names to state, got {type(extra).__qualname__}")
    trees: dict[str, object] = {
        "optimizer": None if optimizer is None else state_of(optimizer, "optimizer"),
        "scheduler": None if scheduler is None else state_of(scheduler, "scheduler"),
        "rng": None,
        "extra": None if extra is None else {k: state_of(v, f"extra[{k!r}]") for k, v in extra.items()},
    }
    if rng:
        try:
            trees["rng"] = capture_rng(rng if isinstance(rng, Mapping) else None)
        except TypeError as exc:
            raise UnsupportedValueError(str(exc)) from None
    for name in TREES:
        if trees[name] is None:
            continue
        archive = TensorCollector(name)
        document = encode_document(
            trees[name],
            name=name,
            is_tensor=lambda v: isinstance(v, torch.Tensor),
            add_tensor=archive.add,
        )
        plan.archives[name] = (archive, None)
        plan.documents[f"{name}.msgpack"] = dump_msgpack(document)
    if config is not None:
        plan.documents["config.json"] = dump_json(config_to_json(config), source="config")
        plan.metadata = {**config_metadata(config), **plan.metadata}
    if vocab is not None:
        plan.documents["vocab.json"] = dump_json(vocab_to_json(vocab), source="vocab")
    return plan


def _as_json_object(value: Mapping[str, object], label: str) -> dict[str, object]:
    plain = json_plain(value, label)
    assert isinstance(plain, dict)
    return plain


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
            without replacing anything (``overwrite=True`` swaps the old folder out in one step).
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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from ..distributed import api as sharded  # FSDP2/DTensor/DDP models go through DCP

        if sharded.handles_save(model):
            return sharded.save_checkpoint(
                model, optimizer, config, vocab, step, directory=directory, path=path, scheduler=scheduler,
                extra=extra, metadata=metadata, rng=rng, overwrite=overwrite, async_=async_,
                storage_options=storage_options,
            )  # fmt: skip
    plan = plan_checkpoint(
        model, optimizer, config, vocab, step, scheduler=scheduler, extra=extra, metadata=metadata, rng=rng
    )
    if async_:
        return write_checkpoint_async(plan, directory, path=path, overwrite=overwrite, storage_options=storage_options)
    release = acquire_slot()
    try:
        return write_checkpoint(plan, directory, path=path, overwrite=overwrite, storage_options=storage_options)
    finally:
        release()


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
            keep_snapshot({name: archive.tensors for name, (archive, _) in plan.archives.items()})
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

"""What a save will write, validated and encoded before the first byte is written.

A checkpoint is planned as four parts (spec/FORMAT.md §3):

* the model archive (``model.safetensors``, tied weights once);
* the named state trees, an ordered mapping ``name -> state``. The names are the format's
  :data:`~safeckpt.format.tree.TREE_NAMES`; :func:`standard_trees` makes the usual ones from
  the user's objects (an optimizer's ``state_dict()``, the captured RNG, ...), and writers whose
  state comes from elsewhere (a converted or consolidated checkpoint) give the trees as they are;
* the JSON documents (``config.json``, ``vocab.json``, and other files a writer lists);
* the manifest's metadata.

:class:`CheckpointPlan` encodes every named tree the same way: its tensors into
``<name>.safetensors``, its structure into ``<name>.msgpack``. An unsupported value raises
:class:`~safeckpt.errors.UnsupportedValueError` here, so it never leaves anything on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..configs import config_metadata, config_to_json, json_plain
from ..errors import CheckpointUsageError, UnsupportedValueError
from ..format.documents import dump_json, dump_msgpack
from ..format.tree import TREE_NAMES, encode_document
from ..storage.base import Buffer, Location
from .background import take_snapshot
from .capture import MODEL_ALIASES_KEY, model_archive, state_of, vocab_to_json
from .rng import capture_rng
from .tensors import TensorCollector, archive_parts
from .usage import check_extra, check_save_arguments

__all__ = [
    "CheckpointPlan",
    "SaveOptions",
    "plan_checkpoint",
    "plan_documents",
    "plan_trees",
    "standard_trees",
]


@dataclass(frozen=True)
class SaveOptions:
    """The keyword options of :func:`~safeckpt.save_checkpoint` as one value, which
    ``CheckpointManager.save``, the integrations and the sharded (DCP) backend pass along instead
    of repeating the keyword list. Each field means what the argument of the same name means
    there; ``on_commit(path)`` runs right after the commit (on the background thread with
    ``async_``), and an error it raises is the save's error. In a sharded save every rank passes
    it and only the coordinator runs it, the other ranks waiting until it has."""

    directory: str | os.PathLike[str] | Location | None = None
    path: str | os.PathLike[str] | Location | None = None
    scheduler: object | None = None
    extra: Mapping[str, object] | None = None
    metadata: Mapping[str, object] | None = None
    rng: bool | Mapping[str, object] = True
    overwrite: bool = False
    async_: bool = False
    storage_options: Mapping[str, Any] | None = None
    on_commit: Callable[[Location], object] | None = None


def standard_trees(optimizer: object | None, options: SaveOptions) -> dict[str, object]:
    """The state trees of a save by name, in :data:`~safeckpt.format.tree.TREE_NAMES` order,
    absent ones left out: the optimizer's and scheduler's ``state_dict()``, the RNG state
    captured now (unless ``options.rng`` is false) and each ``extra`` value's state."""
    extra = options.extra
    check_extra("save_checkpoint", extra)
    if extra is not None and not isinstance(extra, Mapping):
        raise UnsupportedValueError(f"extra: expected a mapping of names to state, got {type(extra).__qualname__}")
    trees: dict[str, object] = {}
    if optimizer is not None:
        trees["optimizer"] = state_of(optimizer, "optimizer")
    if options.scheduler is not None:
        trees["scheduler"] = state_of(options.scheduler, "scheduler")
    if options.rng:
        try:
            trees["rng"] = capture_rng(options.rng if isinstance(options.rng, Mapping) else None)
        except TypeError as exc:
            raise UnsupportedValueError(str(exc)) from None
    if extra is not None:
        trees["extra"] = {k: state_of(v, f"extra[{k!r}]") for k, v in extra.items()}
    return trees


def plan_documents(
    config: object | None, vocab: object | None, metadata: Mapping[str, object] | None
) -> tuple[dict[str, bytes], dict[str, object]]:
    """``config.json`` and ``vocab.json`` encoded (those given), and the manifest's metadata: what
    the config says of itself (e.g. a transformers config's class), then ``metadata``, which wins."""
    plain: dict[str, object] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise UnsupportedValueError(
                f"metadata: expected a mapping of names to JSON values, got {type(metadata).__qualname__}; "
                "pass e.g. metadata={'run': 'a'}"
            )
        plain = dict(cast("Mapping[str, object]", json_plain(metadata, "metadata")))
    documents: dict[str, bytes] = {}
    if config is not None:
        documents["config.json"] = dump_json(config_to_json(config), source="config")
        plain = {**config_metadata(config), **plain}
    if vocab is not None:
        documents["vocab.json"] = dump_json(vocab_to_json(vocab), source="vocab")
    return documents, plain


@dataclass
class CheckpointPlan:
    """Everything to write, validated and encoded; tensors still live in the caller's memory.

    Made by :func:`plan_checkpoint` or :func:`plan_trees`; :mod:`safeckpt.torch.saver` writes it.
    A writer may add files of its own to ``documents`` before writing (FORMAT.md §3 lets a
    manifest list them), e.g. ``safeckpt.hf``'s ``trainer_state.json``.
    """

    step: int
    model: TensorCollector
    model_metadata: dict[str, str]
    """The model archive's ``__metadata__`` (format marker, tied-weight aliases)."""
    trees: dict[str, tuple[TensorCollector, bytes]] = field(default_factory=dict)
    """Each named tree's tensors and encoded structure document, in writing order."""
    documents: dict[str, bytes] = field(default_factory=dict)
    """Other files by name: ``config.json``, ``vocab.json``, ..."""
    metadata: dict[str, object] = field(default_factory=dict)

    def add_tree(self, name: str, state: object) -> None:
        """Encode the state tree ``name`` (one of :data:`~safeckpt.format.tree.TREE_NAMES`)."""
        if name not in TREE_NAMES:
            raise CheckpointUsageError(
                f"{name!r} is not a state tree of the format (spec/FORMAT.md §3 defines "
                f"{', '.join(TREE_NAMES)}); store other named state under extra"
            )
        if name in self.trees:
            raise CheckpointUsageError(f"{name}: this state tree is already planned; give each tree once")
        archive = TensorCollector(name)
        document = encode_document(
            state, name=name, is_tensor=lambda v: isinstance(v, torch.Tensor), add_tensor=archive.add
        )
        self.trees[name] = (archive, dump_msgpack(document))

    @property
    def archives(self) -> dict[str, TensorCollector]:
        """Every tensor archive by name (without ``.safetensors``): the model's, then each tree's."""
        return {"model": self.model, **{name: archive for name, (archive, _) in self.trees.items()}}

    def snapshot(self) -> None:
        """Copy every tensor so the caller may keep training while the files are written.

        The copies reuse the memory of the last finished background save's copies where they
        fit (see :mod:`safeckpt.torch.background`)."""
        reuse = take_snapshot()
        for name, archive in self.archives.items():
            archive.snapshot(reuse.get(name))

    def files(self) -> Iterator[tuple[str, Iterable[Buffer], int]]:
        """Each file's name, its content as a lazy sequence of buffers and its size in bytes
        (used to start the largest files first), in writing order."""
        for name, archive in self.archives.items():
            size = sum(t.nbytes for t in archive.tensors.values())
            metadata = self.model_metadata if name == "model" else None
            yield f"{name}.safetensors", _Restartable(archive.tensors, metadata), size
        documents = {f"{name}.msgpack": document for name, (_, document) in self.trees.items()} | self.documents
        for name, data in documents.items():
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


def plan_trees(
    model: object,
    trees: Mapping[str, object | None],
    step: int,
    *,
    config: object | None = None,
    vocab: object | None = None,
    metadata: Mapping[str, object] | None = None,
) -> CheckpointPlan:
    """The plan of a checkpoint of ``model`` (an ``nn.Module`` or a state dict) whose named state
    trees are given as they are (``None``: absent): nothing is captured or converted, so this
    serves writers whose trees come from a file (``consolidate``, converters). Writes nothing.

    Example:
        >>> plan = plan_trees(weights, {"optimizer": saved_optimizer, "rng": saved_rng}, 100)  # doctest: +SKIP
    """
    step = _check_step(step)
    documents, plain = plan_documents(config, vocab, metadata)
    archive, aliases = model_archive(model)  # type: ignore[arg-type]
    tied = {MODEL_ALIASES_KEY: json.dumps(aliases, sort_keys=True, separators=(",", ":"))} if aliases else {}
    plan = CheckpointPlan(step, archive, {"format": "pt", **tied}, documents=documents, metadata=plain)
    for name, state in trees.items():
        if state is not None:
            plan.add_tree(name, state)
    return plan


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
    """Validate and encode everything ``save_checkpoint`` with these arguments writes, the
    standard trees made from the given objects (:func:`standard_trees`); writes nothing."""
    check_save_arguments(model, optimizer, scheduler)
    trees = standard_trees(optimizer, SaveOptions(scheduler=scheduler, extra=extra, rng=rng))
    return plan_trees(model, trees, step, config=config, vocab=vocab, metadata=metadata)

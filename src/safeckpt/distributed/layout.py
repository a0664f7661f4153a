"""What ``save_checkpoint`` puts in the DCP state dict of a sharded run, and how it comes back.

Top-level keys of the state dict (and so of ``sharding.json``'s ``paths``)::

    model            get_model_state_dict(model): DTensor shards, or plain tensors written once
    optimizer        get_optimizer_state_dict(model, optimizer): keyed by parameter name
    scheduler        {"structure": <msgpack bytes>, "tensors": {...}}  the same on every rank
    rank-RRRRR       {"rng": tree, "extra": tree}, each tree as scheduler: one per rank

A tree (scheduler, RNG, extra) is encoded by safeckpt's tree encoder before DCP sees it, so
tuples, int dict keys and every type the single-process format stores survive exactly; DCP's
own flattening would turn int keys into strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._traverse import set_element

from ..errors import CheckpointCorruptedError
from ._core import TORCH_DTYPES, TensorCollector, decode_document, dump_msgpack, encode_document, load_msgpack
from .sharding import Sharding

__all__ = ["PER_RANK", "RANK_PREFIX", "decode_tree", "encode_tree", "group_rank", "has_prefix", "rank_key", "template"]

RANK_PREFIX = "rank-"
PER_RANK = ("rng", "extra")
"""The named trees each rank saves its own of, under :func:`rank_key`; the others (the
scheduler's) are the same on every rank and saved once, at the top level."""


def rank_key(rank: int) -> str:
    """Top-level key of one rank's own state (``rank-00003``)."""
    return f"{RANK_PREFIX}{rank:05d}"


def group_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in ``group``, its size); (0, 1) in a plain process."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def encode_tree(tree: object, name: str) -> dict[str, object]:
    """A state tree as ``{"structure": bytes, "tensors": {name: tensor}}`` for DCP."""
    archive = TensorCollector(name)
    document = encode_document(tree, name=name, is_tensor=lambda v: isinstance(v, torch.Tensor), add_tensor=archive.add)
    return {"structure": dump_msgpack(document, source=name), "tensors": dict(archive.tensors)}


def decode_tree(entry: object, *, source: str) -> object:
    """Inverse of :func:`encode_tree` (``entry`` was filled by a verified load)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("structure"), bytes):
        raise CheckpointCorruptedError(f"{source}: expected an encoded state tree; the checkpoint is damaged")
    tensors = entry.get("tensors") or {}
    document = load_msgpack(entry["structure"], source=source)

    def resolve(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointCorruptedError(f"{source}: refers to tensor {name!r}, which is not stored")
        return tensors[name]

    return decode_document(document, source=source, resolve_tensor=resolve)


def has_prefix(sharding: Sharding, *prefix: str | int) -> bool:
    """Whether any entry of the checkpoint lives under ``prefix`` (a path of keys)."""
    return any(tuple(path[: len(prefix)]) == prefix for path in sharding.paths.values())


def template(sharding: Sharding, prefixes: Iterable[str | tuple[str, ...]]) -> dict[str, Any]:
    """A state dict with the checkpoint's own structure under ``prefixes`` (top-level keys, or
    paths of keys such as ``("optimizer", "param_groups")``): an empty full-size tensor per
    tensor entry, None per value. DCP loads into it in place."""
    wanted = [(prefix,) if isinstance(prefix, str) else tuple(prefix) for prefix in prefixes]
    state: dict[str, Any] = {}
    for fqn, path in sharding.paths.items():
        if not any(tuple(path[: len(prefix)]) == prefix for prefix in wanted):
            continue
        entry = sharding.tensors.get(fqn)
        set_element(state, path, None if entry is None else torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype]))
    return state

"""Sharded checkpoints for ``torch.distributed`` (FSDP2, DTensor, DDP) on top of
``torch.distributed.checkpoint`` (DCP), with safeckpt's guarantees: hashed files, a manifest
written last, an atomic commit by the coordinator, strict JSON/msgpack metadata and no pickle on
the load path.

DCP pieces, for code that calls ``dcp.save`` / ``dcp.load`` / ``dcp.async_save`` itself:
:class:`Writer`, :class:`Reader`, :class:`SavePlanner`, :class:`LoadPlanner`. :func:`save`,
:func:`load` and :func:`async_save` call DCP with them and turn DCP's ``CheckpointException``
(a ``BaseException``) into safeckpt's errors. :func:`consolidate` turns a sharded checkpoint
into a single-process one. ``safeckpt.save_checkpoint``, ``load_checkpoint`` and
``CheckpointManager`` use all of this by themselves when a process group is initialised and the
model is sharded (DTensor parameters, e.g. ``fully_shard``) or wrapped in DDP.

Example:
    >>> import torch.distributed.checkpoint as dcp  # doctest: +SKIP
    >>> from safeckpt import distributed as sd  # doctest: +SKIP
    >>> dcp.save(state, storage_writer=sd.Writer("ckpts", step=100), planner=sd.SavePlanner())  # doctest: +SKIP
    >>> dcp.load(state, storage_reader=sd.Reader("ckpts"), planner=sd.LoadPlanner())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Loaded on first use, so that the torch-free parts (``sharding``, ``numpy_shards``) import
# without torch.
_LAZY = {
    "LoadPlanner": ".planner",
    "Reader": ".reader",
    "SavePlanner": ".planner",
    "UsageError": ".writer",
    "Writer": ".writer",
    "async_save": ".dcp_calls",
    "consolidate": ".consolidate",
    "load": ".dcp_calls",
    "save": ".dcp_calls",
}

if TYPE_CHECKING:
    from .consolidate import consolidate as consolidate
    from .dcp_calls import async_save as async_save
    from .dcp_calls import load as load
    from .dcp_calls import save as save
    from .planner import LoadPlanner as LoadPlanner
    from .planner import SavePlanner as SavePlanner
    from .reader import Reader as Reader
    from .writer import UsageError as UsageError
    from .writer import Writer as Writer


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeckpt.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["LoadPlanner", "Reader", "SavePlanner", "UsageError", "Writer", "async_save", "consolidate", "load", "save"]

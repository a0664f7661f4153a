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

from .consolidate import consolidate as consolidate
from .dcp_calls import async_save as async_save
from .dcp_calls import load as load
from .dcp_calls import save as save
from .planner import LoadPlanner as LoadPlanner
from .planner import SavePlanner as SavePlanner
from .reader import Reader as Reader
from .writer import UsageError as UsageError
from .writer import Writer as Writer

__all__ = ["LoadPlanner", "Reader", "SavePlanner", "UsageError", "Writer", "async_save", "consolidate", "load", "save"]

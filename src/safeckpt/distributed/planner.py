"""DCP planners that store non-tensor values as msgpack structure documents, never pickle.

DCP's default planners turn every non-tensor leaf of the state dict (a learning rate, a tuple of
betas, a list of parameter names) into ``torch.save`` bytes on save and hand them to
``torch.load(weights_only=False)`` on load. These subclasses keep DCP's flattening,
de-duplication and resharding, and replace only that step with safeckpt's tree encoding
(``safeckpt.tree``: tuples stay tuples, int dict keys stay ints, bounded depth and size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType

from ..errors import CheckpointCorruptedError, UnsupportedValueError
from ._core import decode_document, encode_document

__all__ = ["PLANNER_MARK", "LoadPlanner", "SavePlanner", "decode_value", "encode_value"]

PLANNER_MARK = "safeckpt"
"""Put in a local plan's ``storage_data`` by these planners; the Writer and Reader refuse plans
without it, since any other planner pickles values (or unpickles them on load)."""


def encode_value(value: object, fqn: str) -> dict[str, object]:
    """The structure document of one non-tensor state-dict value (no tensors allowed inside)."""

    def refuse(tensor: object, path: tuple[object, ...]) -> str:
        raise UnsupportedValueError(
            f"{fqn}: a tensor inside a {type(value).__name__} is not supported by sharded "
            "checkpoints; store tensors in dicts or lists, which DCP splits into their own entries"
        )

    return encode_document(value, name=fqn, is_tensor=lambda v: isinstance(v, torch.Tensor), add_tensor=refuse)


def decode_value(document: object, *, source: str) -> object:
    """Inverse of :func:`encode_value`; any tensor reference is corruption."""

    def refuse(name: str) -> object:
        raise CheckpointCorruptedError(f"{source}: refers to tensor {name!r}; sharded values hold no tensors")

    return decode_document(document, source=source, resolve_tensor=refuse)


class SavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` whose non-tensor values are encoded documents, not ``torch.save``.

    Every value is encoded while the local plan is made, so a value the format cannot hold fails
    on its rank before any rank writes a byte. An item every rank holds (a DDP model, FSDP2's
    unsharded buffers) is written by the lowest rank: DDP treats rank 0's buffers (BatchNorm's
    running statistics, which drift apart on each rank's data) as the true ones, so a mix of
    ranks' copies would be a state no rank had.

    Example:
        >>> dcp.save(state, storage_writer=Writer("ckpts", step=100), planner=SavePlanner())  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, dedup_save_to_lowest_rank=True)
        self._documents: dict[str, dict[str, object]] = {}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._documents = {
            item.index.fqn: encode_value(self.lookup_object(item.index), item.index.fqn)
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        }
        plan = dataclasses.replace(plan, storage_data=PLANNER_MARK)
        self.plan = plan
        return plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        raise TypeError("safeckpt's SavePlanner is only used with safeckpt.distributed.Writer, which calls value_document()")

    def value_document(self, write_item: WriteItem) -> dict[str, object]:
        """The encoded document of a non-tensor item (made in :meth:`create_local_plan`)."""
        return self._documents[write_item.index.fqn]

    def tensor(self, write_item: WriteItem) -> torch.Tensor:
        """The tensor (a rank's local shard for a DTensor) of a tensor item."""
        data = super().resolve_data(write_item)
        assert isinstance(data, torch.Tensor)
        return data


class LoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that takes decoded values instead of ``torch.load``-ing bytes.

    Example:
        >>> dcp.load(state, storage_reader=Reader("ckpts"), planner=LoadPlanner())  # doctest: +SKIP
    """

    def __init__(self, *, allow_partial_load: bool = False) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, allow_partial_load=allow_partial_load)

    def create_local_plan(self) -> LoadPlan:
        return dataclasses.replace(super().create_local_plan(), storage_data=PLANNER_MARK)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise TypeError(
            "safeckpt's LoadPlanner never reads pickled bytes; use it with safeckpt.distributed.Reader"
        )

    def set_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a decoded non-tensor value where it belongs in the caller's state dict."""
        _put(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)


def _put(root: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    """Set ``value`` at ``path`` in ``root``, keeping the caller's own keys: DCP's flattening
    turns every dict key into a string, so a key ``"3"`` finds an existing int key ``3``."""
    node: Any = root
    for depth, key in enumerate(path):
        if isinstance(node, dict) and key not in node and isinstance(key, str):
            with contextlib.suppress(ValueError):
                if int(key) in node and str(int(key)) == key:
                    key = int(key)
        last = depth == len(path) - 1
        try:
            if last:
                node[key] = value
                return
            node = node[key]
        except (KeyError, IndexError, TypeError):
            set_element(node, path[depth:], value)  # DCP creates the missing containers
            return

"""Reading one box of a stored chunk (DCP's ``ReadItem``: offsets and lengths within it) from a
verified shard file into its destination: in place when it can, else through one reused buffer,
and only the box's own bytes when it is sparse in the file."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..errors import CheckpointCorruptedError
from ._core import DTYPE_SIZES, TORCH_DTYPES, TensorInfo, VerifiedRanges, bools_valid, tensor_memory

__all__ = ["SHORT_RUN", "Staging", "read_box"]


class Staging:
    """One CPU buffer, reused for every box that cannot be read in place (a parameter on a GPU,
    a box not contiguous in the file): fresh memory for each would fault in every page again."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """``count`` elements of ``dtype`` (contents undefined), valid until the next call."""
        nbytes = count * dtype.itemsize
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # drop the old one first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes].view(dtype)


def read_box(
    files: VerifiedRanges,
    name: str,
    info: TensorInfo,
    offsets: Sequence[int],
    target: torch.Tensor,
    *,
    source: str,
    staging: Staging,
) -> None:
    """Fill ``target`` with the box of the stored tensor ``info`` that starts at ``offsets``.

    In the file (row-major) the box is a series of runs of consecutive elements, one per index
    of the dimensions before the last one it does not span fully. One run that ``target``
    can hold as it is (contiguous CPU memory of the stored dtype) is read straight into it.
    Otherwise the box goes through ``staging``: read whole from its first element to its
    last when that span is at most twice the box or its runs are short, else run by run (a
    box of a tensor split along a later dimension, as tensor parallelism does, would
    otherwise read the whole tensor on every rank).
    """
    if target.numel() == 0:
        return
    shape, lengths = info.shape, tuple(target.shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    first = sum(o * s for o, s in zip(offsets, strides, strict=True))
    span = sum((n - 1) * s for n, s in zip(lengths, strides, strict=True)) + 1
    itemsize, dtype = DTYPE_SIZES[info.dtype], TORCH_DTYPES[info.dtype]
    begin = info.begin + first * itemsize
    in_place = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    if span == target.numel() and in_place and info.dtype != "BOOL":
        files.read_into(name, begin, tensor_memory(target))
        return
    outer = next((d for d in range(len(shape) - 1, -1, -1) if lengths[d] != shape[d]), 0)
    run = math.prod(lengths[outer:]) * itemsize
    if span <= 2 * target.numel() or run < SHORT_RUN:
        staged = staging.take(span, dtype)
        memory = tensor_memory(staged)
        files.read_into(name, begin, memory)
        box = staged.as_strided(lengths, strides)
    else:
        staged = staging.take(target.numel(), dtype)
        memory = tensor_memory(staged)
        starts = itertools.product(*(range(0, n * s, s) for n, s in zip(lengths[:outer], strides[:outer], strict=True)))
        for index, start in enumerate(starts):
            files.read_into(name, begin + sum(start) * itemsize, memory[index * run : (index + 1) * run])
        box = staged.view(lengths)
    if info.dtype == "BOOL" and not bools_valid(memory):
        raise CheckpointCorruptedError(
            f"{source}: bool tensor {info.name!r} holds bytes other than 0 and 1; the file is damaged"
        )
    target.copy_(box)


SHORT_RUN = 4096
"""Bytes below which a box's runs are not read one by one (one system call each)."""

"""Every box DCP may ask of a stored chunk is read exactly: whatever its shape and position, the
destination's dtype, layout and strides, read in place, through its span or run by run."""

from __future__ import annotations

import random

import pytest
import torch

from safeckpt.distributed import boxes
from safeckpt.format.safetensors import TensorInfo
from safeckpt.storage.base import VerifiedBuffers
from safeckpt.torch.tensors import DTYPE_NAMES, tensor_memory

DTYPES = [torch.float32, torch.bfloat16, torch.bool, torch.int64, torch.uint8]


def destination(lengths: list[int], dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "transposed" and len(lengths) == 2:
        return torch.full(lengths[::-1], 7, dtype=dtype).T
    if layout == "strided" and lengths:
        return torch.full([n * 2 for n in lengths], 7, dtype=dtype)[tuple(slice(None, None, 2) for _ in lengths)]
    return torch.full(lengths, 7, dtype=dtype)


@pytest.mark.parametrize("short_run", [boxes.SHORT_RUN, 1], ids=["span", "runs"])
def test_random_boxes_read_as_narrow_gives_them(short_run: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boxes, "SHORT_RUN", short_run)  # 1: every sparse box is read run by run
    rng = random.Random(0)
    staging = boxes.Staging()
    for _ in range(1500):
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
        dtype = rng.choice(DTYPES)
        stored = torch.rand(shape) > 0.5 if dtype == torch.bool else (torch.rand(shape) * 100).to(dtype)
        head = 24  # bytes before the tensor in the file
        data = bytearray(head) + bytearray(bytes(tensor_memory(stored.contiguous().clone())) if stored.numel() else b"")
        info = TensorInfo("t", DTYPE_NAMES[dtype], shape, head, len(data))
        offsets = [rng.randint(0, d) for d in shape]
        lengths = [rng.randint(0, d - o) for d, o in zip(shape, offsets, strict=True)]
        expected = stored
        for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
            expected = expected.narrow(dim, start, length)
        target = destination(lengths, rng.choice([dtype, torch.float64]), rng.choice(["contiguous", "transposed", "strided"]))
        boxes.read_box(VerifiedBuffers({"f": memoryview(data)}), "f", info, offsets, target, source="f", staging=staging)
        assert torch.equal(target, expected.to(target.dtype)), (shape, offsets, lengths, dtype, target.dtype)


def test_a_column_block_reads_only_its_own_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor-parallel split along dimension 1: each rank reads its columns, not the tensor."""
    stored = torch.arange(64 * 4096, dtype=torch.float32).reshape(64, 4096)
    data = bytearray(bytes(tensor_memory(stored)))
    read: list[int] = []

    class Counting(VerifiedBuffers):
        def read_into(self, name: str, offset: int, view: memoryview) -> None:
            read.append(len(view))
            super().read_into(name, offset, view)

    target = torch.empty(64, 1024)
    info = TensorInfo("w", "F32", (64, 4096), 0, len(data))
    boxes.read_box(Counting({"f": memoryview(data)}), "f", info, (0, 2048), target, source="f", staging=boxes.Staging())
    assert torch.equal(target, stored[:, 2048:3072])
    assert sum(read) == target.nbytes and len(read) == 64

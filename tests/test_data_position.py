"""Data position: a resumed run gets exactly the batches the uninterrupted run would have had,
with safeckpt.data.ResumableSampler or torchdata's StatefulDataLoader in extra=; a plain
DataLoader or sampler there is refused with a message naming both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import safeckpt
from safeckpt.data import ResumableSampler

DATASET = TensorDataset(torch.arange(23) * 10)  # map-style; 23 is not a multiple of the batch size


def _take(loader: DataLoader, count: int) -> list[list[int]]:
    """``count`` batches, across epochs, stopping right after the last one (as a killed run does)."""
    out: list[list[int]] = []
    while len(out) < count:
        for (batch,) in loader:
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


def _sampled(seed: int) -> DataLoader:
    return DataLoader(DATASET, batch_size=4, sampler=ResumableSampler(DATASET, seed=seed))


def _batched(seed: int) -> DataLoader:
    return DataLoader(DATASET, batch_sampler=ResumableSampler(DATASET, batch_size=4, drop_last=True, seed=seed))


def _position(loader: DataLoader) -> object:
    return loader.batch_sampler if isinstance(loader.batch_sampler, ResumableSampler) else loader.sampler


@pytest.mark.parametrize("make", [_sampled, _batched], ids=["sampler", "batch_sampler"])
@pytest.mark.parametrize("stop_after", [0, 1, 3, 5, 6, 7, 13])  # 6 batches/epoch with drop_last, 6 without
def test_resumable_sampler_resumes_exactly(tmp_path: Path, make: Callable[[int], DataLoader], stop_after: int) -> None:
    total = 16  # almost three epochs
    reference = _take(make(7), total)
    assert reference[:6] != reference[6:12]  # each epoch is shuffled anew

    first = make(7)
    seen = _take(first, stop_after)
    path = safeckpt.save_checkpoint(torch.nn.Linear(1, 1), None, None, None, stop_after, directory=tmp_path,
                                    extra={"data": _position(first)})  # fmt: skip
    resumed = make(1234)  # another seed: everything must come from the checkpoint
    safeckpt.load_checkpoint(path, extra={"data": _position(resumed)})
    assert seen + _take(resumed, total - stop_after) == reference


def test_resumable_sampler_refuses_a_state_for_other_data(tmp_path: Path) -> None:
    sampler = ResumableSampler(DATASET, batch_size=4)
    path = safeckpt.save_checkpoint(torch.nn.Linear(1, 1), None, None, None, 1, directory=tmp_path, extra={"data": sampler})
    with pytest.raises(safeckpt.CheckpointMismatchError, match="'num_samples': 23.*'num_samples': 24"):
        safeckpt.load_checkpoint(path, extra={"data": ResumableSampler(24, batch_size=4)})


def test_stateful_dataloader_resumes_exactly(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> DataLoader:
        return stateful.StatefulDataLoader(DATASET, batch_size=4, shuffle=True)  # type: ignore[no-any-return]

    torch.manual_seed(3)
    reference = _take(make(), 6)  # one epoch
    torch.manual_seed(3)
    first = make()
    iterator = iter(first)
    seen = [next(iterator)[0].tolist() for _ in range(2)]
    path = safeckpt.save_checkpoint(torch.nn.Linear(1, 1), None, None, None, 2, directory=tmp_path, extra={"data": first})
    torch.manual_seed(99)
    resumed = make()
    safeckpt.load_checkpoint(path, extra={"data": resumed})
    assert seen + [batch.tolist() for (batch,) in resumed] == reference


@pytest.mark.parametrize("position", [DataLoader(DATASET, batch_size=4, shuffle=True), RandomSampler(DATASET)],
                         ids=["DataLoader", "RandomSampler"])  # fmt: skip
def test_plain_loader_or_sampler_in_extra_names_both_options(tmp_path: Path, position: object) -> None:
    model = torch.nn.Linear(1, 1)
    expected = r"extra\['data'\] is a \w+, which has no state_dict\(\).*StatefulDataLoader.*ResumableSampler"
    with pytest.raises(safeckpt.CheckpointUsageError, match=expected):
        safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path, extra={"data": position})
    path = safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path, extra={"data": {"epoch": 0}})
    with pytest.raises(safeckpt.CheckpointUsageError, match=expected):
        safeckpt.load_checkpoint(path, extra={"data": position})
    with pytest.raises(safeckpt.CheckpointUsageError, match=expected):
        safeckpt.CheckpointManager(tmp_path).restore(extra={"data": position})

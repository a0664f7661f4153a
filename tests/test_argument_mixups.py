"""Objects passed in the wrong argument are refused at once, with a message naming the right one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM


def test_scheduler_passed_as_optimizer_is_refused_when_saving(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    sched = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    with pytest.raises(safeckpt.CheckpointUsageError, match=r"optimizer= got a StepLR, which is a scheduler.*pass it as scheduler="):
        safeckpt.save_checkpoint(model, sched, None, None, 1, directory=tmp_path)
    assert not tmp_path.joinpath("step-00000001").exists()
    with pytest.raises(safeckpt.CheckpointUsageError, match="model= got an AdamW, which is an optimizer, not the model; pass it as optimizer="):
        safeckpt.save_checkpoint(optimizer, model, None, None, 1, directory=tmp_path)  # type: ignore[arg-type]


def test_optimizer_passed_as_model_is_refused_when_loading(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    path = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointUsageError, match=r"model= must be a torch.nn.Module.*an AdamW; pass it as optimizer="):
        safeckpt.load_checkpoint(path, optimizer)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    with pytest.raises(safeckpt.CheckpointUsageError, match="optimizer= got a StepLR, which is a scheduler"):
        safeckpt.load_checkpoint(path, model, sched)  # type: ignore[arg-type]
    with pytest.raises(safeckpt.CheckpointUsageError, match="scheduler= got an AdamW, which is an optimizer"):
        safeckpt.load_checkpoint(path, model, scheduler=optimizer)

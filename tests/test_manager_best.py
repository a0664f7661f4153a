"""CheckpointManager keeps the best K checkpoints by a metric next to the newest N, finds the best
one that verifies, and warns when keep_last=1 leaves nothing to fall back to."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import flip_bits
from safeckpt.retention import best_steps, rank_by_metric

LOSSES = {1: 0.9, 2: 0.4, 3: 0.7, 4: 0.2, 5: 0.8, 6: 0.6, 7: 0.5}


def _save(mgr: safeckpt.CheckpointManager, losses: dict[int, float], **kwargs: object) -> None:
    model = torch.nn.Linear(2, 2)
    for step, loss in losses.items():
        mgr.save(step, model=model, metrics={"val_loss": torch.tensor(loss), "epoch": step}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("async_save", [False, True])
def test_keeps_the_union_of_last_n_and_best_k(tmp_path: Path, async_save: bool) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=2, keep_best=2, metric="val_loss", async_save=async_save)
    _save(mgr, LOSSES)
    mgr.wait()
    assert mgr.steps() == [2, 4, 6, 7]  # best two (0.2, 0.4) and newest two
    assert mgr.best() == tmp_path / "step-00000004"
    metadata = json.loads((tmp_path / "step-00000004" / "manifest.json").read_text())["metadata"]
    assert metadata["metrics"] == {"val_loss": pytest.approx(0.2), "epoch": 4}  # stored as plain numbers


def test_mode_max_and_keep_best_alone(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_best=2, metric="val_loss", mode="max")
    _save(mgr, LOSSES)
    assert mgr.steps() == [1, 5, 7]  # best two by max, plus the newest (always kept for resume)
    assert mgr.best() == tmp_path / "step-00000001"


def test_best_falls_back_past_a_damaged_best(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_best=3, metric="val_loss")
    _save(mgr, LOSSES)
    flip_bits(tmp_path / "step-00000004" / "model.safetensors", 100)
    with pytest.warns(safeckpt.CheckpointFallbackWarning, match="step-00000004.*falling back to .*step-00000002"):
        assert mgr.best() == tmp_path / "step-00000002"


def test_save_without_the_metric_is_refused_before_writing(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=3, keep_best=2, metric="val_loss")
    model = torch.nn.Linear(2, 2)
    for metrics in (None, {"train_loss": 0.1}):
        with pytest.raises(safeckpt.CheckpointUsageError, match=r"keep_best=2 ranks checkpoints by 'val_loss'; pass metrics=\{'val_loss': value\}"):
            mgr.save(1, model=model, metrics=metrics)
    with pytest.raises(safeckpt.CheckpointUsageError, match="must be a number"):
        mgr.save(1, model=model, metrics={"val_loss": "low"})
    assert mgr.steps() == []
    with pytest.raises(ValueError, match="keep_best=2 needs metric="):
        safeckpt.CheckpointManager(tmp_path, keep_best=2)
    with pytest.raises(ValueError, match="mode must be 'min'"):
        safeckpt.CheckpointManager(tmp_path, keep_best=2, metric="val_loss", mode="lowest")
    with pytest.raises(safeckpt.CheckpointUsageError, match="metric="):
        safeckpt.CheckpointManager(tmp_path).best()


def test_nan_metric_is_stored_as_null_and_never_best(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=1, keep_best=1, metric="val_loss")
    _save(mgr, {1: 0.5, 2: float("nan"), 3: 0.7})
    assert mgr.steps() == [1, 3]
    assert mgr.best() == tmp_path / "step-00000001"


def test_keep_last_one_warns_once_that_nothing_is_left_to_fall_back_to(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="nothing to fall back to") as caught:
        mgr = safeckpt.CheckpointManager(tmp_path, keep_last=1)
        _save(mgr, {1: 0.1, 2: 0.2})
    assert len([w for w in caught if "fall back" in str(w.message)]) == 1
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safeckpt.CheckpointManager(tmp_path, keep_last=2)


def test_best_selection_is_a_pure_function() -> None:
    assert rank_by_metric({1: 0.3, 2: None, 3: 0.3, 4: 0.1}, mode="min") == [4, 3, 1]  # ties: newer first
    assert best_steps({1: 0.3, 2: 0.9, 3: 0.5}, keep_best=2, mode="max") == {2, 3}
    assert best_steps({}, keep_best=2, mode="min") == set()

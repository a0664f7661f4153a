"""The plan of named trees under ``save_checkpoint``: the standard trees are the format's, trees
given as they are come back as they were, and nothing outside the format reaches disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM
from safeckpt.format.tree import TREE_NAMES
from safeckpt.numpy import load_checkpoint as load_numpy
from safeckpt.torch.plan import SaveOptions, plan_trees
from safeckpt.torch.saver import save, write_checkpoint


def _listed(folder: Path) -> set[str]:
    return set(json.loads((folder / "manifest.json").read_text())["files"])


def test_every_standard_tree_is_written_as_the_format_defines_and_read_back(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer
) -> None:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    folder = safeckpt.save_checkpoint(
        model, optimizer, {"lr": 0.1}, ["a", "b"], 4, directory=tmp_path, scheduler=scheduler, extra={"epoch": 2}
    )
    trees = {f"{name}.{kind}" for name in TREE_NAMES for kind in ("safetensors", "msgpack")}
    assert _listed(folder) == {"model.safetensors", "config.json", "vocab.json"} | trees
    loaded = safeckpt.load_checkpoint(folder, restore_rng=False)
    arrays = load_numpy(folder)
    for ckpt in (loaded, arrays):
        states = {"optimizer": ckpt.optimizer_state, "scheduler": ckpt.scheduler_state, "rng": ckpt.rng_state}
        assert all(state is not None for state in states.values()), states
        assert ckpt.extra == {"epoch": 2}


def test_trees_given_as_they_are_come_back_unchanged_and_nothing_is_captured(tmp_path: Path) -> None:
    saved_rng = {"python": [3, 1, 4], "torch": torch.arange(5, dtype=torch.uint8), "generators": {}}
    optimizer = {"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.5, "params": [0]}]}
    plan = plan_trees(
        {"w": torch.ones(2)}, {"optimizer": optimizer, "scheduler": None, "rng": saved_rng}, 9, metadata={"run": "x"}
    )
    folder = write_checkpoint(plan, tmp_path)
    assert _listed(folder) == {"model.safetensors", "optimizer.safetensors", "optimizer.msgpack", "rng.safetensors", "rng.msgpack"}
    ckpt = safeckpt.load_checkpoint(folder, restore_rng=False)
    assert ckpt.step == 9 and ckpt.metadata == {"run": "x"} and ckpt.scheduler_state is None
    rng = ckpt.rng_state
    assert isinstance(rng, dict) and rng["python"] == [3, 1, 4] and torch.equal(rng["torch"], saved_rng["torch"])
    assert ckpt.optimizer_state is not None and ckpt.optimizer_state["param_groups"] == optimizer["param_groups"]


@pytest.mark.parametrize("name", ["ema", "model", "config"])
def test_a_plan_refuses_a_tree_the_format_does_not_define(tmp_path: Path, name: str) -> None:
    with pytest.raises(safeckpt.CheckpointUsageError, match=rf"'{name}' is not a state tree.*store other named state under extra"):
        plan_trees({"w": torch.ones(1)}, {name: {"a": 1}}, 1)
    plan = plan_trees({"w": torch.ones(1)}, {"extra": {"a": 1}}, 1)
    with pytest.raises(safeckpt.CheckpointUsageError, match="extra: this state tree is already planned"):
        plan.add_tree("extra", {"b": 2})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_save_with_options_calls_on_commit_with_the_committed_folder(tmp_path: Path, async_: bool) -> None:
    seen: list[tuple[Path, bool]] = []
    options = SaveOptions(
        directory=tmp_path, metadata={"m": 1}, rng=False, async_=async_,
        on_commit=lambda path: seen.append((Path(str(path)), (Path(str(path)) / "manifest.json").is_file())),
    )  # fmt: skip
    result = save({"w": torch.ones(3)}, None, None, None, 5, options)
    folder = result.wait() if isinstance(result, safeckpt.PendingSave) else result
    assert seen == [(tmp_path / "step-00000005", True)] and folder == tmp_path / "step-00000005"
    assert _listed(folder) == {"model.safetensors"}

"""CheckpointManager: restore with nothing saved, retention after commit, fallback past damaged
checkpoints, explicit steps, extra state, async saves."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import flip_bits, same_state
from conftest import TinyLM, train_steps
from safeckpt.format.manifest import MANIFEST_NAME
from safeckpt.storage import posix_commit
from safeckpt.torch import saver as saver_module


def _trained(seed: int = 0) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2, seed=seed)
    return model, opt


def _fresh() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(99)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _save_steps(mgr: safeckpt.CheckpointManager, steps: list[int]) -> dict[int, TinyLM]:
    """Save a differently trained model at each step; returns them by step."""
    models = {}
    for step in steps:
        model, opt = _trained(seed=step)
        mgr.save(step, model=model, optimizer=opt)
        models[step] = model
    return models


@pytest.mark.parametrize("exists", [False, True])
def test_restore_with_no_checkpoint_returns_none(tmp_path: Path, exists: bool) -> None:
    root = tmp_path / "ckpts"
    if exists:
        root.mkdir()
    mgr = safeckpt.CheckpointManager(root)
    model, opt = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert mgr.restore(model=model, optimizer=opt) is None
    assert mgr.latest() is None and mgr.steps() == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_then_restore_everything(tmp_path: Path) -> None:
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    train_steps(model, opt, 1)
    sched.step()
    mgr = safeckpt.CheckpointManager(tmp_path)
    path = mgr.save(7, model=model, optimizer=opt, scheduler=sched, config={"lr": 0.01}, vocab=["a"],
                    extra={"loader": {"epoch": 2, "offset": 5}}, metadata={"note": "x"})
    assert path == tmp_path / "step-00000007" and mgr.steps() == [7] and mgr.latest() == path

    model2, opt2 = _fresh()
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    ckpt = mgr.restore(model=model2, optimizer=opt2, scheduler=sched2, extra={"loader": None})
    assert ckpt is not None and ckpt.step == 7 and ckpt.config == {"lr": 0.01}
    assert ckpt.extra == {"loader": {"epoch": 2, "offset": 5}} and ckpt.metadata == {"note": "x"}
    assert same_state(model, model2)
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.005


def test_restore_extra_objects_in_place_and_missing_names_fail_before_anything(tmp_path: Path) -> None:
    model, opt = _trained()
    gen = torch.Generator().manual_seed(5)
    sampler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)  # any object with state_dict()
    train_steps(model, opt, 1)
    sampler.step()
    mgr = safeckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt, extra={"sched": sampler}, rng={"data": gen})

    model2, opt2 = _fresh()
    target = torch.optim.lr_scheduler.ExponentialLR(opt2, 0.9)
    gen2 = torch.Generator().manual_seed(123)
    mgr.restore(model=model2, optimizer=opt2, extra={"sched": target}, restore_rng={"data": gen2})
    assert target.state_dict() == sampler.state_dict()
    assert torch.equal(gen2.get_state(), gen.get_state())

    model3, _ = _fresh()
    untouched = {k: v.clone() for k, v in model3.state_dict().items()}
    with pytest.raises(safeckpt.CheckpointMismatchError, match=r"no extra state 'loader'"):
        mgr.restore(model=model3, extra={"sched": target, "loader": {"epoch": 0}})
    assert all(torch.equal(untouched[k], v) for k, v in model3.state_dict().items())


def test_keep_last_removes_oldest(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=3)
    models = _save_steps(mgr, list(range(0, 60, 10)))
    assert mgr.steps() == [30, 40, 50]
    assert not any(p.name.startswith(".") and p.is_dir() for p in tmp_path.iterdir())  # no trash left
    model, _ = _fresh()
    ckpt = mgr.restore(model=model)
    assert ckpt is not None and ckpt.step == 50 and same_state(model, models[50])


def test_keep_every_keeps_multiples_on_top_of_keep_last(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    _save_steps(mgr, list(range(10)))
    assert mgr.steps() == [0, 4, 8, 9]


def test_without_keep_last_everything_stays(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_every=5)
    _save_steps(mgr, [1, 2, 3])
    assert mgr.steps() == [1, 2, 3]


def test_retention_deletes_only_after_the_new_checkpoint_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=1)
    _save_steps(mgr, [1])
    committed_when_removed = []
    real_remove = posix_commit.remove_checkpoint

    def spy(path: Path) -> None:
        committed_when_removed.append((tmp_path / "step-00000002" / MANIFEST_NAME).is_file())
        real_remove(path)

    monkeypatch.setattr(posix_commit, "remove_checkpoint", spy)
    _save_steps(mgr, [2])
    assert committed_when_removed == [True] and mgr.steps() == [2]

    def failing_write(*args: object, **kwargs: object) -> Path:
        raise safeckpt.CheckpointWriteError(28, "disk full")

    monkeypatch.setattr(saver_module, "write_checkpoint", failing_write)
    with pytest.raises(safeckpt.CheckpointWriteError):
        _save_steps(mgr, [3])
    assert mgr.steps() == [2] and committed_when_removed == [True]


def test_unsupported_value_writes_and_deletes_nothing(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=1)
    _save_steps(mgr, [1])
    model, opt = _trained()
    with pytest.raises(safeckpt.UnsupportedValueError, match="extra"):
        mgr.save(2, model=model, optimizer=opt, extra={"bad": object()})
    assert mgr.steps() == [1]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: flip_bits(p / "model.safetensors", -1, 0xFF), "SHA-256"),
        (lambda p: (p / "optimizer.msgpack").unlink(), "optimizer.msgpack"),
        (lambda p: (p / MANIFEST_NAME).write_text("{not json"), MANIFEST_NAME),
    ],
    ids=["corrupt", "file-missing", "manifest-damaged"],
)
def test_latest_and_restore_fall_back_past_a_damaged_newest(
    tmp_path: Path, damage: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    models = _save_steps(mgr, [10, 20, 30])
    damage(tmp_path / "step-00000030")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="safeckpt"), pytest.warns(safeckpt.CheckpointFallbackWarning) as caught:
        assert mgr.latest() == tmp_path / "step-00000020"
    message = str(caught[0].message)
    assert "step-00000030" in message and "step-00000020" in message and reason in message
    assert any("step-00000030" in r.getMessage() and "step-00000020" in r.getMessage() for r in caplog.records)
    assert caught[0].filename == __file__  # points at the caller

    model, opt = _fresh()
    with pytest.warns(safeckpt.CheckpointFallbackWarning, match="falling back to"):
        ckpt = mgr.restore(model=model, optimizer=opt)
    assert ckpt is not None and ckpt.step == 20 and same_state(model, models[20])


def test_uncommitted_step_folder_is_announced_and_skipped(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    _save_steps(mgr, [10, 20])
    partial = tmp_path / "step-00000030"
    shutil.copytree(tmp_path / "step-00000020", partial)
    (partial / MANIFEST_NAME).unlink()  # e.g. a copy of the run that stopped half-way
    with pytest.warns(safeckpt.CheckpointFallbackWarning, match=r"step-00000030.*never committed.*step-00000020"):
        assert mgr.latest() == tmp_path / "step-00000020"


def test_all_damaged_raises_instead_of_starting_over(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    _save_steps(mgr, [1, 2])
    for step in (1, 2):
        flip_bits(tmp_path / f"step-{step:08d}" / "model.safetensors", -1, 0xFF)
    model, _ = _fresh()
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"none of the 2 checkpoint\(s\) verifies"):
        mgr.restore(model=model)
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="step-00000001"):
        mgr.latest()


def test_restore_reads_the_newest_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    _save_steps(mgr, [1, 2])
    import safeckpt.torch.loader as loader_module

    calls = []
    real = loader_module.read_checkpoint_files

    def counting(folder: Path, **kwargs: object) -> object:
        calls.append(folder.name)
        return real(folder, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader_module, "read_checkpoint_files", counting)
    model, _ = _fresh()
    mgr.restore(model=model)
    assert calls == ["step-00000002"]


def test_restore_a_given_step(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    models = _save_steps(mgr, [1, 2, 3])
    model, _ = _fresh()
    ckpt = mgr.restore(model=model, step=2)
    assert ckpt is not None and ckpt.step == 2 and same_state(model, models[2])
    with pytest.raises(safeckpt.CheckpointNotFoundError, match=r"no committed checkpoint for step 7 \(available: \[1, 2, 3\]\)"):
        mgr.restore(model=model, step=7)
    flip_bits(tmp_path / "step-00000002" / "model.safetensors", -1, 0xFF)
    with pytest.raises(safeckpt.CheckpointCorruptedError):  # an explicit step never falls back
        mgr.restore(model=model, step=2)


def test_missing_rng_state_is_an_error_unless_opted_out(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    model, opt = _trained()
    mgr.save(1, model=model, optimizer=opt, rng=False)
    model2, opt2 = _fresh()
    with pytest.raises(safeckpt.CheckpointMismatchError, match="no RNG state"):
        mgr.restore(model=model2, optimizer=opt2)
    assert mgr.restore(model=model2, optimizer=opt2, restore_rng=False) is not None


def test_restore_brings_back_global_rng(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    model, _ = _trained()
    random.seed(3)
    torch.manual_seed(3)
    mgr.save(1, model=model)
    expected = (random.random(), torch.rand(3))
    random.seed(4)
    torch.manual_seed(4)
    mgr.restore(model=model)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_existing_step_raises_but_a_damaged_one_is_replaced(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path)
    _save_steps(mgr, [5])
    model, opt = _trained(seed=42)
    with pytest.raises(safeckpt.CheckpointExistsError, match="already exists and verifies"):
        mgr.save(5, model=model, optimizer=opt)
    flip_bits(tmp_path / "step-00000005" / "model.safetensors", -1, 0xFF)
    mgr.save(5, model=model, optimizer=opt)
    fresh, _ = _fresh()
    assert mgr.restore(model=fresh) is not None and same_state(fresh, model)
    model.hidden.bias.data.add_(1.0)
    mgr.save(5, model=model, optimizer=opt, overwrite=True)
    assert mgr.restore(model=fresh) is not None and same_state(fresh, model)


def test_async_save_snapshots_then_commits_and_applies_retention(tmp_path: Path) -> None:
    with safeckpt.CheckpointManager(tmp_path, keep_last=2, async_save=True) as mgr:
        model, opt = _trained()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        path = mgr.save(1, model=model, optimizer=opt)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on while the save is written
        assert path == tmp_path / "step-00000001"
        mgr.save(2, model=model, optimizer=opt)  # waits for step 1 first: one save in flight
        mgr.save(3, model=model, optimizer=opt)
    assert mgr.steps() == [2, 3]
    step2 = safeckpt.load_checkpoint(tmp_path / "step-00000002", restore_rng=False)
    assert torch.equal(step2.model_state["hidden.bias"], model.state_dict()["hidden.bias"])

    with safeckpt.CheckpointManager(tmp_path / "other", async_save=True) as mgr2:
        mgr2.save(1, model=saved)
    ckpt = safeckpt.load_checkpoint(tmp_path / "other", restore_rng=False)
    assert all(torch.equal(ckpt.model_state[k], v) for k, v in saved.items())


def test_async_retention_runs_when_the_save_commits_not_at_the_next_call(tmp_path: Path) -> None:
    mgr = safeckpt.CheckpointManager(tmp_path / "run", keep_last=1, async_save=True)
    model, opt = _trained()
    mgr.save(1, model=model, optimizer=opt)
    mgr.save(2, model=model, optimizer=opt)
    # Any other save waits for the one in flight (one per process), commit and retention included.
    safeckpt.save_checkpoint(model, None, None, None, 0, directory=tmp_path / "elsewhere")
    assert mgr.steps() == [2]  # without calling mgr.wait(): a run that just ends keeps keep_last


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_removal_warns_and_the_save_still_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    mgr = safeckpt.CheckpointManager(tmp_path, keep_last=1, async_save=async_save)
    model, opt = _trained()
    mgr.save(1, model=model, optimizer=opt)
    mgr.wait()
    monkeypatch.setattr(posix_commit, "remove_checkpoint", refuse)
    with pytest.warns(RuntimeWarning, match=r"step-00000001: could not remove this old checkpoint \(Permission denied\)"):
        assert mgr.save(2, model=model, optimizer=opt) == tmp_path / "step-00000002"
        mgr.wait()  # the background save's error, if it had one, is raised here
    assert mgr.steps() == [1, 2]


def test_async_save_error_surfaces_on_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(*args: object, **kwargs: object) -> Path:
        raise safeckpt.CheckpointWriteError(5, "I/O error")

    monkeypatch.setattr(saver_module, "write_checkpoint", failing_write)
    mgr = safeckpt.CheckpointManager(tmp_path, async_save=True)
    model, opt = _trained()
    mgr.save(1, model=model, optimizer=opt)
    with pytest.raises(safeckpt.CheckpointWriteError, match="I/O error"):
        mgr.wait()
    mgr.wait()  # reported once
    mgr.save(2, model=model, optimizer=opt)
    with pytest.raises(safeckpt.CheckpointWriteError):
        mgr.close()
    assert mgr.steps() == []


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_every": -1}, {"keep_last": True}])
def test_rejects_bad_retention_settings(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        safeckpt.CheckpointManager(tmp_path, **kwargs)  # type: ignore[arg-type]

"""``safeckpt prune`` and the retention rules it shares with ``CheckpointManager``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import safeckpt
from ckpt_tools import flip_bits, leftovers
from cli_tools import cli, cli_process
from conftest import TinyLM
from safeckpt.retention import check_policy, steps_to_keep, steps_to_remove
from safeckpt.storage.local import list_checkpoints

STEPS = [0, 3, 4, 8, 9, 12, 13, 14]


def _run(root: Path, model: TinyLM, steps: list[int]) -> None:
    for step in steps:
        safeckpt.save_checkpoint(model, None, None, None, step, directory=root, rng=False)


def _steps(root: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(root)]


@pytest.mark.parametrize(("keep_last", "keep_every"), [(1, None), (3, None), (2, 4), (3, 6), (20, None)])
def test_prune_leaves_what_the_manager_would(
    tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str], keep_last: int, keep_every: int | None
) -> None:
    with warnings.catch_warnings():  # keep_last=1 warns that nothing is left to fall back to
        warnings.simplefilter("ignore", UserWarning)
        manager = safeckpt.CheckpointManager(tmp_path / "managed", keep_last=keep_last, keep_every=keep_every)
    for step in STEPS:
        manager.save(step, model=model, rng=False)
    _run(tmp_path / "pruned", model, STEPS)
    argv = ["prune", tmp_path / "pruned", "--keep-last", keep_last] + (["--keep-every", keep_every] if keep_every else [])
    result = cli(capsys, *argv, "--json")
    assert result.code == 0
    report = result.json("prune")
    assert _steps(tmp_path / "pruned") == _steps(tmp_path / "managed") == report["kept"]
    assert sorted(report["removed"] + report["kept"]) == STEPS  # type: ignore[operator]
    assert leftovers(tmp_path / "pruned") == []  # removed through the commit protocol, nothing left


def test_dry_run_removes_nothing(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, model, STEPS)
    result = cli(capsys, "prune", tmp_path, "--keep-last", "2", "--dry-run")
    assert result.code == 0 and _steps(tmp_path) == STEPS
    assert "would remove step 0" in result.out and "would remove step 12" in result.out
    assert "would remove step 13" not in result.out


def test_uncommitted_folders_are_left_alone(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, model, [1, 2, 3])
    (tmp_path / "step-00000000").mkdir()  # never committed: not prune's to judge
    assert cli(capsys, "prune", tmp_path, "--keep-last", "1").code == 0
    assert _steps(tmp_path) == [3] and (tmp_path / "step-00000000").is_dir()


def test_prune_in_a_process(tmp_path: Path, model: TinyLM) -> None:
    _run(tmp_path, model, [1, 2, 3])
    result = cli_process("prune", tmp_path, "--keep-last", "2")
    assert result.code == 0 and "removed step 1" in result.out and _steps(tmp_path) == [2, 3]
    missing = cli_process("prune", tmp_path / "none", "--keep-last", "2")
    assert missing.code == 1 and "is not a folder" in missing.err


def test_retention_examples() -> None:
    assert sorted(steps_to_keep([100, 200, 300, 400, 500], keep_last=2, keep_every=200)) == [200, 400, 500]
    assert steps_to_keep([5, 1, 3], keep_last=None) == {1, 3, 5}
    assert steps_to_keep([1, 2, 3], keep_last=1, protect={2, 9}) == {2, 3}
    assert steps_to_keep([1, 2, 3, 4], keep_last=None, best={2}, protect={4}) == {2, 4}  # best-K alone
    assert steps_to_keep([1, 2, 3, 4], keep_last=1, best={1}) == {1, 4}
    assert steps_to_remove([3, 1, 2, 4], keep_last=2) == [1, 2]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep_last must be a positive int"):
            check_policy(keep_last=bad, keep_every=None, caller="x")  # type: ignore[arg-type]


@given(st.sets(st.integers(0, 10**6), max_size=30), st.integers(1, 10), st.one_of(st.none(), st.integers(1, 50)))
def test_retention_rules_hold(steps: set[int], keep_last: int, keep_every: int | None) -> None:
    keep = steps_to_keep(steps, keep_last=keep_last, keep_every=keep_every)
    assert keep <= steps
    assert set(sorted(steps)[-keep_last:]) <= keep  # the newest N
    if keep_every:
        assert {s for s in steps if s % keep_every == 0} <= keep  # every milestone
    extra = keep - set(sorted(steps)[-keep_last:])
    assert all(keep_every and s % keep_every == 0 for s in extra)  # nothing else
    assert set(steps_to_remove(steps, keep_last=keep_last, keep_every=keep_every)) == steps - keep


def test_manager_still_protects_the_step_it_just_saved(tmp_path: Path, model: TinyLM) -> None:
    manager = safeckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 5):  # resumed from an older step: the new save is kept
        manager.save(step, model=model, rng=False)
    assert manager.steps() == [5, 10, 20]  # the newest two, and 5: it was just saved
    assert torch.equal(safeckpt.load_checkpoint(manager.path(5), restore_rng=False).model_state["hidden.weight"], model.hidden.weight)


@pytest.mark.parametrize("keep_last", [1, 2])
def test_prune_never_deletes_the_newest_checkpoint_that_verifies(
    tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str], keep_last: int
) -> None:
    _run(tmp_path, model, [10, 20, 30, 40])
    for step in (30, 40):  # bit rot in the two newest: 20 is the run's last good checkpoint
        flip_bits(tmp_path / f"step-000000{step}" / "model.safetensors", -1)
    result = cli(capsys, "prune", tmp_path, "--keep-last", keep_last, "--json")
    assert result.code == 1  # a checkpoint failed verification
    report = result.json("prune")
    assert report["verified"] == 20 and [f["step"] for f in report["failed"]] == [40, 30]  # type: ignore[union-attr]
    assert "SHA-256" in report["failed"][0]["error"]  # type: ignore[index]
    assert 20 in _steps(tmp_path) and 10 not in _steps(tmp_path)
    assert safeckpt.load_checkpoint(tmp_path / "step-00000020", restore_rng=False).step == 20
    text = cli(capsys, "prune", tmp_path, "--keep-last", keep_last)
    assert text.code == 1 and "FAILED step 40" in text.out and "kept step 20" in text.out and "model.safetensors" in text.err


def test_prune_removes_nothing_when_no_checkpoint_verifies(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, model, [1, 2, 3])
    for step in (1, 2, 3):
        flip_bits(tmp_path / f"step-0000000{step}" / "model.safetensors", -1)
    result = cli(capsys, "prune", tmp_path, "--keep-last", "1")
    assert result.code == 1 and _steps(tmp_path) == [1, 2, 3]
    assert "none of the 3 committed checkpoint(s) verifies, so nothing was removed" in result.err


def test_prune_verifies_only_until_one_verifies(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from safeckpt.cli import _files

    _run(tmp_path, model, [1, 2, 3])
    audited: list[str] = []
    real = _files.audit
    monkeypatch.setattr(_files, "audit", lambda folder, manifest, **kw: (audited.append(folder.name), real(folder, manifest, **kw))[1])
    result = cli(capsys, "prune", tmp_path, "--keep-last", "1", "--json")
    assert result.code == 0 and result.json("prune")["failed"] == [] and audited == ["step-00000003"]

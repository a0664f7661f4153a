"""A save interrupted anywhere (an error from any file-system call, the process dying at any call,
SIGKILL at a random moment) leaves exactly the old or the new checkpoint loadable, and the next
save leaves no temporary or trash folder behind."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import crash_child
import safeckpt
from ckpt_tools import leftovers
from crash_child import Faults, expected_small, loaded_fingerprint, save_small, start_forkserver
from safeckpt.format import layout
from safeckpt.storage import posix_commit as commit
from safeckpt.storage.local import list_checkpoints

STRESS = os.environ.get("SAFECKPT_STRESS") == "1"
OLD, NEW, NEXT = 1, 2, 3
"""Contents (seeds of ``small_state``) of the checkpoint before, during and after the fault."""

VARIANTS = {
    "new-step": (NEW, False, True),
    "overwrite": (OLD, True, True),
    "overwrite-without-renameat2": (OLD, True, False),
}
"""variant -> (step the interrupted save writes, overwrite, renameat2 available)."""


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    """Children forked from a server that imported torch and safeckpt once (a fork per trial)."""
    return start_forkserver()


@pytest.fixture
def template(tmp_path: Path) -> Path:
    root = tmp_path / "template"
    save_small(root, OLD, content=OLD)
    return root


def count_calls(template: Path, tmp_path: Path, step: int, overwrite: bool) -> list[str]:
    root = Path(shutil.copytree(template, tmp_path / "count"))
    with Faults(0) as counter:
        save_small(root, step, content=NEW, overwrite=overwrite)
    shutil.rmtree(root)
    return counter.calls


def check_after_fault(root: Path, step: int, *, hidden_ok: bool = False) -> str:
    """The newest checkpoint is the old or the new state; the next save cleans up. Returns which."""
    try:
        loaded_step, found = loaded_fingerprint(root)
    except safeckpt.CheckpointNotFoundError:
        # Only without renameat2: killed between moving the old folder aside and renaming the new
        # one into place. The old folder waits under a trash name for the next save to restore.
        assert hidden_ok and any(n.startswith(".trash-step-") for n in os.listdir(root)), os.listdir(root)
        outcome = "hidden"
    else:
        if found == expected_small(NEW):
            assert loaded_step == step
            outcome = "new"
        else:
            assert (loaded_step, found) == (OLD, expected_small(OLD))
            outcome = "old"
    save_small(root, 10, content=NEXT)
    assert leftovers(root) == [], outcome
    assert loaded_fingerprint(root) == (10, expected_small(NEXT))
    states = {s: loaded_fingerprint(path)[1] for s, path in list_checkpoints(root)}
    assert states[OLD] in (expected_small(OLD), expected_small(NEW))
    if outcome == "hidden":
        assert states[OLD] == expected_small(OLD)
    return outcome


@pytest.mark.parametrize("variant", VARIANTS)
def test_error_at_every_file_system_call_of_a_save(
    variant: str, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, overwrite, exchange = VARIANTS[variant]
    if not exchange:
        monkeypatch.setattr(commit, "_renameat2", lambda src, dst, flags: False)
    calls = count_calls(template, tmp_path, step, overwrite)
    assert {"open", "write", "fsync", "close", "mkdir", "flock"} <= set(calls), calls
    assert ("rename" in calls) == (not exchange), calls  # the fallback renames twice
    outcomes: dict[str, int] = {}
    for at in range(1, len(calls) + 1):
        root = Path(shutil.copytree(template, tmp_path / f"at{at}"))
        error: safeckpt.CheckpointError | None = None
        with Faults(at) as faults:
            try:
                save_small(root, step, content=NEW, overwrite=overwrite)
            except safeckpt.CheckpointError as exc:  # any other exception fails the test
                error = exc
        assert faults.fired, (at, calls)
        if error is not None:
            assert isinstance(error, safeckpt.CheckpointWriteError), repr(error)
            assert "injected" in str(error) and "could not" in str(error), str(error)
        outcome = check_after_fault(root, step)
        if error is not None and "may not survive a power loss" not in str(error):
            assert outcome == "old", (at, faults.fired, str(error))  # a failed save changes nothing
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(root)
    assert outcomes.get("old") and outcomes.get("new"), outcomes


@pytest.mark.parametrize("variant", VARIANTS)
def test_process_exit_at_every_file_system_call_of_a_save(
    variant: str, template: Path, tmp_path: Path, forkserver: multiprocessing.context.BaseContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    step, overwrite, exchange = VARIANTS[variant]
    if not exchange:
        monkeypatch.setattr(commit, "_renameat2", lambda src, dst, flags: False)
    calls = count_calls(template, tmp_path, step, overwrite)
    outcomes: dict[str, int] = {}
    for at in range(1, len(calls) + 2):
        root = Path(shutil.copytree(template, tmp_path / f"at{at}"))
        child = forkserver.Process(target=crash_child.exit_at, args=(str(root), step, NEW, at, overwrite, exchange))
        child.start()
        child.join(60)
        assert child.exitcode == (0 if at > len(calls) else Faults.EXIT_CODE), (at, child.exitcode)
        outcome = check_after_fault(root, step, hidden_ok=not exchange)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(root)
    assert outcomes.get("old") and outcomes.get("new"), outcomes
    if overwrite and exchange:
        assert "hidden" not in outcomes


def measure_save_times(root: Path, forkserver: multiprocessing.context.BaseContext) -> tuple[float, float]:
    """Seconds from a child's start to its first commit, and between its first two commits, as
    this machine runs them right now (the kill times below follow from these, not from a guess)."""
    child = forkserver.Process(target=crash_child.save_forever, args=(str(root), 0, 2))
    started = time.monotonic()
    child.start()
    commits: list[float] = []
    try:
        while len(commits) < 2:
            assert child.is_alive(), "the calibrating child died"
            committed = len(list_checkpoints(root))
            commits.extend([time.monotonic()] * (min(committed, 2) - len(commits)))
            time.sleep(0.005)  # polling interval only; nothing below depends on it
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
    shutil.rmtree(root)
    return commits[0] - started, commits[1] - commits[0]


@pytest.mark.slow
def test_sigkill_at_random_times_during_large_saves(tmp_path: Path, forkserver: multiprocessing.context.BaseContext) -> None:
    """A child saves 50-200 MB checkpoints back to back (pruning to the last two); the parent
    kills it at a random moment, loads the newest checkpoint and compares it bit for bit with
    the state saved at that step; then starts the next child on the same folder.

    Kill times are drawn from a window measured on this machine (a child's time to its first
    commit plus one more save), so kills land before, during and after commits on a fast
    machine and on a slow or busy one alike. The window widens (up to threefold) after a trial
    that found no new commit and narrows back after one that did, so it follows the machine if
    it gets slower or faster than when it was measured."""
    trials = 1000 if STRESS else 100
    rng = random.Random(7)
    root = tmp_path / "run"
    first_commit, one_save = measure_save_times(root, forkserver)
    window = measured = first_commit + one_save
    seen_steps: set[int] = set()
    next_step = 0
    for trial in range(trials):
        child = forkserver.Process(target=crash_child.save_forever, args=(str(root), next_step, 2))
        child.start()
        time.sleep(rng.uniform(0.0, window))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
        assert child.exitcode == -signal.SIGKILL, (trial, child.exitcode)
        found = list_checkpoints(root)
        if not found or found[-1][0] < next_step:  # killed before this child's first commit
            window = min(window * 1.05, 3 * measured)
        else:
            window = max(window / 1.05, measured)
        if not found:  # killed before the very first commit
            assert not seen_steps, (trial, os.listdir(root))
            continue
        ckpt = safeckpt.load_checkpoint(root, restore_rng=False)
        expected = crash_child.big_state(ckpt.step)
        assert sorted(ckpt.model_state) == sorted(expected), trial
        for name, tensor in expected.items():
            loaded = ckpt.model_state[name]
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, (trial, name)
            assert torch.equal(loaded.view(torch.uint8), tensor.view(torch.uint8)), (trial, ckpt.step, name)
        seen_steps.add(ckpt.step)
        next_step = found[-1][0] + 1
        del ckpt, expected
    # Kills landed both before and after commits: some trials found a newer checkpoint than the
    # last, others (killed mid-save) the same one.
    assert 2 <= len(seen_steps) < trials, (len(seen_steps), first_commit, one_save, window)
    print(f"kill window {measured:.2f}-{window:.2f} s, {len(seen_steps)} checkpoints seen")
    save_small(root, next_step)
    assert leftovers(root) == []


def test_next_save_removes_dead_writers_folders_never_a_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "run"
    save_small(root, OLD, content=OLD)
    dead = root / f"{layout.TMP_PREFIX}step-00000007.{'0' * 32}"  # nobody holds its lock
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half written")
    moved_aside = root / f"{layout.TRASH_PREFIX}step-00000004.{'1' * 32}"  # an overwrite that died
    shutil.copytree(root / "step-00000001", moved_aside)
    deleted = root / f"{layout.TRASH_PREFIX}deleted.{'2' * 32}"
    deleted.mkdir()
    with commit.PosixPendingWrite(root, 9) as live:  # a live writer in the middle of its save
        (live.path / "model.safetensors").write_bytes(b"in progress")
        save_small(root, NEW, content=NEW)
        assert live.path.is_dir() and (live.path / "model.safetensors").read_bytes() == b"in progress"
        assert not dead.exists() and not deleted.exists() and not moved_aside.exists()
        assert loaded_fingerprint(root / "step-00000004") == (OLD, expected_small(OLD))  # put back
    assert not live.path.exists()  # left without committing: removed by its own writer
    assert leftovers(root) == []

"""Background saves: a consistent snapshot, one save in flight, errors that always surface, and
nothing committed lost when the process dies mid-save."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import run_python
from conftest import TinyLM, train_steps
from safeckpt.storage import posix_commit
from safeckpt.storage.local import list_checkpoints
from safeckpt.torch import background, saver
from safeckpt.torch import plan as planning


@pytest.fixture(autouse=True)
def _no_leftover_saves() -> Iterator[None]:
    yield
    background.release_snapshot_memory()
    background._last = None


class _Gate:
    """Holds the first background write until :meth:`open`; later writes pass straight through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log: list[str] | None = None) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        real = posix_commit.write_files

        def gated(*args: object, **kwargs: object) -> object:
            if log is not None:
                log.append("write")
            if not self.entered.is_set():
                self.entered.set()
                self._open.wait(30)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(posix_commit, "write_files", gated)

    def open(self) -> None:
        self._open.set()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_snapshot_is_taken_before_the_call_returns(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [t.clone() for t in _optimizer_tensors(optimizer)]
    gate = _Gate(monkeypatch)
    pending = safeckpt.save_checkpoint(model, optimizer, None, None, 3, directory=tmp_path, async_=True)
    assert not pending.done()
    train_steps(model, optimizer, 2)  # training goes on while nothing is written yet
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gate.open()
    path = pending.wait()
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    safeckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(moments, _optimizer_tensors(fresh_opt), strict=True))


def test_a_second_save_waits_for_the_first(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    real_snapshot = planning.CheckpointPlan.snapshot

    def logged_snapshot(plan: planning.CheckpointPlan) -> None:
        log.append(f"snapshot {plan.step}")
        real_snapshot(plan)

    monkeypatch.setattr(planning.CheckpointPlan, "snapshot", logged_snapshot)
    gate = _Gate(monkeypatch, log)
    first = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True)
    gate.entered.wait(30)
    second: list[safeckpt.PendingSave] = []
    started = threading.Event()

    def save_again() -> None:
        started.set()
        second.append(safeckpt.save_checkpoint(model, optimizer, None, None, 2, directory=tmp_path, async_=True))

    thread = threading.Thread(target=save_again)
    thread.start()
    started.wait(10)
    thread.join(0.5)  # without the guard the second snapshot would happen now, while the first waits
    log.append("release first")
    gate.open()
    thread.join(30)
    assert first.wait().name == "step-00000001"
    assert second[0].wait().name == "step-00000002"
    assert log == ["snapshot 1", "write", "release first", "snapshot 2", "write"]


def test_a_synchronous_save_also_waits(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch)
    first = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True)
    timer = threading.Timer(0.3, gate.open)
    timer.start()
    safeckpt.save_checkpoint(model, optimizer, None, None, 2, directory=tmp_path)
    assert first.done()  # it committed before the synchronous save could start
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


def _failing_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(posix_commit, "write_files", full)


def test_error_surfaces_from_wait(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_writes(monkeypatch)
    pending = safeckpt.save_checkpoint(model, optimizer, None, None, 5, directory=tmp_path, async_=True)
    with pytest.raises(safeckpt.CheckpointWriteError, match="disk is full"):
        pending.wait()
    with pytest.raises(safeckpt.CheckpointWriteError):  # again: the error stays with the save
        pending.wait()
    assert pending.done() and "failed" in repr(pending)
    monkeypatch.undo()
    assert safeckpt.save_checkpoint(model, optimizer, None, None, 5, directory=tmp_path).name == "step-00000005"
    assert sorted(os.listdir(tmp_path)) == [".safeckpt.lock", "step-00000005"]


def test_uncollected_error_is_raised_by_the_next_save(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_writes(monkeypatch)
    failed = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True)
    failed._thread.join()  # finished, but nobody called wait()
    monkeypatch.undo()
    with pytest.raises(safeckpt.CheckpointWriteError, match="disk is full"):
        safeckpt.save_checkpoint(model, optimizer, None, None, 2, directory=tmp_path, async_=True)
    assert safeckpt.save_checkpoint(model, optimizer, None, None, 2, directory=tmp_path, async_=True).wait().exists()


def test_existing_step_is_refused_before_copying(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointExistsError, match="overwrite=True"):
        safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True)
    pending = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True, overwrite=True)
    assert pending.wait() == pending.path == tmp_path / "step-00000001"


def test_wait_with_timeout(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _Gate(monkeypatch)
    pending = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True)
    with pytest.raises(TimeoutError, match="still being written"):
        pending.wait(timeout=0.01)
    assert "writing" in repr(pending)
    gate.open()
    assert pending.wait() == tmp_path / "step-00000001"
    assert "committed" in repr(pending)


def test_next_snapshot_reuses_the_memory_of_the_last(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, async_=True).wait()
    kept = {name: {k: t.data_ptr() for k, t in ts.items()} for name, ts in background._kept.items()}
    assert kept["model"] and kept["optimizer"]
    live = {t.data_ptr() for t in [*model.state_dict().values(), *_optimizer_tensors(optimizer)]}
    assert not live & {p for ts in kept.values() for p in ts.values()}  # copies, never the caller's tensors
    plan = planning.plan_checkpoint(model, optimizer, None, None, 2)
    plan.snapshot()
    for name, archive in plan.archives.items():
        for key, tensor in archive.tensors.items():
            assert tensor.data_ptr() == kept[name][key], (name, key)
    background.release_snapshot_memory()
    assert background._kept == {}


def test_snapshot_of_every_kind_of_tensor_is_exact_and_independent(tmp_path: Path) -> None:
    state = {
        "f16": torch.randn(5, 3).half(),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(11),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(40.0).reshape(8, 5).t(),
        "big": torch.randn(300_000),  # several huge pages of snapshot memory
    }
    expected = {k: v.clone() for k, v in state.items()}
    pending = safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path, async_=True)
    for tensor in state.values():
        tensor.zero_()  # the caller's tensors change at once; the snapshot must not
    pending.wait()
    loaded = safeckpt.load_checkpoint(tmp_path).model_state
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    background.release_snapshot_memory()


def test_on_commit_runs_after_the_commit_and_its_error_is_the_saves(
    tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer
) -> None:
    seen: list[bool] = []
    plan = planning.plan_checkpoint(model, optimizer, None, None, 1)
    pending = saver.write_checkpoint_async(plan, tmp_path, on_commit=lambda p: seen.append((p / "manifest.json").exists()))
    assert pending.wait() == tmp_path / "step-00000001" and seen == [True]

    def fail(path: Path) -> None:
        raise RuntimeError(f"pruning after {path.name} failed")

    plan = planning.plan_checkpoint(model, optimizer, None, None, 2)
    with pytest.raises(RuntimeError, match="after step-00000002"):
        saver.write_checkpoint_async(plan, tmp_path, on_commit=fail).wait()


def test_death_mid_async_save_loses_nothing_committed(tmp_path: Path) -> None:
    done = run_python(
        """
        import os, signal, torch, safeckpt
        from safeckpt.torch import saver
        from safeckpt.storage import posix_commit
        from conftest import TinyLM
        torch.manual_seed(0)
        model = TinyLM()
        safeckpt.save_checkpoint(model, None, None, None, 1, directory="run")
        real = posix_commit.write_files
        def die_midway(dir_fd, files, **kwargs):
            real(dir_fd, files[:1], **kwargs)  # one file written, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)
        posix_commit.write_files = die_midway
        with torch.no_grad():
            model.hidden.weight.add_(1)
        safeckpt.save_checkpoint(model, None, None, None, 2, directory="run", async_=True).wait()
        """,
        tmp_path,
    )
    assert done.returncode == -9, done.stderr
    root = tmp_path / "run"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # the interrupted save
    torch.manual_seed(0)
    expected = TinyLM()
    fresh = TinyLM()
    assert safeckpt.load_checkpoint(root, model=fresh, restore_rng=False).step == 1
    assert torch.equal(fresh.hidden.weight, expected.hidden.weight)
    safeckpt.save_checkpoint(fresh, None, None, None, 2, directory=root)
    assert sorted(p.name for p in root.iterdir()) == [".safeckpt.lock", "step-00000001", "step-00000002"]


def test_interpreter_exit_waits_for_the_background_save(tmp_path: Path) -> None:
    done = run_python(
        """
        import safeckpt
        from conftest import TinyLM
        safeckpt.save_checkpoint(TinyLM(), None, None, None, 7, directory="run", async_=True)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert safeckpt.verify_checkpoint(tmp_path / "run").step == 7


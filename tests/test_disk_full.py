"""Disk full and file-size limits: the save fails with ``CheckpointWriteError`` saying so, the
previous checkpoint stays intact and loadable, and nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import crash_child
import safeckpt
from ckpt_tools import leftovers
from crash_child import Faults, expected_small, loaded_fingerprint, save_small, start_forkserver

OLD, NEW = 1, 2


def check_intact(root: Path) -> None:
    assert loaded_fingerprint(root) == (OLD, expected_small(OLD))
    assert leftovers(root) == []
    save_small(root, 5, content=5)  # the next save works and still leaves nothing behind
    assert leftovers(root) == []
    assert loaded_fingerprint(root) == (5, expected_small(5))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs mounted under ``tmp_path`` (needs root; CI runs as root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the fault-injection tests cover ENOSPC")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({done.stderr.strip()}); fault injection covers ENOSPC")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_real_disk_full_at_every_point_of_a_save(small_tmpfs: Path) -> None:
    root = small_tmpfs / "run"
    save_small(root, OLD, content=OLD)
    model, tree = crash_child.small_state(NEW)
    model = {**model, "big": torch.arange(64 * 1024, dtype=torch.float32)}  # 256 KiB
    filler = small_tmpfs / "filler"
    failures = 0
    # Leave 0, 4, 8, ... KiB free: the disk fills in each file and at the manifest in turn.
    for leave in range(0, 320 * 1024, 4096):
        with open(filler, "wb") as handle:
            handle.truncate(0)
            os.posix_fallocate(handle.fileno(), 0, max(free_bytes(small_tmpfs) - leave, 1))
        try:
            safeckpt.save_checkpoint(model, None, None, None, NEW, directory=root, extra={"opt": tree}, rng=False)
        except safeckpt.CheckpointWriteError as exc:
            failures += 1
            assert exc.errno == errno.ENOSPC and "the disk is full" in str(exc), str(exc)
            assert "earlier checkpoints are untouched" in str(exc)
            filler.unlink()
            assert loaded_fingerprint(root) == (OLD, expected_small(OLD)) and leftovers(root) == [], leave
        else:
            filler.unlink()
            break
    assert failures >= 40, failures  # the loop really did run out of space many times first
    shutil.rmtree(root / "step-00000002")
    check_intact(root)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_error_at_every_write_and_fsync(tmp_path: Path, code: int) -> None:
    root = tmp_path / "run"
    save_small(root, OLD, content=OLD)
    with Faults(0, only=("write", "fsync")) as counter:
        save_small(Path(shutil.copytree(root, tmp_path / "count")), NEW, content=NEW)
    assert counter.calls.count("fsync") >= 3, counter.calls
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "quota", errno.EIO: "I/O error"}[code]
    for at in range(1, len(counter.calls) + 1):
        with Faults(at, code=code, only=("write", "fsync")) as faults, pytest.raises(safeckpt.CheckpointWriteError) as info:
            save_small(root, NEW, content=NEW)
        assert faults.fired and info.value.errno == code and hint in str(info.value), str(info.value)
        assert leftovers(root) == [], (at, faults.fired)  # the failed save removed its folder itself
        if "may not survive a power loss" in str(info.value):
            # The last fsync (of the root, after the rename) failed: the new checkpoint is in place,
            # complete, and the error says its durability is unknown.
            assert at == len(counter.calls) and loaded_fingerprint(root) == (NEW, expected_small(NEW))
            shutil.rmtree(root / "step-00000002")
        assert loaded_fingerprint(root) == (OLD, expected_small(OLD))
    check_intact(root)


def test_file_size_limit_in_a_child(tmp_path: Path) -> None:
    root = tmp_path / "run"
    save_small(root, OLD, content=OLD)
    result = tmp_path / "result.json"
    child = start_forkserver().Process(
        target=crash_child.save_under_file_size_limit, args=(str(root), 256 * 1024, str(result))
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    outcome = json.loads(result.read_text())
    assert outcome["error"] == "CheckpointWriteError", outcome
    assert outcome["errno"] == errno.EFBIG and "file-size limit" in outcome["message"], outcome
    check_intact(root)

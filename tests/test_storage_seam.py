"""The storage seam: a commit finished by a coordinator from entries several writers reported,
manifest.build, and the protocols' contract on the local implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt.format import manifest as manifest_format
from safeckpt.storage.base import CheckpointStorage
from safeckpt.storage.local import LocalStorage
from safeckpt.torch.tensors import archive_parts


def _model_file(weight: torch.Tensor) -> tuple[str, list[memoryview | bytes], int]:
    return ("model.safetensors", list(archive_parts({"w": weight}, None)), 0)


def test_a_coordinator_commits_files_that_several_writers_wrote(tmp_path: Path) -> None:
    storage: CheckpointStorage = LocalStorage(tmp_path)
    weight = torch.arange(6, dtype=torch.float32)
    with storage.begin(5) as pending:
        rank0 = pending.write_files([_model_file(weight)])
        rank1 = pending.write_files([("rank1.bin", [b"shard of rank 1"], 0)])
        assert not (pending.final / "manifest.json").exists()  # nothing visible before the commit
        assert storage.list_checkpoints() == []
        manifest = manifest_format.build(5, rank1 + rank0, metadata={"world_size": 2})
        final = pending.commit(manifest)
    assert storage.list_checkpoints() == [(5, final)] and final.name == "step-00000005"
    written = json.loads((final / "manifest.json").read_text())
    assert list(written["files"]) == ["model.safetensors", "rank1.bin"] and written["metadata"] == {"world_size": 2}
    assert safeckpt.verify_checkpoint(final).step == 5
    ckpt = safeckpt.load_checkpoint(final, restore_rng=False)
    assert torch.equal(ckpt.model_state["w"], weight)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_another_process_joins_the_staging_area_and_the_coordinator_commits(tmp_path: Path, where: str) -> None:
    """What a rank of a sharded save does: a second storage object for the same root (as in
    another process) writes into the staging area named by ``pending.staging``."""
    import uuid

    from safeckpt.storage.locate import as_location, storage_for

    root = as_location(str(tmp_path) if where == "local" else f"memory://seam-{uuid.uuid4().hex[:8]}")
    coordinator, rank1 = storage_for(root), storage_for(root)
    weight = torch.arange(4, dtype=torch.float32)
    with coordinator.begin(2) as pending:
        theirs = rank1.join(pending.staging).write_files([("rank1.bin", [b"shard of rank 1"], 0)])
        ours = pending.write_files([_model_file(weight)])
        assert coordinator.list_checkpoints() == []
        final = pending.commit(manifest_format.build(2, ours + theirs))
    assert [step for step, _ in coordinator.list_checkpoints()] == [2]
    assert {e.name for e in safeckpt.verify_checkpoint(final).files} == {"model.safetensors", "rank1.bin"}
    with pytest.raises(safeckpt.CheckpointUsageError, match="staging name"):
        rank1.join("../elsewhere")
    with coordinator.begin(3) as pending:
        staging = pending.staging
    if where == "local":  # a discarded temporary folder cannot be written into any more
        with pytest.raises(safeckpt.CheckpointWriteError, match="temporary folder"):
            rank1.join(staging).write_files([("rank1.bin", [b"late"], 0)])
    else:  # an object store has no folder to remove: a late upload is named by no manifest
        rank1.join(staging).write_files([("rank1.bin", [b"late"], 0)])
    assert [step for step, _ in coordinator.list_checkpoints()] == [2]


def test_an_uncommitted_write_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(RuntimeError, match="rank 3 died"), storage.begin(1) as pending:
        pending.write_files([("a.bin", [b"a"], 0)])
        raise RuntimeError("rank 3 died")
    assert storage.list_checkpoints() == [] and [p for p in tmp_path.iterdir() if p.name != ".safeckpt.lock"] == []


def test_build_refuses_duplicate_names_from_two_writers(tmp_path: Path) -> None:
    entry = manifest_format.FileEntry(name="x.bin", size=1, sha256="0" * 64)
    with pytest.raises(safeckpt.CheckpointUsageError, match="x.bin"):
        manifest_format.build(1, [entry, entry])


def test_build_stamps_versions_and_the_lowest_format_version() -> None:
    entry = manifest_format.FileEntry(name="model.safetensors", size=1, sha256="0" * 64)
    built = manifest_format.build(3, [entry], producer={"torch": "x"})
    assert built.format_version == (1, 0) and built.producer["torch"] == "x" and "safeckpt" in built.producer
    assert manifest_format.Manifest.from_json_bytes(built.to_json_bytes(), source="m") == built


_READ_WITHOUT_THE_TRANSACTION = r"""
import json, sys
from pathlib import Path
import safeckpt.cli.inspect, safeckpt.cli.verify, safeckpt.numpy, safeckpt.pipeline.read
from safeckpt.storage.local import LocalStorage
def loaded():
    return sorted(m for m in ("fcntl", "safeckpt.storage.posix_commit") if m in sys.modules)
root = Path(sys.argv[1])
safeckpt.numpy.load_checkpoint(root)
safeckpt.verify_checkpoint(root)
reading = loaded()
with LocalStorage(root / "other").begin(1):  # the control: a write takes the lock
    writing = loaded()
print(json.dumps({"reading": reading, "writing": writing}))
"""


def test_readers_load_the_commit_transaction_only_when_they_write(tmp_path: Path) -> None:
    # Reading a checkpoint (torch-free) needs its names, not flock and renameat2: the transaction
    # stays out of the readers' imports, so a platform or a read-only mount without them can read.
    safeckpt.save_checkpoint({"w": torch.ones(3)}, None, None, None, 1, directory=tmp_path, rng=False)
    done = subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_THE_TRANSACTION, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"reading": [], "writing": ["fcntl", "safeckpt.storage.posix_commit"]}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_open_verified_reads_ranges_of_verified_files_with_few_open_at_once(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a sharded load does: verify every file it needs, then read pieces of them in any
    order; locally at most ``open_at_once`` files are held open (the rest reopened on use)."""
    import uuid

    from safeckpt.storage.locate import as_location, storage_for
    from safeckpt.storage.tuning import TUNING

    monkeypatch.setattr(TUNING, "open_at_once", 2)
    root = as_location(str(tmp_path) if where == "local" else f"memory://ranges-{uuid.uuid4().hex[:8]}")
    storage = storage_for(root)
    contents = {f"part{i}.bin": bytes(range(i, i + 200)) * (i + 1) for i in range(5)}
    with storage.begin(1) as pending:
        final = pending.commit(manifest_format.build(1, pending.write_files([(n, [d], 0) for n, d in contents.items()])))
    with storage.open(final) as folder:
        files = folder.open_verified(folder.read_manifest().files)
    for name in ["part0.bin", "part4.bin", "part1.bin", "part3.bin", "part0.bin", "part2.bin", "part4.bin"]:
        piece = bytearray(50)
        files.read_into(name, 7, memoryview(piece))
        assert piece == contents[name][7:57]
    files.close()


def test_open_verified_refuses_a_damaged_file_and_one_replaced_after_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safeckpt.storage.tuning import TUNING

    monkeypatch.setattr(TUNING, "open_at_once", 1)
    storage = LocalStorage(tmp_path)
    with storage.begin(1) as pending:
        entries = pending.write_files([("a.bin", [b"a" * 1000], 0), ("b.bin", [b"b" * 1000], 0)])
        final = pending.commit(manifest_format.build(1, entries))
    with storage.open(final) as folder:
        files = folder.open_verified(folder.read_manifest().files)
    files.read_into("b.bin", 0, memoryview(bytearray(10)))  # a.bin is closed now (one open at a time)
    replacement = final / "a.new"
    replacement.write_bytes(b"A" * 1000)
    os.replace(replacement, final / "a.bin")  # same name and size, another file
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"a\.bin: was modified or replaced while the checkpoint was being loaded"):
        files.read_into("a.bin", 0, memoryview(bytearray(10)))
    files.close()

    (final / "a.bin").write_bytes(b"a" * 1000)  # as saved again
    (final / "b.bin").write_bytes(b"B" * 1000)
    with storage.open(final) as folder, pytest.raises(safeckpt.CheckpointCorruptedError, match=r"b\.bin: SHA-256"):
        folder.open_verified(folder.read_manifest().files)


def test_running_out_of_file_descriptors_is_not_reported_as_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE says nothing about the checkpoint: no CheckpointCorruptedError (which would make a
    manager fall back to an older checkpoint), and the message says what to raise."""
    import errno

    folder = safeckpt.save_checkpoint(torch.nn.Linear(2, 2), None, {}, [], 1, directory=tmp_path, rng=False)
    real_open = os.open

    def no_descriptors_left(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", no_descriptors_left)
    with pytest.raises(safeckpt.CheckpointError, match=r"model\.safetensors: cannot be opened: too many open files .*ulimit -n") as caught:
        safeckpt.load_checkpoint(folder, restore_rng=False)
    assert not isinstance(caught.value, safeckpt.CheckpointCorruptedError)

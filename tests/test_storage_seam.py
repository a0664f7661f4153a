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

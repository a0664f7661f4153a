"""save_checkpoint(path=FOLDER): commit to exactly that folder, with the same atomic protocol."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import assert_same_state, leftovers
from conftest import TinyLM


def test_saves_into_exactly_that_folder_and_loads_from_it(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    target = tmp_path / "runs" / "final"
    path = safeckpt.save_checkpoint(model, optimizer, {"lr": 1}, None, 7, path=target)
    assert path == target and (target / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path / "runs")) == [".safeckpt.lock", "final"]  # no tmp left
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt = safeckpt.load_checkpoint(target, model=fresh, optimizer=fresh_opt)
    assert ckpt.step == 7 and ckpt.config == {"lr": 1}
    assert_same_state(model, fresh)
    assert_same_state(optimizer, fresh_opt)
    assert safeckpt.verify_checkpoint(target).step == 7


def test_never_replaces_an_existing_folder_unless_overwrite(tmp_path: Path, model: TinyLM) -> None:
    target = tmp_path / "final"
    safeckpt.save_checkpoint(model, None, None, None, 1, path=target, rng=False)
    with pytest.raises(safeckpt.CheckpointExistsError, match="overwrite=True") as info:
        safeckpt.save_checkpoint(model, None, None, None, 2, path=target, rng=False)
    assert str(target) in str(info.value)
    assert safeckpt.load_checkpoint(target, restore_rng=False).step == 1
    safeckpt.save_checkpoint(model, None, None, None, 2, path=target, rng=False, overwrite=True)
    assert safeckpt.load_checkpoint(target, restore_rng=False).step == 2 and leftovers(tmp_path) == []


def test_the_exists_error_names_the_step_only_when_the_folder_is_that_steps(tmp_path: Path, model: TinyLM) -> None:
    target = tmp_path / "final"
    safeckpt.save_checkpoint(model, None, None, None, 3, path=target, rng=False)
    with pytest.raises(safeckpt.CheckpointExistsError) as info:
        safeckpt.save_checkpoint(model, None, None, None, 4, path=target, rng=False)
    assert "a checkpoint already exists there (this save is step 4)" in str(info.value)
    assert "for step 4" not in str(info.value)  # the folder holds step 3
    safeckpt.save_checkpoint(model, None, None, None, 5, directory=tmp_path / "run", rng=False)
    with pytest.raises(safeckpt.CheckpointExistsError, match="a checkpoint for step 5 already exists;"):
        safeckpt.save_checkpoint(model, None, None, None, 5, directory=tmp_path / "run", rng=False)


def test_an_existing_non_checkpoint_folder_is_never_replaced(tmp_path: Path, model: TinyLM) -> None:
    target = tmp_path / "final"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(safeckpt.CheckpointExistsError):
        safeckpt.save_checkpoint(model, None, None, None, 1, path=target, rng=False)
    assert (target / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path: Path, model: TinyLM) -> None:
    """path= can name any folder: overwrite=True must not delete a project that happens to be there."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(safeckpt.CheckpointExistsError, match="even with overwrite=True") as info:
            safeckpt.save_checkpoint(model, None, None, None, 1, path=project, rng=False, overwrite=overwrite)
        assert str(project) in str(info.value) and "Save under another path" in str(info.value)
    assert (project / "src" / "train.py").read_text() == "mine" and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()  # what overwrite=True replaces: an empty folder, a (damaged) checkpoint, a link
    safeckpt.save_checkpoint(model, None, None, None, 2, path=tmp_path / "empty", rng=False, overwrite=True)
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"damaged")
    safeckpt.save_checkpoint(model, None, None, None, 3, path=tmp_path / "empty", rng=False, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    safeckpt.save_checkpoint(model, None, None, None, 4, path=tmp_path / "link", rng=False, overwrite=True)
    assert not (tmp_path / "link").is_symlink() and safeckpt.load_checkpoint(tmp_path / "link", restore_rng=False).step == 4
    assert safeckpt.load_checkpoint(tmp_path / "empty", restore_rng=False).step == 3  # the link alone was replaced
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["step-00000005", "model.pt"])
def test_a_file_in_the_way_is_named_as_a_file_and_overwrite_leaves_nothing_behind(
    tmp_path: Path, model: TinyLM, name: str
) -> None:
    """As torch.save replaces a file: a stray file where the checkpoint goes (a step's name in a
    root, or path=) is named as a file, and overwrite=True replaces it without a hidden leftover."""
    (tmp_path / name).write_text("junk")
    where = {"directory": tmp_path} if name.startswith("step-") else {"path": tmp_path / name}
    with pytest.raises(safeckpt.CheckpointExistsError, match="a file, not a checkpoint, is in the way"):
        safeckpt.save_checkpoint(model, None, None, None, 5, rng=False, **where)  # type: ignore[arg-type]
    safeckpt.save_checkpoint(model, None, None, None, 5, rng=False, overwrite=True, **where)  # type: ignore[arg-type]
    assert safeckpt.load_checkpoint(tmp_path / name, restore_rng=False).step == 5 and leftovers(tmp_path) == []


def test_async_save_to_a_path(tmp_path: Path, model: TinyLM) -> None:
    pending = safeckpt.save_checkpoint(model, None, None, None, 3, path=tmp_path / "a", rng=False, async_=True)
    assert pending.wait() == tmp_path / "a" and safeckpt.load_checkpoint(tmp_path / "a", restore_rng=False).step == 3


def test_directory_and_path_are_mutually_exclusive(tmp_path: Path, model: TinyLM) -> None:
    with pytest.raises(safeckpt.CheckpointUsageError, match="either directory= .* or path=") as info:
        safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path, path=tmp_path / "x", rng=False)
    assert isinstance(info.value, TypeError) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["..", ".hidden"])
def test_path_must_name_a_plain_folder(tmp_path: Path, model: TinyLM, bad: str) -> None:
    with pytest.raises(safeckpt.CheckpointUsageError, match="path= must name the checkpoint folder"):
        safeckpt.save_checkpoint(model, None, None, None, 1, path=tmp_path / bad, rng=False)


def test_the_next_save_puts_back_a_path_checkpoint_moved_aside_by_a_dead_overwrite(tmp_path: Path, model: TinyLM) -> None:
    target = tmp_path / "final"
    safeckpt.save_checkpoint(model, None, None, None, 1, path=target, rng=False)
    os.rename(target, tmp_path / ".trash-final.0123abcd")  # the fallback window of an overwrite
    safeckpt.save_checkpoint(model, None, None, None, 5, path=tmp_path / "other", rng=False)
    assert safeckpt.load_checkpoint(target, restore_rng=False).step == 1 and leftovers(tmp_path) == []

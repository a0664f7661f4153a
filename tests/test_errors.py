"""Missing, damaged and mismatched checkpoints fail with the right error and a useful message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM

FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.msgpack", "config.json", "vocab.json",
         "extra.safetensors", "extra.msgpack", "rng.safetensors", "rng.msgpack"]  # fmt: skip


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.CheckpointNotFoundError, match=str(tmp_path / "nope")):
        safeckpt.load_checkpoint(tmp_path / "nope")


def test_empty_root_says_there_is_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="no checkpoint here"):
        safeckpt.load_checkpoint(tmp_path)


def test_a_torch_save_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A stock Lightning ``last.ckpt`` or a ``.pt`` passed where a checkpoint is expected: the
    error says what the file is and how to convert it, not that it does not exist."""
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "last.ckpt")
    with pytest.raises(safeckpt.CheckpointNotFoundError) as info:
        safeckpt.load_checkpoint(tmp_path / "last.ckpt")
    message = str(info.value)
    assert "is a torch.save file" in message and f"safeckpt convert {tmp_path / 'last.ckpt'}" in message


def test_folder_without_manifest_was_never_committed(saved: Path) -> None:
    (saved / "manifest.json").unlink()
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="never committed"):
        safeckpt.load_checkpoint(saved)


def test_root_skips_uncommitted_newer_folder(saved: Path) -> None:
    newer = saved.parent / "step-00000099"
    newer.mkdir()
    (newer / "model.safetensors").write_bytes(b"partial")
    assert safeckpt.load_checkpoint(saved.parent).step == 3


@pytest.mark.parametrize("name", FILES)
def test_missing_listed_file(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="listed in manifest.json is missing") as info:
        safeckpt.load_checkpoint(saved)
    assert name in str(info.value)


@pytest.mark.parametrize("name", FILES)
def test_flipped_byte_in_each_file_is_caught_by_the_hash(saved: Path, name: str) -> None:
    target = saved / name
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="SHA-256") as info:
        safeckpt.load_checkpoint(saved)
    assert name in str(info.value) and "load an earlier checkpoint" in str(info.value)


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_caught_by_the_size(saved: Path, name: str) -> None:
    target = saved / name
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="truncated") as info:
        safeckpt.load_checkpoint(saved)
    assert name in str(info.value)


def test_no_file_is_parsed_when_a_hash_does_not_match(saved: Path, parser_calls: list[tuple[str, dict]]) -> None:
    # parser_calls spies on every parser wherever it was imported; test_corruption proves the
    # spies are wired (a good load calls every one of them).
    target = saved / "vocab.json"  # the last file read must still stop every parse
    target.write_bytes(target.read_bytes().replace(b'"a"', b'"A"'))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="vocab.json"):
        safeckpt.load_checkpoint(saved)
    assert [name for name, _ in parser_calls] == ["load_json"]  # the manifest only


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: "not json", "invalid JSON"),
        (lambda m: json.dumps({**m, "format": "other"}), "not a safeckpt manifest"),
        (lambda m: json.dumps({**m, "format_version": "2.0"}), "upgrade safeckpt"),
        (lambda m: json.dumps({**m, "step": -1}), "'step'"),
        (lambda m: json.dumps({**m, "files": {"../model.safetensors": m["files"]["model.safetensors"]}}), "not allowed"),
        (lambda m: json.dumps({**m, "files": {"/etc/passwd": m["files"]["model.safetensors"]}}), "not allowed"),
        (lambda m: json.dumps({**m, "files": {k: v for k, v in m["files"].items() if k != "model.safetensors"}}), "model.safetensors"),
        (lambda m: json.dumps(m)[:-1] + ', "step": 3}', "duplicate key"),
    ],
    ids=["not-json", "format", "major-version", "step", "traversal", "absolute", "no-model", "duplicate-key"],
)
def test_invalid_manifest(saved: Path, mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    manifest = saved / "manifest.json"
    manifest.write_text(mutate(json.loads(manifest.read_text())))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=match) as info:
        safeckpt.load_checkpoint(saved)
    assert "manifest.json" in str(info.value)


def test_newer_minor_version_with_unknown_fields_still_loads(saved: Path) -> None:
    manifest = saved / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc.update(format_version="1.7", future_field={"x": 1})
    manifest.write_text(json.dumps(doc))
    assert safeckpt.load_checkpoint(saved).step == 3


def test_model_mismatch_lists_every_difference_before_copying(saved: Path) -> None:
    class Other(TinyLM):
        def __init__(self) -> None:
            super().__init__(dim=4)
            self.extra_layer = torch.nn.Linear(2, 2)

    target = Other()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(safeckpt.CheckpointMismatchError) as info:
        safeckpt.load_checkpoint(saved, model=target)
    message = str(info.value)
    assert "missing keys: extra_layer.weight, extra_layer.bias" in message
    assert "embed.weight: checkpoint has (17, 8) float32, model has (17, 4) float32" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_dtype_mismatch_is_reported_when_strict(saved: Path) -> None:
    target = TinyLM().to(torch.float64)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="float64"):
        safeckpt.load_checkpoint(saved, model=target)


def test_non_strict_load_ignores_unexpected_keys(tmp_path: Path, model: TinyLM) -> None:
    state = dict(model.state_dict(), unused=torch.ones(1))
    safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path)
    fresh = TinyLM()
    safeckpt.load_checkpoint(tmp_path, model=fresh, strict=False)
    assert torch.equal(fresh.hidden.weight, model.hidden.weight)


def test_optimizer_mismatch_is_reported(saved: Path, model: TinyLM) -> None:
    wrong = torch.optim.AdamW(list(model.parameters())[:2], lr=1e-2)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="parameters in the checkpoint"):
        safeckpt.load_checkpoint(saved, optimizer=wrong)


def test_optimizer_requested_but_not_saved(tmp_path: Path, model: TinyLM) -> None:
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="no optimizer state"):
        safeckpt.load_checkpoint(tmp_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_missing_rng_state_is_an_error_unless_opted_out(tmp_path: Path, model: TinyLM) -> None:
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path, rng=False)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="restore_rng=False"):
        safeckpt.load_checkpoint(tmp_path)
    assert safeckpt.load_checkpoint(tmp_path, restore_rng=False).step == 1


def test_resuming_training_without_rng_state_warns_loudly(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path, rng=False)
    with pytest.warns(safeckpt.MissingRNGStateWarning, match="will differ from the original run"):
        safeckpt.load_checkpoint(tmp_path, model=model, optimizer=optimizer, restore_rng=False)


@pytest.mark.parametrize("state", [{"torch": torch.get_rng_state()}, ["python", "torch"], None])
def test_malformed_rng_state_is_corruption_not_a_mismatch(state: object) -> None:
    from safeckpt.torch.rng import restore_rng

    with pytest.raises(safeckpt.CheckpointCorruptedError, match="RNG state is malformed") as info:
        restore_rng(state, source="ckpt")
    assert not isinstance(info.value, safeckpt.CheckpointMismatchError) and "restore_rng=False" in str(info.value)

"""Every scenario of the user's original requirements (shared/seed/checkpointing-spec.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safeckpt
from conftest import TinyLM, train_steps

CONFIG = {"lr": 1e-2, "batch_size": 4, "model": {"dim": 8, "vocab": 17}}
VOCAB = [chr(97 + i) for i in range(17)]


def _fresh() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(123)  # different init from the fixture's model
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


# Requirement: Checkpoint Save


def test_save_checkpoint_creates_files(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    path = safeckpt.save_checkpoint(model, optimizer, CONFIG, VOCAB, 3, directory=tmp_path / "checkpoints")
    assert path == tmp_path / "checkpoints" / "step-00000003"
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.msgpack", "config.json",
            "vocab.json", "manifest.json"} <= names  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3
    assert manifest["format"] == "safeckpt"
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert json.loads((path / "config.json").read_text()) == CONFIG
    assert json.loads((path / "vocab.json").read_text()) == VOCAB


def test_checkpoint_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    monkeypatch.chdir(tmp_path)
    path = safeckpt.save_checkpoint(model, optimizer, CONFIG, VOCAB, 7)
    assert path.resolve().parent == (tmp_path / "checkpoints").resolve()  # organised under checkpoints/
    weights = load_file(path / "model.safetensors")  # binary weights readable by plain safetensors
    assert torch.equal(weights["embed.weight"], model.embed.weight)
    json.loads((path / "manifest.json").read_text())  # metadata is human-readable JSON


# Requirement: Checkpoint Load


def test_load_restores_model_state(saved: Path, model: TinyLM) -> None:
    fresh, _ = _fresh()
    safeckpt.load_checkpoint(saved, model=fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
        assert a.dtype == b.dtype


def test_load_restores_optimizer_state(saved: Path, optimizer: torch.optim.Optimizer) -> None:
    fresh_model, fresh_opt = _fresh()
    safeckpt.load_checkpoint(saved, model=fresh_model, optimizer=fresh_opt)
    original, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for pid, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(value, restored["state"][pid][key]), (pid, key)


def test_load_restores_training_state(saved: Path) -> None:
    ckpt = safeckpt.load_checkpoint(saved)
    assert isinstance(ckpt, safeckpt.Checkpoint)
    assert ckpt.step == 3
    assert ckpt.config == {"lr": 1e-2, "layers": 1, "name": "tiny"}
    assert ckpt.vocab == [chr(97 + i) for i in range(17)]
    assert ckpt.extra == {"loader": {"epoch": 1, "offset": 12}}
    assert ckpt.path == saved


# Requirement: Resume Training


def _resume_run(tmp_path: Path, total: int, stop: int) -> tuple[list[float], TinyLM, int]:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = [train_steps(model, opt, 1, seed=step)[0] for step in range(stop)]
    safeckpt.save_checkpoint(model, opt, CONFIG, VOCAB, stop - 1, directory=tmp_path)
    model, opt = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = safeckpt.load_checkpoint(tmp_path, model=model, optimizer=opt)
    start = ckpt.step + 1
    losses += [train_steps(model, opt, 1, seed=step)[0] for step in range(start, total)]
    return losses, model, start


def test_resume_continues_step_count(tmp_path: Path) -> None:
    _, _, start = _resume_run(tmp_path, total=8, stop=5)
    assert start == 5
    assert safeckpt.load_checkpoint(tmp_path).step == 4


def test_resume_produces_identical_loss_progression(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    uninterrupted = [train_steps(model, opt, 1, seed=step)[0] for step in range(8)]
    resumed, resumed_model, _ = _resume_run(tmp_path, total=8, stop=5)
    assert resumed == uninterrupted  # exact on CPU
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_restores_complete_state(saved: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    fresh_model, fresh_opt = _fresh()
    ckpt = safeckpt.load_checkpoint(saved, model=fresh_model, optimizer=fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True))
    assert fresh_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert (ckpt.config, ckpt.vocab, ckpt.step) == ({"lr": 1e-2, "layers": 1, "name": "tiny"}, [chr(97 + i) for i in range(17)], 3)


# Requirement: Checkpoint Error Handling


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    missing = tmp_path / "checkpoints" / "step-00000009"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        safeckpt.load_checkpoint(missing)
    assert isinstance(info.value, safeckpt.CheckpointNotFoundError)
    assert str(missing) in str(info.value)


def test_corrupted_checkpoint_file(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted") as info:
        safeckpt.load_checkpoint(saved)
    assert isinstance(info.value, safeckpt.CheckpointCorruptedError)
    assert "model.safetensors" in str(info.value)

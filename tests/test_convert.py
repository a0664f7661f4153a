"""Migration from and to torch.save files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM
from safeckpt.cli import main
from safeckpt.convert import export_torch_checkpoint, import_torch_checkpoint


def test_import_common_layout_keeps_everything(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4, "best": 0.5}, legacy)
    path = import_torch_checkpoint(legacy, tmp_path / "ckpts")
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt = safeckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, restore_rng=False)
    assert ckpt.step == 4 and ckpt.extra == {"epoch": 4, "best": 0.5}  # epoch kept: it is not a step
    assert ckpt.metadata == {"converted_from": "legacy.pt"}
    assert torch.equal(fresh.hidden.weight, model.hidden.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_import_bare_state_dict_via_cli(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "weights.pth"
    torch.save(model.state_dict(), legacy)
    assert main(["convert", str(legacy), str(tmp_path / "c"), "--step", "12"]) == 0
    assert "weights_only=True" in capsys.readouterr().out
    assert safeckpt.load_checkpoint(tmp_path / "c", restore_rng=False).step == 12


def test_import_refuses_arbitrary_objects(tmp_path: Path) -> None:
    legacy = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "obj": Path("x")}, legacy)  # not allowed by weights_only
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="weights_only=True"):
        import_torch_checkpoint(legacy, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_import_without_model_says_what_was_looked_for(tmp_path: Path) -> None:
    legacy = tmp_path / "odd.pt"
    torch.save({"weights_here": 1}, legacy)
    with pytest.raises(safeckpt.UnsupportedValueError, match="model_state_dict"):
        import_torch_checkpoint(legacy, tmp_path / "c")


def test_export_round_trip(saved: Path, model: TinyLM, tmp_path: Path) -> None:
    out = export_torch_checkpoint(saved, tmp_path / "out.pt")
    doc = torch.load(out, weights_only=True)
    assert doc["step"] == 3 and doc["vocab"][0] == "a"
    assert torch.equal(doc["model"]["hidden.weight"], model.hidden.weight)
    assert doc["model"]["head.weight"] is doc["model"]["embed.weight"]

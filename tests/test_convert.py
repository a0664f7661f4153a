"""Migration from and to torch.save files: ``safeckpt convert`` / ``export`` and their Python
functions."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import safeckpt
from ckpt_tools import state_fingerprint
from cli_tools import cli, cli_process
from conftest import TinyLM
from safeckpt.convert import convert_torch_file, export_torch_checkpoint, import_torch_checkpoint
from safeckpt.export import EXPORT_TARGETS, export_checkpoint

# -- convert: layouts ----------------------------------------------------------------------


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
    result = cli(capsys, "convert", legacy, tmp_path / "c", "--step", "12")
    assert result.code == 0 and "weights_only=True" in result.out
    assert safeckpt.load_checkpoint(tmp_path / "c", restore_rng=False).step == 12


def test_namespace_and_numpy_values_convert(tmp_path: Path, model: TinyLM) -> None:
    legacy = tmp_path / "train.pt"
    args = argparse.Namespace(lr=np.float64(3e-4), layers=np.int64(2), name="run", betas=(0.9, 0.95), dtype=np.dtype("float16"))
    torch.save(
        {"model": model.state_dict(), "args": args, "best": np.float32(0.25), "history": np.arange(4, dtype=np.int32),
         "flags": np.bool_(True), "step": np.int64(30), "vocab": ["a", "b"]},
        legacy,
    )  # fmt: skip
    conversion = convert_torch_file(legacy, tmp_path / "c")
    ckpt = safeckpt.load_checkpoint(conversion.path, restore_rng=False)
    assert ckpt.step == 30 and conversion.placed["args"] == "config" and ckpt.vocab == ["a", "b"]
    assert ckpt.config == {"lr": 3e-4, "layers": 2, "name": "run", "betas": [0.9, 0.95], "dtype": "float16"}
    assert type(ckpt.config["layers"]) is int  # type: ignore[index]
    assert ckpt.extra["best"] == 0.25 and ckpt.extra["flags"] is True
    assert torch.equal(ckpt.extra["history"], torch.arange(4, dtype=torch.int32))  # type: ignore[arg-type]


def _save_with_own_class(tmp_path: Path, legacy: Path) -> None:
    """Write a file holding a dataclass from a module that only that process can import."""
    (tmp_path / "mylab_config.py").write_text(textwrap.dedent("""
        import dataclasses
        @dataclasses.dataclass
        class TrainConfig:
            lr: float = 0.001
            layers: int = 4
    """))
    code = textwrap.dedent(f"""
        import torch, mylab_config
        torch.save({{"model": {{"w": torch.ones(2)}}, "config": mylab_config.TrainConfig(), "step": 5}}, {str(legacy)!r})
    """)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    (tmp_path / "mylab_config.py").unlink()  # gone: converting must not need (or run) it


def test_other_classes_are_named_with_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "cfg.pt"
    _save_with_own_class(tmp_path, legacy)
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"mylab_config\.TrainConfig.*--allow-class mylab_config\.TrainConfig"):
        import_torch_checkpoint(legacy, tmp_path / "c")
    result = cli(capsys, "convert", legacy, tmp_path / "c")
    assert result.code == 1 and "--allow-class mylab_config.TrainConfig" in result.err
    assert "add_safe_globals" not in result.err and "\x1b[" not in result.err and "weights_only=False" not in result.err
    assert not (tmp_path / "c").exists()


def test_allowed_class_becomes_config_without_importing_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "cfg.pt"
    _save_with_own_class(tmp_path, legacy)
    result = cli(capsys, "convert", legacy, tmp_path / "c", "--allow-class", "mylab_config.TrainConfig")
    assert result.code == 0, result.err
    assert "mylab_config" not in sys.modules
    ckpt = safeckpt.load_checkpoint(tmp_path / "c", restore_rng=False)
    assert ckpt.config == {"lr": 0.001, "layers": 4} and ckpt.step == 5


def test_legacy_zip_less_files_get_the_same_messages(tmp_path: Path) -> None:
    legacy = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(1)}, "where": Path("x")}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"--allow-class pathlib\.\w*Path"):
        import_torch_checkpoint(legacy, tmp_path / "c")
    name = re.search(r"--allow-class (pathlib\.\w*Path)", _error(lambda: import_torch_checkpoint(legacy, tmp_path / "c")))
    assert name is not None
    path = import_torch_checkpoint(legacy, tmp_path / "c", allow_classes=[name.group(1)])
    assert safeckpt.load_checkpoint(path, restore_rng=False).extra == {"where": "x"}


def _error(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except safeckpt.CheckpointError as exc:
        return str(exc)
    raise AssertionError("no error")


def test_unreadable_file_message_is_clean(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02this is not a pickle" * 4)
    message = _error(lambda: import_torch_checkpoint(junk, tmp_path / "c"))
    assert "junk.pt" in message and "weights_only=True" in message and "damaged or not a torch.save file" in message
    assert "\x1b[" not in message and "add_safe_globals" not in message


def test_import_without_model_says_what_was_looked_for(tmp_path: Path) -> None:
    legacy = tmp_path / "odd.pt"
    torch.save({"weights_here": 1}, legacy)
    with pytest.raises(safeckpt.UnsupportedValueError, match="model_state_dict"):
        import_torch_checkpoint(legacy, tmp_path / "c")


def test_convert_cli_messages(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "step": 3}, legacy)
    first = cli(capsys, "convert", legacy, tmp_path / "c")
    assert first.code == 0 and "restore_rng=False" in first.out and "no RNG state" in first.out
    again = cli(capsys, "convert", legacy, tmp_path / "c")
    assert again.code == 1 and "--overwrite" in again.err and "overwrite=True" not in again.err
    assert cli(capsys, "convert", legacy, tmp_path / "c", "--overwrite").code == 0
    with pytest.raises(safeckpt.CheckpointMismatchError, match="restore_rng=False"):
        safeckpt.load_checkpoint(tmp_path / "c")


# -- export --------------------------------------------------------------------------------


@pytest.fixture
def full(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> Path:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    optimizer.step()  # no gradients: changes nothing, but a scheduler step must follow one
    scheduler.step()
    return safeckpt.save_checkpoint(
        model, optimizer, {"lr": 1e-2, "name": "tiny"}, ["a", "b", "c"], 40, directory=tmp_path / "run",
        scheduler=scheduler, extra={"loader": {"epoch": 2, "offset": 7}, "ema": {"w": torch.arange(3.0)}},
        metadata={"git": "abc123"},
    )  # fmt: skip


def test_export_torch_then_convert_is_a_round_trip(full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.pt"
    assert cli(capsys, "export", full, out).code == 0
    doc = torch.load(out, weights_only=True)
    assert doc["step"] == 40 and doc["vocab"] == ["a", "b", "c"] and doc["model"]["head.weight"] is doc["model"]["embed.weight"]
    assert cli(capsys, "convert", out, tmp_path / "back").code == 0
    before = safeckpt.load_checkpoint(full, restore_rng=False)
    after = safeckpt.load_checkpoint(tmp_path / "back", restore_rng=False)
    assert after.path.name == "step-00000040" and after.step == 40
    assert (after.config, after.vocab) == (before.config, before.vocab)
    assert after.metadata == {**before.metadata, "converted_from": "out.pt"}
    assert state_fingerprint(after.model_state, after.optimizer_state, after.extra) == state_fingerprint(
        before.model_state, before.optimizer_state, before.extra
    )
    assert after.scheduler_state == before.scheduler_state and after.rng_state is None


def test_export_safetensors_loads_with_the_safetensors_library(full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.safetensors"
    assert cli(capsys, "export", full, out, "--to", "safetensors").code == 0
    state = load_file(out)
    fresh = TinyLM(); fresh.load_state_dict(state, strict=True)  # noqa: E702 - tied name included
    before = safeckpt.load_checkpoint(full, restore_rng=False).model_state
    assert all(torch.equal(state[name], before[name]) for name in before)
    from safetensors import safe_open

    with safe_open(out, framework="pt") as file:
        assert file.metadata() == {"format": "pt", "safeckpt.step": "40"}


def test_export_refuses_to_overwrite(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    result = cli(capsys, "export", saved, out)
    assert result.code == 1 and "--overwrite" in result.err and out.read_bytes() == b"keep me"
    with pytest.raises(safeckpt.CheckpointExistsError, match="overwrite=True"):
        export_torch_checkpoint(saved, out)
    assert cli(capsys, "export", saved, out, "--overwrite", "--to", "torch").code == 0
    assert torch.load(out, weights_only=True)["step"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_export_targets_are_one_line_each(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXPORT_TARGETS, "copy-of-torch", "safeckpt.export:write_torch_file")
    result = cli(capsys, "export", saved, tmp_path / "x.pt", "--to", "copy-of-torch")
    assert result.code == 0 and torch.load(tmp_path / "x.pt", weights_only=True)["step"] == 3
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        export_checkpoint(saved, tmp_path / "y", to="nope")
    assert cli(capsys, "export", saved, tmp_path / "y", "--to", "nope").code == 2


@pytest.mark.parametrize("to", ["torch", "safetensors"])
def test_export_into_a_missing_folder_says_to_create_it(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], to: str) -> None:
    out = tmp_path / "nodir" / "model.out"
    result = cli(capsys, "export", saved, out, "--to", to)
    assert result.code == 1 and "Traceback" not in result.err
    assert f"could not write {out}: its folder {out.parent} does not exist; create it first" in result.err
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(safeckpt.CheckpointWriteError, match="is not a folder"):
        export_checkpoint(saved, tmp_path / "file" / "model.out", to=to)


def test_export_to_a_url_is_refused_before_reading(saved: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from safeckpt.cli import _trees

    monkeypatch.setattr(_trees, "load", lambda *a, **k: pytest.fail("read the checkpoint before refusing OUT"))
    result = cli(capsys, "export", saved, "s3://bkt/exported.pt")
    assert result.code == 2 and "s3://bkt/exported.pt: export writes local files only" in result.err
    assert "pass a local path as OUT" in result.err
    with pytest.raises(safeckpt.CheckpointUsageError, match="local path"):
        export_checkpoint(saved, "memory://x/model.pt")


def test_export_hf_takes_the_model_type(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    without = cli(capsys, "export", saved, tmp_path / "hf", "--to", "hf")
    assert without.code == 1 and "--model-type" in without.err  # the message names an option that exists
    result = cli(capsys, "export", saved, tmp_path / "hf", "--to", "hf", "--model-type", "gpt2")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert set(load_file(tmp_path / "hf" / "model.safetensors")) <= set(safeckpt.load_checkpoint(saved, restore_rng=False).model_state)
    wrong = cli(capsys, "export", saved, tmp_path / "x.pt", "--model-type", "gpt2")
    assert wrong.code == 2 and "--to hf only" in wrong.err and not (tmp_path / "x.pt").exists()


def test_export_and_convert_in_a_process(saved: Path, tmp_path: Path) -> None:
    exported = cli_process("export", saved, tmp_path / "out.pt")
    assert exported.code == 0 and "wrote" in exported.out
    converted = cli_process("convert", tmp_path / "out.pt", tmp_path / "back")
    assert converted.code == 0 and "restore_rng=False" in converted.out
    assert safeckpt.load_checkpoint(tmp_path / "back", restore_rng=False).extra == {"loader": {"epoch": 1, "offset": 12}}

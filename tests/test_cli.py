"""The ``safeckpt`` command line, driven in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeckpt.cli import main


def test_verify_ok(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(saved)]) == 0
    assert f"OK {saved}: step 3" in capsys.readouterr().out


def test_verify_reports_the_corrupt_file(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = saved / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert main(["verify", str(saved)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("safeckpt: error:") and "optimizer.safetensors" in err and "SHA-256" in err


def test_verify_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_inspect_json_lists_tensors(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(saved.parent)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 3
    assert report["files"]["model.safetensors"]["tensors"]["embed.weight"] == {"dtype": "F32", "shape": [17, 8]}


def test_inspect_table(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "embed.weight" in out and "optimizer.msgpack" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2

"""``safeckpt verify``, ``inspect`` and ``ls``: reports, ``--json`` against the schemas, exit
codes, and reading only the headers for tensor listings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import flip_bits
from cli_tools import cli, cli_process
from safeckpt.format.manifest import FileEntry, Manifest
from safeckpt.format.safetensors import build_header


@pytest.fixture
def run_root(saved: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Steps 3, 5 and 7 committed; step 9 never committed; a dead writer's temporary folder."""
    root = saved.parent
    for step in (5, 7):
        safeckpt.save_checkpoint(model, optimizer, {"lr": 1e-2}, None, step, directory=root)
    (root / "step-00000009").mkdir()
    (root / "step-00000009" / "model.safetensors").write_bytes(b"x" * 10)
    (root / ".tmp-step-00000011.dead").mkdir()
    return root


# -- verify --------------------------------------------------------------------------------


def test_verify_ok(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "verify", saved)
    assert result.code == 0 and result.out.startswith(f"OK {saved}: step 3, 9 files")


def test_verify_checks_and_reports_every_path(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_bits(run_root / "step-00000005" / "optimizer.safetensors", -1)
    paths = [run_root / "step-00000003", run_root / "step-00000005", run_root / "missing", run_root / "step-00000007"]
    result = cli(capsys, "verify", *paths)
    assert result.code == 1
    assert f"OK {paths[0]}" in result.out and f"OK {paths[3]}" in result.out
    assert f"FAILED {paths[1]}" in result.out and f"FAILED {paths[2]}" in result.out
    assert "optimizer.safetensors" in result.err and "SHA-256" in result.err and "does not exist" in result.err
    report = cli(capsys, "verify", "--json", *paths).json("verify")
    assert report["ok"] is False
    assert [c["ok"] for c in report["checkpoints"]] == [True, False, False, True]  # type: ignore[index]
    assert "optimizer.safetensors" in report["checkpoints"][1]["error"]  # type: ignore[index]


def test_verify_json_in_a_process(saved: Path) -> None:
    result = cli_process("verify", "--json", saved, saved.parent)
    assert result.code == 0
    report = result.json("verify")
    assert report["ok"] is True and [c["step"] for c in report["checkpoints"]] == [3, 3]  # type: ignore[index]


def test_verify_uncommitted_folder(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "verify", run_root / "step-00000009")
    assert result.code == 1 and "never committed" in result.err


# -- inspect -------------------------------------------------------------------------------


def test_inspect_json(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "inspect", "--json", saved.parent)
    assert result.code == 0
    report = result.json("inspect")
    assert report["step"] == 3 and report["verified"] is True
    assert report["config"] == {"lr": 1e-2, "layers": 1, "name": "tiny"} and report["vocab_size"] == 17
    model = report["files"]["model.safetensors"]  # type: ignore[index]
    assert model["tensors"]["embed.weight"] == {"dtype": "F32", "shape": [17, 8]}
    assert model["aliases"] == {"head.weight": "embed.weight"}
    assert report["files"]["optimizer.safetensors"]["tensors"]  # type: ignore[index]
    on_disk = json.loads((saved / "manifest.json").read_text())["files"]
    assert {n: f["sha256"] for n, f in report["files"].items()} == {n: f["sha256"] for n, f in on_disk.items()}  # type: ignore[union-attr]


def test_inspect_table_in_a_process(saved: Path) -> None:
    result = cli_process("inspect", saved)
    assert result.code == 0
    assert "step 3" in result.out and "embed.weight" in result.out and "head.weight" in result.out
    assert "tied to embed.weight" in result.out and "optimizer.msgpack" in result.out


def test_inspect_verifies_unless_told_not_to(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_bits(saved / "model.safetensors", -1)  # tensor data, not the header
    result = cli(capsys, "inspect", saved)
    assert result.code == 1 and "model.safetensors" in result.err and "SHA-256" in result.err
    report = cli(capsys, "inspect", "--json", "--no-verify", saved).json("inspect")
    assert report["verified"] is False and "embed.weight" in report["files"]["model.safetensors"]["tensors"]  # type: ignore[index]


def test_inspect_still_validates_headers_strictly(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[8:9] = b"["  # header JSON no longer an object
    (saved / "model.safetensors").write_bytes(bytes(data))
    result = cli(capsys, "inspect", "--no-verify", saved)
    assert result.code == 1 and "model.safetensors" in result.err and "invalid" in result.err


def test_inspect_reads_only_the_header(tmp_path: Path) -> None:
    """A 1 GiB archive (sparse on disk) is listed by a process that never holds its data."""
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    header, _ = build_header([("big", "F32", (1 << 28,))], None)
    with open(folder / "model.safetensors", "wb") as file:
        file.write(header)
        file.truncate(len(header) + (1 << 30))
    size = (folder / "model.safetensors").stat().st_size
    manifest = Manifest(step=1, files=(FileEntry("model.safetensors", size, "0" * 64),))
    (folder / "manifest.json").write_bytes(manifest.to_json_bytes())
    code = (
        "import sys\n"
        "from safeckpt.cli import main\n"
        f"rc = main(['inspect', '--json', '--no-verify', {str(folder)!r}])\n"
        # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, from before exec)
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(peak, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"]["model.safetensors"]["tensors"]["big"]["shape"] == [1 << 28]
    peak_kib = int(done.stderr.split()[-1])
    assert peak_kib < 256 * 1024, f"peak RSS {peak_kib} KiB for a 1 GiB archive: its data was read"


# -- ls ------------------------------------------------------------------------------------


def test_ls_lists_checkpoints_and_leftovers(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "ls", "--json", run_root)
    assert result.code == 0
    report = result.json("ls")
    rows = {row["step"]: row for row in report["checkpoints"]}  # type: ignore[union-attr]
    assert sorted(rows) == [3, 5, 7, 9]
    assert all(rows[s]["committed"] for s in (3, 5, 7)) and not rows[9]["committed"]
    assert "never committed" in rows[9]["error"] and rows[9]["size"] == 10
    manifest = json.loads((run_root / "step-00000005" / "manifest.json").read_text())
    assert rows[5]["created"] == manifest["created"]
    assert rows[5]["size"] == sum(f["size"] for f in manifest["files"].values()) + (run_root / "step-00000005" / "manifest.json").stat().st_size
    assert [(Path(x["path"]).name, x["kind"]) for x in report["leftovers"]] == [(".tmp-step-00000011.dead", "temporary")]  # type: ignore[union-attr]
    assert "verified" not in rows[3]


def test_ls_verify_marks_the_damaged_one_and_exits_1(run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_bits(run_root / "step-00000005" / "model.safetensors", -1)
    result = cli(capsys, "ls", "--verify", "--json", run_root)
    assert result.code == 1
    rows = {row["step"]: row for row in result.json("ls")["checkpoints"]}  # type: ignore[union-attr]
    assert rows[3]["verified"] and rows[7]["verified"] and not rows[5]["verified"]
    assert "model.safetensors" in rows[5]["error"]
    text = cli(capsys, "ls", "--verify", run_root)
    assert text.code == 1 and "FAILED" in text.out and "step-00000005" in text.out


def test_ls_in_a_process(run_root: Path) -> None:
    shutil.rmtree(run_root / "step-00000009")
    result = cli_process("ls", "--verify", run_root)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["3", "5", "7"]
    assert all("committed, verified" in line for line in lines[:3])
    assert ".tmp-step-00000011.dead" in result.out


def test_ls_errors(tmp_path: Path, saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = cli(capsys, "ls", tmp_path / "none")
    assert missing.code == 1 and "does not exist" in missing.err
    checkpoint = cli(capsys, "ls", saved)
    assert checkpoint.code == 1 and "is a checkpoint, not a root" in checkpoint.err
    empty = cli(capsys, "ls", "--json", tmp_path)
    assert empty.code == 0 and empty.json("ls")["checkpoints"] == []

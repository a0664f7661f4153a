"""The command line as a whole: help and version, exit codes, torch-free reads, closed pipes,
progress bars, and a torch.save file passed where a checkpoint is expected."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from cli_tools import cli, cli_process
from conftest import TinyLM
from safeckpt.cli import build_parser

COMMANDS = ("verify", "inspect", "ls", "diff", "prune", "export", "convert", "consolidate")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "--version")
    assert result.code == 0 and result.out.strip() == f"safeckpt {safeckpt.__version__}"
    assert cli_process("--version").out.strip() == f"safeckpt {safeckpt.__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_option_has_help() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(COMMANDS) | {"demo"} == set(commands)
    for name in COMMANDS:
        for action in commands[name]._actions:
            assert action.help, f"safeckpt {name}: {action.dest} has no help text"
        help_text = commands[name].format_help()
        assert "exit status:" in help_text and "usage error" in help_text, name
    assert "exit status:" in parser.format_help()


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["prune", "x", "--keep-last", "0"], ["diff", "a", "b", "--atol", "-1"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    result = cli(capsys, *argv)
    assert result.code == 2 and "usage:" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "{root}", "--storage-option", "a=b"],
        ["verify", "{ckpt}", "--storage-option", "a=b"],
        ["prune", "{root}", "--keep-last", "1", "--storage-option", "a=b"],
        ["diff", "{ckpt}", "{ckpt}", "--storage-option", "a=b"],
        ["export", "{ckpt}", "s3://bucket/model.pt"],
    ],
)
def test_arguments_that_cannot_go_together_exit_2(saved: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    result = cli(capsys, *(a.format(root=saved.parent, ckpt=saved) for a in argv))
    assert result.code == 2 and f"safeckpt {argv[0]}: error:" in result.err and "Traceback" not in result.err
    assert sorted(p.name for p in saved.parent.iterdir() if not p.name.startswith(".")) == [saved.name]  # nothing done


def test_help_says_which_commands_take_urls() -> None:
    top = " ".join(build_parser().format_help().split())  # (argparse wraps lines)
    assert "but consolidate" not in top and "convert and consolidate also write into one" in top
    consolidate = " ".join(_subparsers(build_parser())["consolidate"].format_help().split())
    assert "or a URL" in consolidate and "(a folder or a URL)" in consolidate


def test_usage_error_exit_2_in_a_process() -> None:
    result = cli_process("verify")
    assert result.code == 2 and "usage:" in result.err


def test_help_in_a_process_lists_exit_codes() -> None:
    result = cli_process("--help")
    assert result.code == 0 and "exit status:" in result.out and all(c in result.out for c in COMMANDS)


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_reads_never_import_torch(saved: Path, command: str) -> None:
    result = cli_process(command, saved, python_flags=("-X", "importtime"))
    assert result.code == 0, result.err
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.err.splitlines() if line.startswith("import time:")]
    assert "safeckpt.cli" in imported and "safeckpt.format.safetensors" in imported  # the log is what we think
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_ls_and_prune_never_import_torch(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = (
        "import sys; from safeckpt.cli import main; "
        f"rc = main(['ls', '--verify', {str(saved.parent)!r}]) + main(['prune', '--dry-run', '--keep-last', '1', {str(saved.parent)!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # Enough tensors that the listing overflows the pipe's buffer after the reader has gone.
    safeckpt.save_checkpoint({f"layer{i}.weight": torch.zeros(1) for i in range(3000)}, None, None, None, 1, directory=tmp_path, rng=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(
        [sys.executable, "-m", "safeckpt.cli", "inspect", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        first = child.stdout.readline()
        child.stdout.close()  # what `head -1` does
        err = child.stderr.read().decode()
        code = child.wait(timeout=300)
    assert first.startswith(str(tmp_path).encode())
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 128 + 13


def test_verify_names_a_torch_save_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(TinyLM().state_dict(), tmp_path / "model.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name, what in (("model.pt", "torch.save file"), ("old.pt", "pickle file")):
        result = cli(capsys, "verify", tmp_path / name)
        assert result.code == 1
        assert what in result.err and "safeckpt convert" in result.err and "does not exist" not in result.err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet(
    saved: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for argv, shown in ((["verify", saved], True), (["verify", "--quiet", saved], False)):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert cli(capsys, *argv).code == 0
        assert ("verify step-00000003" in terminal.getvalue()) is shown
    piped = cli_process("verify", saved)  # stderr is a pipe: no bar
    assert piped.code == 0 and piped.err == ""


def test_no_bar_and_no_error_without_tqdm(saved: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    assert cli(capsys, "verify", saved).code == 0
    assert terminal.getvalue() == ""


@pytest.mark.parametrize(
    ("argv", "schema"),
    [
        (["verify", "--json", "{ckpt}"], "verify"),
        (["inspect", "--json", "{ckpt}"], "inspect"),
        (["ls", "--json", "--verify", "{root}"], "ls"),
        (["diff", "--json", "{ckpt}", "{root}"], "diff"),
        (["prune", "--json", "--dry-run", "--keep-last", "1", "{root}"], "prune"),
    ],
)
def test_json_of_every_read_command_in_a_process(saved: Path, argv: list[str], schema: str) -> None:
    result = cli_process(*(a.format(ckpt=saved, root=saved.parent) for a in argv))
    assert result.code == 0, result.err
    result.json(schema)


def test_progress_bar_on_a_real_terminal(saved: Path) -> None:
    import fcntl
    import struct
    import termios

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    shown = {}
    for quiet in (False, True):
        leader, follower = os.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, as a terminal has
        try:
            argv = [sys.executable, "-m", "safeckpt.cli", "verify", *(["--quiet"] if quiet else []), str(saved)]
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=follower, env=env, timeout=300)
            os.close(follower)
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal has no writer left
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(leader)
        assert done.returncode == 0
        shown[quiet] = b"verify step-00000003" in b"".join(chunks)
    assert shown == {False: True, True: False}

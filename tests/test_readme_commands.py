"""The README's commands work as written: the JavaScript reader's set-up, and the torch-free
install of the numpy reader (exactly the packages the README names, torch absent)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

import safeckpt
from venvs import closure, run_in_venv

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[list[str]]:
    """Each ```bash block of the README, as its command lines (comments stripped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [[line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()] for block in blocks]


def test_js_reader_block_installs_its_dependency_before_running() -> None:
    block = next(lines for lines in _bash_blocks() if any("cli.mjs" in line for line in lines))
    run = next(i for i, line in enumerate(block) if "cli.mjs" in line)
    assert "npm ci --prefix spec/readers/js" in block[:run], block


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.skipif(not (ROOT / "spec/readers/js/node_modules/@msgpack/msgpack").is_dir(), reason="run npm ci first")
def test_js_reader_command_as_written_reads_a_checkpoint(tmp_path: Path) -> None:
    block = next(lines for lines in _bash_blocks() if any("cli.mjs" in line for line in lines))
    command = shlex.split(next(line for line in block if "cli.mjs" in line))
    torch.manual_seed(0)
    safeckpt.save_checkpoint(torch.nn.Linear(3, 2), None, {"lr": 0.1}, ["a"], 5, directory=tmp_path / "checkpoints")
    command = [str(ROOT / part) if part.startswith("spec/") else part for part in command]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "weight" in done.stdout


def test_torch_free_install_reads_with_exactly_the_packages_the_readme_names(tmp_path: Path) -> None:
    block = next(lines for lines in _bash_blocks() if any("--no-deps" in line for line in lines))
    assert any(re.fullmatch(r"pip install --no-deps (\.|safeckpt)", line) for line in block), block
    extra = next(shlex.split(line)[2:] for line in block if line.startswith("pip install") and "--no-deps" not in line)
    deps = closure(extra)
    assert "torch" not in deps, deps
    torch.manual_seed(0)
    path = safeckpt.save_checkpoint(torch.nn.Linear(3, 2), None, {"lr": 0.1}, ["a"], 5, directory=tmp_path / "ckpts")

    script = textwrap.dedent(
        f"""
        import importlib.util
        assert importlib.util.find_spec("torch") is None, "torch is importable"
        from safeckpt.numpy import load_checkpoint
        ckpt = load_checkpoint({str(path)!r})
        assert ckpt.step == 5 and ckpt.config == {{"lr": 0.1}}
        assert ckpt.model_state["weight"].shape == (2, 3)
        print("numpy reader ok")
        """
    )
    done = run_in_venv(tmp_path, deps, script)
    assert done.returncode == 0 and "numpy reader ok" in done.stdout, done.stderr[-3000:]

"""The core install works: a venv holding only the declared core dependencies (no numpy, no
safetensors library) saves, loads and verifies a checkpoint, and ``import safeckpt`` stays light."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _core_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r).name for r in project["dependencies"]]


def _closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need (extras and non-matching markers skipped)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _link_distributions(names: set[str], into: Path) -> None:
    """Symlink every top-level entry (package, module, .dist-info) of each distribution."""
    into.mkdir()
    for name in names:
        dist = importlib.metadata.distribution(name)
        site = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = into / top
            if (site / top).exists() and not link.exists() and top != "__pycache__":
                link.symlink_to(site / top)


def test_core_dependencies_alone_save_and_load(tmp_path: Path) -> None:
    core = _closure(_core_requirements())
    assert "numpy" not in core and "safetensors" not in core, core  # the point of this test
    _link_distributions(core, tmp_path / "deps")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "core.pth").write_text(f"{tmp_path / 'deps'}\n{ROOT / 'src'}\n", encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import importlib.util, random, sys
        assert importlib.util.find_spec("numpy") is None, "numpy is importable"
        assert importlib.util.find_spec("safetensors") is None, "safetensors is importable"
        import safeckpt
        assert "torch" not in sys.modules
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        path = safeckpt.save_checkpoint(model, opt, {{"n": 1}}, ["a"], 7, directory={str(tmp_path / "ckpts")!r},
                                        scheduler=sched, extra={{"t": torch.arange(3)}})
        random.random()
        fresh = torch.nn.Linear(4, 3)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        ckpt = safeckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
        assert ckpt.step == 7 and ckpt.config == {{"n": 1}} and torch.equal(ckpt.extra["t"], torch.arange(3))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
        assert safeckpt.verify_checkpoint(path).step == 7
        assert "numpy" not in sys.modules
        print("core ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-3000:]

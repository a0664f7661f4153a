"""The core install works: a venv holding only the declared core dependencies (no numpy, no
safetensors library) saves, loads and verifies a checkpoint, and ``import safeckpt`` stays light."""

from __future__ import annotations

import textwrap
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from venvs import closure, run_in_venv

ROOT = Path(__file__).resolve().parents[1]


def _core_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r).name for r in project["dependencies"]]


def test_core_dependencies_alone_save_and_load(tmp_path: Path) -> None:
    core = closure(_core_requirements())
    assert "numpy" not in core and "safetensors" not in core, core  # the point of this test
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
    done = run_in_venv(tmp_path, core, script)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-3000:]

"""Throw-away virtual environments holding exactly the named installed distributions (and what
they require), so a test can prove what an install of safeckpt with only those packages does."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def closure(names: list[str]) -> set[str]:
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


def run_in_venv(tmp_path: Path, distributions: set[str], script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new venv (no pip) that sees ``distributions`` and this repo's ``src``
    (as ``pip install --no-deps .`` would) and nothing else of this environment."""
    _link_distributions(distributions, tmp_path / "deps")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(f"{tmp_path / 'deps'}\n{ROOT / 'src'}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([python, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

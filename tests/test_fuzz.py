"""The atheris harness in ``fuzz/``: its seed corpus replays cleanly, and (when atheris is
installed) a short bounded coverage-guided pass finds nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_loader.py"
STRESS = os.environ.get("SAFECKPT_STRESS") == "1"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    done = run("--make-corpus", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_seed_corpus_and_damaged_seeds_replay_without_a_finding(corpus: Path, tmp_path: Path) -> None:
    seeds = sorted(corpus.iterdir())
    assert len(seeds) == 12
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for seed in seeds:  # a few hand-made mutants per file: truncated, flipped, emptied
        data = seed.read_bytes()
        (damaged / f"{seed.name}.half").write_bytes(data[: len(data) // 2])
        (damaged / f"{seed.name}.flip").write_bytes(data[:1] + bytes(b ^ 0x5A for b in data[1:40]) + data[40:])
        (damaged / f"{seed.name}.empty").write_bytes(data[:1])
    done = run("--replay", str(corpus), str(damaged))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"replayed {len(seeds) * 4} inputs without a finding" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (pip install '.[fuzz]')")
def test_short_atheris_pass(corpus: Path, tmp_path: Path) -> None:
    runs = 100_000 if STRESS else 3_000
    work = tmp_path / "corpus"
    work.mkdir()
    for seed in corpus.iterdir():
        (work / seed.name).write_bytes(seed.read_bytes())
    done = subprocess.run(
        [sys.executable, str(HARNESS), str(work), f"-atheris_runs={runs}", "-max_len=8192",
         "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=1800, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    assert f"Done {runs} in" in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*")) and not list(tmp_path.glob("timeout-*"))

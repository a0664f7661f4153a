"""Start N ranks of a scenario (``dist_workers.py`` unless told another workers file) as separate
processes (gloo on CPU).

Each rank writes ``out/rank-R.json``: the result of every check it ran, so one group of
processes can serve many tests. A rank that crashes leaves its stderr in ``out/rank-R.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).with_name("dist_workers.py")
TIMEOUT = 600
"""Seconds a group may take before the test fails (a hang, not a slow machine)."""


def start(
    scenario: str, world: int, tmp: Path, *, env: dict[str, str] | None = None, workers: Path = WORKERS
) -> list[subprocess.Popen[bytes]]:
    """Start ranks ``0..world-1`` of ``scenario`` in ``workers``; files go under ``tmp``."""
    out = tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    init = tmp / "init"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for rank in range(world):
        log = open(out / f"rank-{rank}.log", "wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(workers), scenario, str(rank), str(world), str(init), str(tmp)],
                stdout=log, stderr=subprocess.STDOUT, env=environment,
            )
        )
        log.close()
    return procs


def run(
    scenario: str, world: int, tmp: Path, *, env: dict[str, str] | None = None, workers: Path = WORKERS
) -> dict[int, dict[str, str]]:
    """Run a scenario to the end; returns each rank's check results (``"ok"`` or what failed)."""
    procs = start(scenario, world, tmp, env=env, workers=workers)
    try:
        for proc in procs:
            proc.wait(TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results(tmp, world)


def results(tmp: Path, world: int) -> dict[int, dict[str, str]]:
    found = {}
    for rank in range(world):
        path = tmp / "out" / f"rank-{rank}.json"
        found[rank] = json.loads(path.read_text()) if path.exists() else {}
    return found


def log(tmp: Path, rank: int) -> str:
    path = tmp / "out" / f"rank-{rank}.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


Results = dict[int, dict[str, str]]
"""Each rank's check results, as :func:`run` returns them."""


def assert_ok(tmp: Path, results: Results, check: str, ranks: range) -> None:
    """Check ``check`` passed on every rank of ``ranks``; a failure shows that rank's log."""
    for rank in ranks:
        outcome = results[rank].get(check)
        assert outcome == "ok", f"rank {rank}, {check}: {outcome}\n--- log ---\n{log(tmp, rank)}"

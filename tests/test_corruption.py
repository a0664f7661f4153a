"""Damaged files: caught by the hash before any parser runs; with the hash fixed up, every parser
fails cleanly (a ``CheckpointError``, never another exception, a crash, a hang or a memory blow-up).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM, train_steps

STRESS = os.environ.get("SAFECKPT_STRESS") == "1"
SWEEP = Path(__file__).with_name("corruption_sweep.py")


def test_spies_see_every_parser_on_a_good_load(saved: Path, parser_calls: list[tuple[str, dict]]) -> None:
    # Proves the spies are wired in: without damage, every parser runs.
    safeckpt.load_checkpoint(saved)
    seen = {name for name, _ in parser_calls}
    assert {"parse_header", "load_json", "load_msgpack", "decode_document", "msgpack.unpackb"} <= seen


def test_one_bit_flip_per_file_is_caught_by_the_hash_before_any_parser(
    saved: Path, parser_calls: list[tuple[str, dict]]
) -> None:
    manifest = json.loads((saved / "manifest.json").read_bytes())
    names = sorted(manifest["files"])
    rng = random.Random(1234)
    cases = 5000 if STRESS else 1000
    for case in range(cases):
        name = names[case % len(names)]
        path = saved / name
        size = path.stat().st_size
        bit = rng.randrange(size * 8)
        with open(path, "r+b") as handle:
            handle.seek(bit // 8)
            original = handle.read(1)[0]
            handle.seek(bit // 8)
            handle.write(bytes([original ^ (1 << (bit % 8))]))
        parser_calls.clear()
        with pytest.raises(safeckpt.CheckpointCorruptedError, match="SHA-256") as info:
            safeckpt.load_checkpoint(saved)
        assert str(saved / name) in str(info.value), (case, name)
        # Only the manifest itself (which the hashes come from) may have been parsed.
        beyond_manifest = [
            (parser, kwargs)
            for parser, kwargs in parser_calls
            if not (parser == "load_json" and str(kwargs.get("source", "")).endswith("manifest.json"))
        ]
        assert beyond_manifest == [], (case, name)
        with open(path, "r+b") as handle:
            handle.seek(bit // 8)
            handle.write(bytes([original]))
    assert safeckpt.load_checkpoint(saved).step == 3


@pytest.fixture
def sweep_checkpoint(tmp_path: Path) -> Path:
    """A small checkpoint with every kind of file: model, optimizer, scheduler, extra, rng."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    train_steps(model, optimizer, 3)
    scheduler.step()
    return safeckpt.save_checkpoint(
        model,
        optimizer,
        {"lr": 0.01, "name": "tiny"},
        list("abcdefghijklmnopq"),
        3,
        directory=tmp_path / "checkpoints",
        scheduler=scheduler,
        extra={"loader": {"epoch": 1, "order": (3, 1, 2)}, "flags": torch.tensor([True, False])},
    )


@pytest.mark.slow
def test_every_byte_change_and_truncation_fails_cleanly(sweep_checkpoint: Path) -> None:
    cases = 40_000 if STRESS else 10_000
    memory = 2 * 1024**3
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SWEEP), str(sweep_checkpoint), str(cases), str(memory)],
        capture_output=True,
        text=True,
        timeout=1800 if STRESS else 600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], json.dumps(report["failures"][:10], indent=1)
    assert report["cases"] == cases
    # Both outcomes occur: damage in tensor bytes loads, damage in structure is refused.
    assert report["clean_errors"] > cases // 4 and report["loaded"] > 0
    assert report["max_rss_bytes"] < memory

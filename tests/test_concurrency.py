"""Two processes saving into the same folder at the same moments, round after round, while a
third reads: every checkpoint is wholly one writer's, never a mix, and nothing is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import crash_child
import safeckpt
from ckpt_tools import leftovers
from crash_child import expected_small, loaded_fingerprint, start_forkserver
from safeckpt.storage.local import list_checkpoints

STRESS = os.environ.get("SAFECKPT_STRESS") == "1"


@pytest.mark.slow
def test_two_writers_one_folder_never_mix(tmp_path: Path) -> None:
    rounds = 1000 if STRESS else 100
    root = tmp_path / "run"
    context = start_forkserver()
    barrier = context.Barrier(2)
    writers = [
        context.Process(target=crash_child.race, args=(str(root), w, rounds, barrier, str(tmp_path / f"w{w}.json")))
        for w in (0, 1)
    ]
    for writer in writers:
        writer.start()
    # Read the newest checkpoint over and over while they write.
    reads = vanished = 0
    while any(w.is_alive() for w in writers):
        try:
            step, found = loaded_fingerprint(root)
        except safeckpt.CheckpointNotFoundError:
            vanished += 1  # replaced by an overwrite (or not there yet) while being read: never mixed
            continue
        assert found in (expected_small(step * 2), expected_small(step * 2 + 1)), step
        reads += 1
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    results = [json.loads((tmp_path / f"w{w}.json").read_text()) for w in (0, 1)]
    assert results[0]["errors"] == results[1]["errors"] == [], results
    # Odd steps were saved without overwrite: exactly one writer of the two was refused.
    assert results[0]["refused"] + results[1]["refused"] == rounds // 2, results
    found_steps = list_checkpoints(root)
    assert [s for s, _ in found_steps] == list(range(rounds))
    winners = set()
    for step, path in found_steps:
        _, found = loaded_fingerprint(path)
        winner = [expected_small(step * 2), expected_small(step * 2 + 1)].index(found)  # ValueError if mixed
        winners.add(winner)
    assert leftovers(root) == []
    assert reads > 0 and winners == {0, 1}, (reads, vanished, winners)

"""The demo: SIGKILL mid-training and resume in a new process gives the uninterrupted losses;
the CLI runs end to end with tiny sizes; its parts (data position, corpus, report) behave."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from safeckpt.cli import main as cli_main
from safeckpt.demo import _env
from safeckpt.demo.corpus import generate_corpus
from safeckpt.demo.data import ShuffledBatches
from safeckpt.demo.report import read_losses, summarize
from safeckpt.demo.train import TrainConfig

# ~15 windows per batch-epoch: a 24-step run crosses two epoch boundaries
TINY = TrainConfig(steps=24, batch_size=4, seq_len=16, d_model=16, n_layers=1, n_heads=2, warmup=3,
                   corpus_kb=1, threads=1)
TINY_FLAGS = ["--steps", "24", "--batch-size", "4", "--seq-len", "16", "--d-model", "16", "--layers", "1",
              "--heads", "2", "--warmup", "3", "--corpus-kb", "1", "--threads", "1", "--no-progress"]


KILLED = dataclasses.replace(TINY, steps=60)  # plenty of steps left after the kill, so it lands


def _worker(run_dir: Path, log: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safeckpt.demo.train", "--run-dir", str(run_dir), "--losses", str(log),
            "--config", json.dumps(dataclasses.asdict(KILLED)), "--no-progress", *extra]


def test_sigkill_then_resume_in_a_new_process_repeats_the_losses(tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_worker(ref_dir, tmp_path / "ref.jsonl"), env=_env(), check=True, stdout=subprocess.DEVNULL,
                   timeout=300)

    # saves after steps 4, 9, 14 (async; each save first waits for the previous one to commit):
    # once "step 14" is printed, step 9's checkpoint is committed and step 14's may be
    kill_after = 14
    proc = subprocess.Popen(_worker(run_dir, tmp_path / "killed.jsonl", "--save-every", "5"), env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == f"step {kill_after}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=300) == -signal.SIGKILL
    killed = read_losses(tmp_path / "killed.jsonl")
    assert max(killed) >= kill_after and max(killed) < KILLED.steps - 1

    out = subprocess.run(_worker(run_dir, tmp_path / "resumed.jsonl", "--resume"), env=_env(), check=True,
                         stdout=subprocess.PIPE, text=True, timeout=300).stdout
    reference, resumed = read_losses(tmp_path / "ref.jsonl"), read_losses(tmp_path / "resumed.jsonl")
    start = min(resumed)
    assert start in (10, 15) and f"resumed from step-{start - 1:08d} at step {start}" in out
    assert sorted(resumed) == list(range(start, KILLED.steps))
    combined = {s: v for s, v in killed.items() if s < start} | resumed
    assert combined == reference  # exact float equality, every step
    assert all(killed[s] == resumed[s] for s in killed if s >= start)  # the work lost to the kill, redone
    final_ref = safeckpt.load_checkpoint(ref_dir / "final", restore_rng=False)
    final_run = safeckpt.load_checkpoint(run_dir / "final", restore_rng=False)
    assert all(torch.equal(final_ref.model_state[k], v) for k, v in final_run.model_state.items())


def test_demo_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    status = cli_main(["demo", *TINY_FLAGS, "--save-every", "4", "--out", str(out), "--kill-seed", "2"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "max |loss difference| over 24 steps: 0.0" in printed
    assert "max |difference| of final parameters: 0.0" in printed
    assert "SIGKILL after step 8 (kill seed 2)" in printed and "killed with SIGKILL after step" in printed
    assert "bit-identical" in printed and "checkpoints on disk: ['step-" in printed
    assert "resumed at step 0" not in printed
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,uninterrupted,killed_and_resumed" and len(rows) == 25
    assert all(a == b for _, a, b in (row.split(",") for row in rows[1:]))
    assert sorted(p.name for p in out.iterdir()) == ["interrupted", "loss_curves.png", "losses.csv", "uninterrupted"]


def test_demo_rejects_impossible_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["demo", "--steps", "10", "--save-every", "9", "--out", str(tmp_path)]) == 2
    assert "--save-every" in capsys.readouterr().err


def _final(tmp_path: Path, name: str, bias: float) -> Path:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(bias)
    return safeckpt.save_checkpoint(model, None, None, None, 3, directory=tmp_path / name, rng=False)


def test_summary_fails_on_any_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    same = (_final(tmp_path, "a", 0.0), _final(tmp_path, "b", 0.0))
    curve = {0: 3.0, 1: 2.5, 2: 2.25, 3: 2.0}
    assert summarize(tmp_path, curve, {0: 3.0, 1: 2.5, 2: 2.25}, {2: 2.25, 3: 2.0}, finals=same,
                     kill_step=2, resume_step=2, plot=False) == 0
    assert "bit-identical" in capsys.readouterr().out

    off = dict(curve) | {3: 2.0 + 1e-7}
    assert summarize(tmp_path, curve, {0: 3.0, 1: 2.5}, {2: 2.25, 3: off[3]}, finals=same,
                     kill_step=1, resume_step=2, plot=False) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.err and "max |loss difference| over 4 steps: 9.99999998" in captured.out

    different = (_final(tmp_path, "c", 0.0), _final(tmp_path, "d", 0.25))
    assert summarize(tmp_path, curve, {0: 3.0, 1: 2.5}, {2: 2.25, 3: 2.0}, finals=different,
                     kill_step=1, resume_step=2, plot=False) == 1
    assert "max |difference| of final parameters: 0.25 (at bias)" in capsys.readouterr().out


def test_read_losses_tolerates_only_a_cut_off_last_line(tmp_path: Path) -> None:
    log = tmp_path / "l.jsonl"
    log.write_text('{"step": 0, "loss": 1.5}\n{"step": 1, "loss": 1.25}\n{"step": 2, "lo')
    assert read_losses(log) == {0: 1.5, 1: 1.25}
    log.write_text('{"step": 0, "loss": 1.5}\n{"ste\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(json.JSONDecodeError):
        read_losses(log)


def _data() -> torch.Tensor:
    return torch.arange(200, dtype=torch.int64) % 50


def test_data_position_resumes_exactly_across_epochs(tmp_path: Path) -> None:
    batches = ShuffledBatches(_data(), seq_len=8, batch_size=5, seed=3)  # 24 windows: 4 batches/epoch
    for _ in range(6):
        batches.next()
    assert (batches.epoch, batches.offset) == (1, 2)
    path = safeckpt.save_checkpoint({}, None, None, None, 6, directory=tmp_path, extra={"data": batches}, rng=False)
    expected = [batches.next() for _ in range(7)]

    other = ShuffledBatches(_data(), seq_len=8, batch_size=5, seed=99)
    ckpt = safeckpt.load_checkpoint(path, extra={"data": other}, restore_rng=False)
    assert ckpt.extra["data"]["epoch"] == 1 and ckpt.extra["data"]["offset"] == 2  # type: ignore[index]
    got = [other.next() for _ in range(7)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got, strict=True))
    inputs, targets = got[0]
    assert inputs.shape == (5, 8) and torch.equal(inputs[:, 1:], targets[:, :-1])


def test_each_epoch_is_a_new_permutation_of_all_windows() -> None:
    batches = ShuffledBatches(_data(), seq_len=8, batch_size=6, seed=0)
    epochs = [torch.cat([batches.next()[0][:, 0] for _ in range(4)]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist())


def test_data_position_refuses_a_different_batch_size(tmp_path: Path) -> None:
    state = ShuffledBatches(_data(), seq_len=8, batch_size=5, seed=3).state_dict()
    with pytest.raises(safeckpt.CheckpointMismatchError, match="batch_size=5"):
        ShuffledBatches(_data(), seq_len=8, batch_size=4, seed=3).load_state_dict(state)


def test_corpus_is_deterministic_and_pinned() -> None:
    text = generate_corpus(4096)
    assert text == generate_corpus(4096) and len(text) == 4096 and text != generate_corpus(4096, seed=1)
    assert math.isclose(sum(c == " " for c in text) / len(text), 0.17, abs_tol=0.05)
    # pinned so a change to the generator (and thus to the demo's numbers) is deliberate
    assert hashlib.sha256(text.encode()).hexdigest() == PINNED_CORPUS_SHA256


PINNED_CORPUS_SHA256 = "760eb8e539d8b1ace3ea59cf1114922ec422f2ca74d6b30a2a1256cc34923a98"

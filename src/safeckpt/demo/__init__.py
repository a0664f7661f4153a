"""``safeckpt demo``: train, kill with SIGKILL, resume, and show the resumed run is bit-identical.

A character-level transformer (dropout on, shuffled batches, AdamW, warmup + cosine schedule)
learns a generated pseudo-English corpus. Three processes run one after another:

(a) the reference: all steps, uninterrupted, no checkpoints;
(b) the same run with :class:`~safeckpt.CheckpointManager` saving every K steps (in the
    background), killed with SIGKILL at a random moment;
(c) a fresh process that restores the newest checkpoint that verifies and trains to the end.

Then the loss curves and final states are compared; on CPU they must match exactly (max
difference 0.0), else the exit status is 1. Output lands in ``--out`` (default
``demo-output/``): ``loss_curves.png``, ``losses.csv`` and the runs' folders.

Example:
    $ safeckpt demo --steps 200 --save-every 25 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the package stays import-light: `python -m safeckpt.demo.train` runs train.py
    from .train import TrainConfig

__all__ = ["main"]

_RUNS = ("uninterrupted", "interrupted")


def _parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="safeckpt demo",
        description="Train a small transformer LM, SIGKILL it mid-run, resume it, and check the "
        "resumed run matches the uninterrupted one bit for bit.",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--d-model", type=int, default=d.d_model, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.n_layers, help="transformer blocks (default %(default)s)")
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default %(default)s)")
    p.add_argument("--corpus-kb", type=int, default=d.corpus_kb, help="generated corpus size in KiB")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per process, the same in all three (default %(default)s: this "
                   "model's small matrices gain little from more, and on a busy machine extra threads "
                   "that wait for cores make training several times slower)")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default %(default)s)")
    p.add_argument("--kill-seed", type=int, default=None, help="seed choosing when to kill (default: random)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _worker(cfg: TrainConfig, run_dir: Path, losses: Path, label: str, *, save_every: int = 0,
            resume: bool = False, progress: bool = True) -> list[str]:
    command = [
        sys.executable, "-m", "safeckpt.demo.train", "--run-dir", str(run_dir), "--losses", str(losses),
        "--config", json.dumps(dataclasses.asdict(cfg)), "--label", label,
    ]
    if save_every:
        command += ["--save-every", str(save_every)]
    if resume:
        command.append("--resume")
    if not progress:
        command.append("--no-progress")
    return command


def _env() -> dict[str, str]:
    """The children import this very safeckpt, installed or not."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _run_and_kill(command: list[str], *, kill_after: int, rng: random.Random) -> int:
    """Run ``command``; once it reports ``step kill_after``, SIGKILL it a random fraction of a
    step later (possibly in the middle of writing a checkpoint). Returns its exit status."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    first: float | None = None
    seen = 0
    for line in proc.stdout:
        if not line.startswith("step "):
            continue
        now, seen = time.monotonic(), seen + 1
        first = now if first is None else first
        if int(line.split()[1]) >= kill_after:
            per_step = (now - first) / (seen - 1) if seen > 1 else 0.0  # startup excluded
            time.sleep(rng.uniform(0.0, 1.5 * per_step))
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait()


def main(argv: list[str]) -> int:
    """Run the demo; returns 0 when the resumed run is bit-identical to the uninterrupted one."""
    from .report import read_losses, summarize
    from .train import TrainConfig

    args = _parser().parse_args(argv)
    if args.steps < 4 or not 1 <= args.save_every <= args.steps - 2:
        print(f"safeckpt demo: need --steps >= 4 and 1 <= --save-every <= steps - 2 "
              f"(got {args.steps}, {args.save_every})", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, d_model=args.d_model,
        n_layers=args.layers, n_heads=args.heads, dropout=args.dropout, lr=args.lr, warmup=args.warmup,
        corpus_kb=args.corpus_kb, seed=args.seed, threads=args.threads,
    )
    kill_seed = args.kill_seed if args.kill_seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(kill_seed)
    # Saves run in the background and each waits for the previous one, so once the step of the
    # second save has been reported the first checkpoint is committed: kill after that.
    kill_after = rng.randrange(min(2 * args.save_every - 1, args.steps - 2), args.steps - 1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in _RUNS:  # only what an earlier demo wrote; the rest of --out is left alone
        shutil.rmtree(out / name, ignore_errors=True)
    ref_dir, run_dir = out / "uninterrupted", out / "interrupted"
    progress = not args.no_progress
    print(f"safeckpt demo: char-level transformer ({cfg.n_layers} layers x {cfg.d_model} dims, "
          f"dropout {cfg.dropout}), AdamW + warmup/cosine, batches {cfg.batch_size}x{cfg.seq_len}, "
          f"{cfg.steps} steps, {cfg.threads} thread(s) per process; output in {out}/", flush=True)

    timer = time.monotonic()
    print("(a) training without interruption ...", flush=True)
    ref_dir.mkdir(parents=True)
    status = subprocess.run(_worker(cfg, ref_dir, ref_dir / "losses.jsonl", "(a) uninterrupted", progress=progress),
                            stdout=subprocess.DEVNULL, env=_env(), check=False).returncode
    if status != 0:
        print(f"safeckpt demo: the uninterrupted run failed (exit status {status})", file=sys.stderr)
        return 1
    print(f"    done in {time.monotonic() - timer:.1f}s", flush=True)

    timer = time.monotonic()
    print(f"(b) training with a checkpoint every {args.save_every} steps; SIGKILL after step "
          f"{kill_after} (kill seed {kill_seed}) ...", flush=True)
    run_dir.mkdir(parents=True)
    first_log = run_dir / "losses-before-kill.jsonl"
    status = _run_and_kill(
        _worker(cfg, run_dir, first_log, "(b) will be killed", save_every=args.save_every, progress=progress),
        kill_after=kill_after, rng=rng,
    )
    if progress:
        print(file=sys.stderr)  # the killed process's progress bar has no line end
    killed = status == -signal.SIGKILL
    if not killed and status != 0:
        print(f"safeckpt demo: the run to be killed failed on its own (exit status {status})", file=sys.stderr)
        return 1
    before_kill = read_losses(first_log)
    kill_step = max(before_kill) if before_kill else None
    what = f"killed with SIGKILL after step {kill_step}" if killed else "finished before the kill landed"
    ckpt_dir = run_dir / "checkpoints"
    unfinished = len(list(ckpt_dir.glob(".tmp-*")))
    print(f"    {what} in {time.monotonic() - timer:.1f}s; checkpoints on disk: "
          f"{sorted(p.name for p in ckpt_dir.glob('step-*'))}"
          + (f" + {unfinished} unfinished save (a hidden temporary folder, never loaded)" if unfinished else ""),
          flush=True)

    timer = time.monotonic()
    print("(c) resuming in a fresh process from the newest checkpoint that verifies ...", flush=True)
    after_log = run_dir / "losses-after-resume.jsonl"
    status = subprocess.run(
        _worker(cfg, run_dir, after_log, "(c) resumed", resume=True, progress=progress),
        stdout=subprocess.DEVNULL, env=_env(), check=False,
    ).returncode
    if status != 0:
        print(f"safeckpt demo: the resumed run failed (exit status {status})", file=sys.stderr)
        return 1
    after_resume = read_losses(after_log)
    resume_step = min(after_resume) if after_resume else None
    print(f"    resumed at step {resume_step}, done in {time.monotonic() - timer:.1f}s", flush=True)
    return summarize(
        out, read_losses(ref_dir / "losses.jsonl"), before_kill, after_resume,
        finals=(ref_dir / "final", run_dir / "final"), kill_step=kill_step if killed else None,
        resume_step=resume_step, plot=not args.no_plot,
    )

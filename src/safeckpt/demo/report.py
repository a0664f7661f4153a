"""Reading the demo runs' results back and comparing them: losses, final state, table, plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..statediff import max_difference
from ..torch.loader import load_checkpoint

__all__ = ["compare_final", "format_table", "plot_curves", "read_losses", "summarize", "write_csv"]


def read_losses(path: Path) -> dict[int, float]:
    """``{step: loss}`` from a JSON-lines log; a last line cut short by SIGKILL is ignored."""
    losses: dict[int, float] = {}
    if not path.exists():
        return losses
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break  # the process died while writing it
            raise
        losses[int(record["step"])] = float(record["loss"])
    return losses


def _tensors(value: object, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            out.update(_tensors(item, f"{prefix}[{key!r}]"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            out.update(_tensors(item, f"{prefix}[{index}]"))
    return out


def _without_tensors(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return "<tensor>"
    if isinstance(value, dict):
        return {k: _without_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_tensors(v) for v in value]
    return value


def compare_final(first: Path, second: Path) -> dict[str, tuple[float, str]]:
    """Max abs difference, and where it is largest, between two final checkpoints: parameters,
    optimizer state, LR schedule and data position (non-tensor values must be equal)."""
    a = load_checkpoint(first, restore_rng=False)
    b = load_checkpoint(second, restore_rng=False)
    result = {"parameters": max_difference(dict(a.model_state), dict(b.model_state))}
    for label, x, y in (
        ("optimizer state", a.optimizer_state, b.optimizer_state),
        ("LR schedule", a.scheduler_state, b.scheduler_state),
        ("data position", a.extra, b.extra),
    ):
        diff, where = max_difference(_tensors(x, ""), _tensors(y, ""))
        if _without_tensors(x) != _without_tensors(y):
            diff, where = math.inf, "non-tensor values differ"
        result[label] = (diff, where)
    return result


def format_table(reference: dict[int, float], resumed: dict[int, float], *, marks: dict[int, str], rows: int = 16) -> str:
    """Both curves side by side at ``rows`` evenly spaced steps plus the marked ones."""
    steps = sorted(reference)
    every = max(1, len(steps) // rows)
    shown = sorted({s for i, s in enumerate(steps) if i % every == 0} | {steps[-1]} | {s for s in marks if s in reference})
    lines = [f"  {'step':>6}  {'uninterrupted':>15}  {'killed+resumed':>15}  {'|diff|':>8}"]
    for step in shown:
        a, b = reference[step], resumed.get(step, math.nan)
        diff = abs(a - b) if not math.isnan(b) else math.nan
        lines.append(f"  {step:>6}  {a:>15.9f}  {b:>15.9f}  {diff:>8.2g}  {marks.get(step, '')}".rstrip())
    return "\n".join(lines)


def write_csv(path: Path, reference: dict[int, float], resumed: dict[int, float]) -> None:
    """All steps of both curves, one row per step."""
    rows = ["step,uninterrupted,killed_and_resumed"]
    rows += [f"{s},{reference[s]!r},{resumed.get(s, '')!r}" for s in sorted(reference)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def plot_curves(
    path: Path, reference: dict[int, float], resumed: dict[int, float], *, kill_step: int | None, resume_step: int | None
) -> None:
    """A PNG of both loss curves, with the kill and the resume marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(sorted(reference), [reference[s] for s in sorted(reference)], lw=2.4, color="#4c72b0", label="uninterrupted")
    ax.plot(sorted(resumed), [resumed[s] for s in sorted(resumed)], lw=1.1, ls="--", color="#dd8452",
            label="checkpointed, killed, resumed")
    if kill_step is not None:
        ax.axvline(kill_step, color="#c44e52", lw=1, ls=":", label=f"SIGKILL after step {kill_step}")
    if resume_step is not None:
        ax.axvline(resume_step, color="#55a868", lw=1, ls="-.", label=f"resumed at step {resume_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats/char)")
    ax.set_title("safeckpt demo: resumed run vs uninterrupted run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(
    out: Path,
    reference: dict[int, float],
    before_kill: dict[int, float],
    after_resume: dict[int, float],
    *,
    finals: tuple[Path, Path],
    kill_step: int | None,
    resume_step: int | None,
    plot: bool,
) -> int:
    """Print both curves and every difference, write the CSV and PNG; 0 when all are exactly 0.0."""
    start = resume_step if resume_step is not None else len(reference)
    resumed = {s: v for s, v in before_kill.items() if s < start} | after_resume
    redone = [s for s in before_kill if s >= start]
    marks: dict[int, str] = {}
    if resume_step is not None:
        marks[resume_step] = "<- first step of the resumed process"
    if kill_step is not None:
        marks[kill_step] = " & ".join(filter(None, (marks.get(kill_step), "<- SIGKILL after this step")))
    print()
    print(format_table(reference, resumed, marks=marks))
    missing = sorted(set(reference) ^ set(resumed))
    loss_diff = max((abs(reference[s] - resumed[s]) for s in reference if s in resumed), default=math.inf)
    if missing:
        loss_diff = math.inf
    redone_diff = max((abs(before_kill[s] - after_resume[s]) for s in redone if s in after_resume), default=0.0)
    differences = compare_final(*finals)
    write_csv(out / "losses.csv", reference, resumed)
    print()
    print(f"max |loss difference| over {len(reference)} steps: {loss_diff!r}"
          + (f" (steps missing from one run: {missing[:5]})" if missing else ""))
    if redone:
        span = f"step {min(redone)}" if len(redone) == 1 else f"steps {min(redone)}..{max(redone)}"
        print(f"{span} ran twice (after the last checkpoint, before the kill, then again after "
              f"resuming): max |difference| {redone_diff!r}")
    for label, (diff, where) in differences.items():
        print(f"max |difference| of final {label}: {diff!r}" + (f" (at {where})" if diff else ""))
    if plot:
        try:
            plot_curves(out / "loss_curves.png", reference, resumed, kill_step=kill_step,
                        resume_step=resume_step)
            print(f"plot: {out / 'loss_curves.png'}")
        except ImportError as exc:
            print(f"plot skipped: {exc} (pip install 'safeckpt[demo]')")
    print(f"curves: {out / 'losses.csv'}")
    exact = loss_diff == 0.0 and redone_diff == 0.0 and all(diff == 0.0 for diff, _ in differences.values())
    if exact:
        print("RESULT: the killed-and-resumed run is bit-identical to the uninterrupted run.")
        return 0
    print("RESULT: MISMATCH - the resumed run differs from the uninterrupted run.", file=sys.stderr)
    return 1

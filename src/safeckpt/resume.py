"""``check_resume``: prove that saving, loading and continuing gives the run you would have had.

It trains the same loop twice from the same starting RNG state:

1. *reference*: ``steps`` steps without interruption, snapshotting the complete training state
   (model, optimizer, scheduler, extra objects, global and named RNG generators, loss) after
   every step from ``resume_at - 1`` on;
2. *resumed*: ``resume_at`` steps, ``save_checkpoint``; then a fresh state from ``make_state()``
   built under scrambled global RNGs (so anything the checkpoint misses shows up),
   ``load_checkpoint`` into it, and the remaining steps.

After the load and after every later step the two states are compared, and the first difference
is reported as a :class:`Divergence` (step, name, max abs diff). On CPU a correct loop resumes
bit-exactly, so the default tolerance is zero.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .statediff import difference
from .torch.loader import load_checkpoint
from .torch.rng import capture_rng, restore_rng
from .torch.saver import save_checkpoint

__all__ = ["Divergence", "ResumeReport", "TrainState", "check_resume"]


@dataclass
class TrainState:
    """Everything one training loop owns; what :func:`check_resume`'s ``make_state`` returns.

    Attributes:
        model: the module being trained.
        optimizer: its optimizer, if any.
        scheduler: an LR scheduler, ``GradScaler`` or other object with ``state_dict()``.
        extra: further objects with ``state_dict()`` / ``load_state_dict()`` (a data sampler,
            a second scheduler, a GradScaler next to a scheduler...), by name.
        generators: ``torch.Generator`` / ``numpy.random.Generator`` objects the loop draws
            from, by name (the global generators are always included).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    extra: dict[str, object] = field(default_factory=dict)
    generators: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Divergence:
    """Where the resumed run first differs from the uninterrupted one."""

    step: int
    """The step after which the states differ (``resume_at - 1`` means right after loading)."""
    name: str
    """The differing value, e.g. ``optimizer['state'][0]['exp_avg']``, ``loss``, ``rng['torch']``."""
    max_abs_diff: float
    """Largest absolute difference (``inf`` for a shape, type or non-numeric mismatch)."""
    reason: str = ""
    """What the difference means: the loop itself is not deterministic, the checkpoint missed
    state, or the resumed run drifted."""

    def __str__(self) -> str:
        return f"step {self.step}: {self.name} differs by {self.max_abs_diff:.6g} ({self.reason})"


@dataclass(frozen=True)
class ResumeReport:
    """The outcome of :func:`check_resume`."""

    steps: int
    resume_at: int
    reference_losses: list[float | None]
    """Loss returned by ``train_step`` at each step of the uninterrupted run."""
    resumed_losses: list[float | None]
    """Losses of the interrupted run: before ``resume_at`` from the first half, then resumed."""
    divergence: Divergence | None
    """The first difference, or None when the resumed run matched (within ``atol``)."""

    @property
    def ok(self) -> bool:
        """True when resuming reproduced the uninterrupted run."""
        return self.divergence is None

    def __str__(self) -> str:
        head = f"resume at step {self.resume_at} of {self.steps}: "
        if self.divergence is None:
            return head + "identical to the uninterrupted run"
        return head + f"diverged at {self.divergence}"


def _flatten(value: object, prefix: str) -> Iterator[tuple[str, object]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}[{key!r}]")
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple, torch.Tensor)) for v in value):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:  # scalars and flat sequences of scalars (Python's RNG state) compare as one value
        yield prefix, value


def _snapshot(state: TrainState, loss: float | None) -> dict[str, object]:
    """Every value of the training state, flattened by name, with tensors copied."""
    tree: dict[str, object] = {"loss": loss, "model": state.model.state_dict()}
    if state.optimizer is not None:
        tree["optimizer"] = state.optimizer.state_dict()
    if state.scheduler is not None:
        tree["scheduler"] = state.scheduler.state_dict()  # type: ignore[attr-defined]
    for name, obj in state.extra.items():
        tree[f"extra[{name!r}]"] = obj.state_dict()  # type: ignore[attr-defined]
    tree["rng"] = capture_rng(state.generators)
    flat: dict[str, object] = {}
    for top, subtree in tree.items():
        for name, value in _flatten(subtree, top):
            flat[name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return flat


_NOT_DETERMINISTIC = (
    "two runs differ before any checkpoint was taken: the loop itself is not deterministic "
    "(unseeded generator, nondeterministic kernel, or make_state() depends on earlier calls)"
)
_MISSED_BY_LOAD = (
    "the state differs right after loading: the checkpoint does not capture it; pass the object "
    "in TrainState.extra / generators, or fix its state_dict()"
)
_DRIFTED = (
    "state matched after loading but a later step differs: something the loop uses is not in "
    "TrainState (a generator, a counter, a cache)"
)


def _first_difference(
    step: int, expected: dict[str, object], actual: dict[str, object], atol: float, reason: str
) -> Divergence | None:
    only_one = sorted(expected.keys() ^ actual.keys())
    if only_one:
        return Divergence(step, only_one[0], math.inf, f"present in only one run; {reason}")
    for name, value in expected.items():
        diff = difference(value, actual[name])
        if diff > atol:
            return Divergence(step, name, diff, reason)
    return None


def _loss(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach())
    return float(value)  # type: ignore[arg-type]


def _scramble_global_rngs() -> None:
    """Move every global generator somewhere else, so a state the checkpoint misses shows up."""
    seed = int.from_bytes(os.urandom(4), "little")
    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed)


def check_resume(
    make_state: Callable[[], TrainState],
    train_step: Callable[[TrainState, int], object],
    *,
    steps: int,
    resume_at: int | None = None,
    directory: str | os.PathLike[str] | None = None,
    atol: float = 0.0,
) -> ResumeReport:
    """Train ``steps`` steps uninterrupted and with a save/load at ``resume_at``; compare.

    Args:
        make_state: builds a fresh model, optimizer, scheduler... as a :class:`TrainState`.
            It is called three times; it must not depend on state left over from earlier calls.
        train_step: ``train_step(state, step)`` performs training step ``step`` (from 0) and
            returns its loss (float or tensor) or None. It must take every random draw from
            the global generators or from ``state.generators`` / ``state.extra``.
        steps: total number of steps (at least 2).
        resume_at: the first step of the resumed run (default ``steps // 2``); the checkpoint
            is saved after step ``resume_at - 1``.
        directory: where to write the checkpoint (default: a temporary folder, removed after).
        atol: largest absolute difference tolerated (0.0: bit-exact, right on CPU).

    Returns:
        A :class:`ResumeReport`; ``report.ok`` is True when nothing diverged, else
        ``report.divergence`` names the first step and value that differ. The global RNG state
        is put back as it was on entry.

    Example:
        >>> report = check_resume(make_state, train_step, steps=20)  # doctest: +SKIP
        >>> assert report.ok, report  # doctest: +SKIP
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"check_resume: steps must be an int >= 2, got {steps!r}")
    resume_at = steps // 2 if resume_at is None else resume_at
    if isinstance(resume_at, bool) or not isinstance(resume_at, int) or not 1 <= resume_at < steps:
        raise ValueError(f"check_resume: resume_at must be an int in [1, {steps - 1}], got {resume_at!r}")
    entry_rng = capture_rng()
    try:
        with tempfile.TemporaryDirectory(prefix="safeckpt-resume-") as scratch:
            root = Path(directory) if directory is not None else Path(scratch)
            return _run(make_state, train_step, steps, resume_at, root, atol, entry_rng)
    finally:
        restore_rng(entry_rng, source="check_resume")


def _run(
    make_state: Callable[[], TrainState],
    train_step: Callable[[TrainState, int], object],
    steps: int,
    resume_at: int,
    root: Path,
    atol: float,
    entry_rng: dict[str, object],
) -> ResumeReport:
    reference = make_state()
    ref_losses: list[float | None] = []
    expected: dict[int, dict[str, object]] = {}
    for step in range(steps):
        ref_losses.append(_loss(train_step(reference, step)))
        if step >= resume_at - 1:
            expected[step] = _snapshot(reference, ref_losses[-1])
    del reference

    restore_rng(entry_rng, source="check_resume")
    first = make_state()
    losses: list[float | None] = [_loss(train_step(first, step)) for step in range(resume_at)]
    last = resume_at - 1
    divergence = _first_difference(last, expected[last], _snapshot(first, losses[-1]), atol, _NOT_DETERMINISTIC)
    if divergence is not None:
        return ResumeReport(steps, resume_at, ref_losses, losses, divergence)
    path = save_checkpoint(
        first.model,
        first.optimizer,
        None,
        None,
        last,
        directory=root,
        scheduler=first.scheduler,
        extra=first.extra or None,
        rng=first.generators or True,
        overwrite=True,
    )
    del first

    _scramble_global_rngs()
    resumed = make_state()
    load_checkpoint(
        path,
        resumed.model,
        resumed.optimizer,
        scheduler=resumed.scheduler,
        extra=resumed.extra or None,
        restore_rng=resumed.generators or True,
    )
    divergence = _first_difference(last, expected[last], _snapshot(resumed, losses[-1]), atol, _MISSED_BY_LOAD)
    for step in range(resume_at, steps):
        if divergence is not None:
            break
        losses.append(_loss(train_step(resumed, step)))
        divergence = _first_difference(step, expected[step], _snapshot(resumed, losses[-1]), atol, _DRIFTED)
    return ResumeReport(steps, resume_at, ref_losses, losses, divergence)

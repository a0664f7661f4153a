"""Which checkpoints a retention policy keeps, as pure functions (no file system), shared by
:class:`~safeckpt.CheckpointManager` and ``safeckpt prune``.

The rules (each only ever adds to what is kept):

* the ``keep_last`` newest committed steps;
* every step that is a multiple of ``keep_every`` (milestones kept forever);
* the best ``keep_best`` by a metric (:func:`best_steps`, :func:`rank_by_metric`), as Lightning's
  ``ModelCheckpoint(monitor=, mode=, save_top_k=)`` and Orbax's ``best_fn`` keep them;
* the steps in ``protect`` (the manager protects the step it has just saved, so a save of an
  older step than the newest, e.g. after resuming from a fallback, is never deleted by itself).

With neither ``keep_last`` nor a best-K policy everything is kept. Callers list the committed
steps, ask which to keep (:func:`steps_to_keep`), and delete the rest through the storage's
safe removal (manifest uncommitted first).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

from .errors import CheckpointUsageError

__all__ = [
    "attach_metrics",
    "best_steps",
    "check_best_policy",
    "check_policy",
    "metric_value",
    "rank_by_metric",
    "steps_to_keep",
    "steps_to_remove",
]

MODES = ("min", "max")


def check_best_policy(*, keep_best: int | None, metric: str | None, mode: str, caller: str) -> None:
    """Raise ``ValueError`` (naming ``caller``) unless ``keep_best`` is a positive int or None,
    ``metric`` a non-empty string (required with ``keep_best``) and ``mode`` "min" or "max"."""
    if keep_best is not None and (isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1):
        raise ValueError(f"{caller}: keep_best must be a positive int or None, got {keep_best!r}")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ValueError(f"{caller}: metric must be the name of a metric passed to save(metrics=), got {metric!r}")
    if keep_best is not None and metric is None:
        raise ValueError(f"{caller}: keep_best={keep_best} needs metric='name' (e.g. metric='val_loss', mode='min')")
    if mode not in MODES:
        raise ValueError(f"{caller}: mode must be 'min' (lower is better) or 'max', got {mode!r}")


def metric_value(metrics: object, metric: str) -> float | None:
    """``metrics[metric]`` as a float when it is a finite real number, else None (not rankable)."""
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rank_by_metric(values: Mapping[int, float | None], *, mode: str) -> list[int]:
    """Steps with a value, best first; on a tie the newer step ranks first. Steps whose value is
    None (metric missing, NaN or infinite) are left out: they are never "best".

    Example:
        >>> rank_by_metric({100: 0.5, 200: 0.3, 300: None, 400: 0.3}, mode="min")
        [400, 200, 100]
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    ranked = [(sign * value, -step) for step, value in values.items() if value is not None]
    return [-negated for _, negated in sorted(ranked)]


def best_steps(values: Mapping[int, float | None], *, keep_best: int, mode: str) -> set[int]:
    """The ``keep_best`` best steps by value (see :func:`rank_by_metric`).

    Example:
        >>> sorted(best_steps({100: 0.5, 200: 0.3, 300: 0.9}, keep_best=2, mode="max"))
        [100, 300]
    """
    return set(rank_by_metric(values, mode=mode)[:keep_best])


def attach_metrics(
    metadata: Mapping[str, object] | None,
    metrics: Mapping[str, object] | None,
    *,
    keep_best: int | None,
    metric: str | None,
) -> Mapping[str, object] | None:
    """``metadata`` with ``metrics`` under ``"metrics"``, as plain numbers: 0-d tensors and NumPy
    scalars become Python numbers, NaN and infinities null (never best). Raises
    :class:`CheckpointUsageError` when ``keep_best`` is set and ``metric`` is absent."""
    caller = "CheckpointManager.save"
    if keep_best is not None and (not isinstance(metrics, Mapping) or metric not in metrics):
        raise CheckpointUsageError(
            f"{caller}: keep_best={keep_best} ranks checkpoints by {metric!r}; pass "
            f"metrics={{{metric!r}: value}} to save() (got metrics={metrics!r})"
        )
    if metrics is None:
        return metadata
    if not isinstance(metrics, Mapping):
        raise CheckpointUsageError(f"{caller}: metrics must map names to numbers, got {metrics!r}")
    if metadata is not None and "metrics" in metadata:
        raise CheckpointUsageError(f"{caller}: metadata already has a 'metrics' entry; pass metrics in metrics= only")
    plain: dict[str, object] = {}
    for name, value in metrics.items():
        item = getattr(value, "item", None)
        value = item() if callable(item) else value
        plain[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    if metric is not None and plain.get(metric) is not None and metric_value(plain, metric) is None:
        raise CheckpointUsageError(f"{caller}: metrics[{metric!r}] must be a number, got {metrics[metric]!r}")
    return {**(metadata or {}), "metrics": plain}


def check_policy(*, keep_last: int | None, keep_every: int | None, caller: str) -> None:
    """Raise ``ValueError`` (naming ``caller``) unless each limit is a positive int or None."""
    for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{caller}: {name} must be a positive int or None, got {value!r}")


def steps_to_keep(
    steps: Iterable[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Collection[int] = (),
    best: Collection[int] | None = None,
) -> set[int]:
    """The subset of ``steps`` (committed checkpoints) that the policy keeps.

    ``best`` is what a best-K policy selected (:func:`best_steps`), or None without one; with
    ``keep_last=None`` and no best-K policy every step is kept.

    Example:
        >>> sorted(steps_to_keep([100, 200, 300, 400, 500], keep_last=2, keep_every=200))
        [200, 400, 500]
    """
    ordered = sorted(set(steps))
    if keep_last is None and best is None:
        return set(ordered)
    keep = set(ordered[-keep_last:]) if keep_last is not None else set()
    keep |= set(ordered) & (set(protect) | set(best or ()))
    if keep_every is not None:
        keep |= {step for step in ordered if step % keep_every == 0}
    return keep


def steps_to_remove(
    steps: Iterable[int],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    protect: Collection[int] = (),
) -> list[int]:
    """The steps the policy deletes, oldest first (the complement of :func:`steps_to_keep`)."""
    ordered = sorted(set(steps))
    keep = steps_to_keep(ordered, keep_last=keep_last, keep_every=keep_every, protect=protect)
    return [step for step in ordered if step not in keep]

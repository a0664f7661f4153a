"""Pick the newest (or the best) checkpoint of a root that is good, falling back past damaged ones
and saying so.

Torch-free: the caller passes what "good" means (verify, or load and restore), so
:class:`~safeckpt.CheckpointManager`'s ``latest``, ``best`` and ``restore`` share one walk and one
warning. A checkpoint that is incomplete or damaged is skipped with a
:class:`~safeckpt.errors.CheckpointFallbackWarning` and a log line naming both checkpoints and the
reason; when checkpoints exist but none is good the walk raises rather than letting a run
silently start from scratch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

from .errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
)
from .format.manifest import MANIFEST_NAME
from .retention import metric_value, rank_by_metric
from .storage.base import CheckpointStorage, Location

__all__ = ["UNREADABLE", "Candidate", "by_metric", "first_good", "metric_of", "newest_first", "try_in_order"]

logger = logging.getLogger("safeckpt")

UNREADABLE = (CheckpointCorruptedError, CheckpointNotFoundError)
"""What a damaged or incomplete checkpoint raises when read; anything else is the caller's problem."""

Candidate = tuple[int, Location, str | None]
"""A checkpoint to try: its step, where it is, and why it is unusable when that is already known."""


def newest_first(storage: CheckpointStorage) -> list[Candidate]:
    """Every ``step-*`` checkpoint, newest first; a folder without a manifest is marked unusable
    (it was never committed, e.g. a partial copy of a run)."""
    missing = f"{MANIFEST_NAME} is missing (it was never committed)"
    found = [(step, path, None if committed else missing) for step, path, committed in storage.scan_steps()]
    return sorted(found, key=lambda item: item[0], reverse=True)


def metric_of(storage: CheckpointStorage, path: Location, metric: str) -> float | None:
    """The checkpoint's ``metric`` from its manifest's ``metadata["metrics"]``, or None (absent,
    or the manifest is unreadable: then it is unranked, and the walk of the newest reports it)."""
    try:
        with storage.open(path) as folder:
            metadata = folder.read_manifest().metadata
    except CheckpointError:
        return None
    return metric_value(metadata.get("metrics"), metric)


def by_metric(storage: CheckpointStorage, metric: str, mode: str) -> list[Candidate]:
    """The checkpoints that record ``metric``, best first (``mode`` ``"min"`` or ``"max"``)."""
    candidates = {step: (path, why) for step, path, why in newest_first(storage)}
    values = {step: metric_of(storage, path, metric) if why is None else None for step, (path, why) in candidates.items()}
    return [(step, *candidates[step]) for step in rank_by_metric(values, mode=mode)]


def try_in_order(
    attempt: Callable[[Location], object], candidates: Sequence[Candidate]
) -> tuple[Candidate | None, list[Candidate]]:
    """Try ``attempt(path)`` on each candidate in order until one raises none of
    :data:`UNREADABLE`; returns that candidate (None when none is good) and the ones that failed
    before it, each with why. Shared by :func:`first_good` and ``safeckpt prune`` (which must
    never delete the newest checkpoint that verifies)."""
    failures: list[Candidate] = []
    for step, path, known_bad in candidates:
        if known_bad is not None:
            failures.append((step, path, known_bad))
            continue
        try:
            attempt(path)
        except UNREADABLE as exc:
            failures.append((step, path, str(exc)))
            continue
        return (step, path, None), failures
    return None, failures


def first_good(root: Location, attempt: Callable[[Location], object], candidates: list[Candidate]) -> Location | None:
    """Try ``attempt(path)`` on each candidate in order; the first that raises none of
    :data:`UNREADABLE`, or None when there are no candidates.

    Skipped candidates are announced once a good one is found (the warning points at the caller
    of the manager method that called this). Raises :class:`CheckpointCorruptedError` listing
    every failure when none is good.
    """
    good, failed = try_in_order(attempt, candidates)
    failures = [(path, why or "") for _, path, why in failed]
    if good is not None:
        if failures:
            _announce_fallback(failures, good[1])
        return good[1]
    if failures:
        listing = "; ".join(f"{path.name}: {why}" for path, why in failures)
        raise CheckpointCorruptedError(
            f"{root}: none of the {len(failures)} checkpoint(s) verifies ({listing}); "
            "restore a copy of the folder, or move it aside to start the run from scratch"
        )
    return None


def _announce_fallback(failures: list[tuple[Location, str]], chosen: Location) -> None:
    newest, why = failures[0]
    skipped = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    message = (
        f"checkpoint {newest} cannot be used: {why}; falling back to {chosen}{skipped}. "
        "Training resumes from the older step"
    )
    logger.warning("%s", message)
    warnings.warn(message, CheckpointFallbackWarning, stacklevel=4)

"""Which checkpoints a retention policy keeps: one pure function, shared by
:class:`~safeckpt.CheckpointManager` and ``safeckpt prune``.

The rules, in order of precedence (each only ever adds to what is kept):

* the ``keep_last`` newest committed steps;
* every step that is a multiple of ``keep_every`` (milestones kept forever);
* the steps in ``protect`` (the manager protects the step it has just saved, so a save of an
  older step than the newest, e.g. after resuming from a fallback, is never deleted by itself).

``keep_last=None`` keeps everything. Nothing here touches the file system: callers list the
committed steps, ask which to keep, and delete the rest through
:func:`safeckpt.commit.remove_checkpoint` (manifest uncommitted first).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

__all__ = ["check_policy", "steps_to_keep", "steps_to_remove"]


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
) -> set[int]:
    """The subset of ``steps`` (committed checkpoints) that the policy keeps.

    Example:
        >>> sorted(steps_to_keep([100, 200, 300, 400, 500], keep_last=2, keep_every=200))
        [200, 400, 500]
    """
    ordered = sorted(set(steps))
    if keep_last is None:
        return set(ordered)
    keep = set(ordered[-keep_last:]) | (set(ordered) & set(protect))
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

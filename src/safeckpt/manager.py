"""``CheckpointManager``: periodic saves, retention, and automatic resume from the newest good one.

One manager owns one root folder of ``step-NNNNNNNN`` checkpoints (names in :mod:`safeckpt.format.layout`).

* ``save`` writes a checkpoint through :func:`~safeckpt.save_checkpoint` (optionally in the
  background, at most one in flight) and only after it is committed applies retention: the
  ``keep_last`` newest steps are kept, plus the ``keep_best`` best by ``metric`` (stored in
  each manifest's ``metadata["metrics"]``), plus every step divisible by ``keep_every``, plus
  the one just written.
* ``best`` picks the best checkpoint by ``metric`` that verifies.
* ``latest`` / ``restore`` pick the newest checkpoint that verifies. When a newer one is
  incomplete or damaged they fall back to the previous one and say so, with a
  :class:`~safeckpt.errors.CheckpointFallbackWarning` and a log line, naming both checkpoints
  and the reason. If checkpoints exist but none verifies they raise rather than silently
  starting from scratch.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch

from .errors import CheckpointNotFoundError, CheckpointUsageError, checkpoint_exists
from .fallback import UNREADABLE, by_metric, first_good, metric_of, newest_first
from .format.layout import step_dirname
from .pipeline.verify import verify_checkpoint
from .retention import attach_metrics, best_steps, check_best_policy, check_policy, steps_to_keep
from .storage.base import Location, ObjectPath
from .storage.locate import as_location, storage_for
from .torch.loader import Checkpoint, load_checkpoint
from .torch.plan import SaveOptions
from .torch.saver import PendingSave, save
from .torch.usage import check_extra

__all__ = ["CheckpointManager"]

logger = logging.getLogger("safeckpt")

class _Returned:
    """Stands in for an ``extra`` value without ``load_state_dict``: its presence is checked with
    the rest before anything is restored, and its state is only returned in ``Checkpoint.extra``."""

    def load_state_dict(self, state: object) -> None:
        pass


class CheckpointManager:
    """Save checkpoints of a training run into one folder and resume from the newest good one.

    Args:
        directory: root folder of the run's checkpoints (created on the first save).
        keep_last: keep only this many newest checkpoints (None keeps all). Older ones are
            deleted only after a new checkpoint has been committed.
        keep_every: additionally keep forever every checkpoint whose step is a multiple of this.
        keep_best: additionally keep the this many best checkpoints by ``metric`` (with
            ``keep_last=None`` only these, the milestones and the newest are kept).
        metric: name of the metric, passed to :meth:`save` as ``metrics={name: value}``, that
            ranks checkpoints for ``keep_best`` and :meth:`best`.
        mode: ``"min"`` (default: lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        async_save: ``save`` returns as soon as the state is copied and writes in the
            background, applying retention right after the commit; the next ``save``, ``wait``,
            ``restore``, ``latest`` or ``close`` waits for it and raises its error if any.
        storage_options: when ``directory`` is an fsspec URL (``s3://bucket/run``), the
            options of its file system (e.g. ``{"endpoint_url": ...}``).

    Example:
        >>> mgr = CheckpointManager("checkpoints", keep_last=3, keep_every=1000)  # doctest: +SKIP
        >>> ckpt = mgr.restore(model=model, optimizer=opt, scheduler=sched)  # doctest: +SKIP
        >>> start = ckpt.step + 1 if ckpt is not None else 0  # doctest: +SKIP
        >>> for step in range(start, total):  # doctest: +SKIP
        ...     train_one_step()
        ...     if step % 100 == 0:
        ...         mgr.save(step, model=model, optimizer=opt, scheduler=sched)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Location,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_policy(keep_last=keep_last, keep_every=keep_every, caller="CheckpointManager")
        check_best_policy(keep_best=keep_best, metric=metric, mode=mode, caller="CheckpointManager")
        if keep_last == 1 and keep_best is None:
            warnings.warn(
                f"CheckpointManager({str(directory)!r}, keep_last=1): only the newest checkpoint is "
                "kept, so if it is damaged (a crash mid-write of the storage, a bad disk) there is "
                "nothing to fall back to; keep_last=2 costs one more checkpoint of disk",
                UserWarning,
                stacklevel=2,
            )
        self.directory = as_location(directory)
        self.storage_options = dict(storage_options) if storage_options else None
        self._storage = storage_for(self.directory, self.storage_options)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.metric = metric
        self.mode = mode
        self.async_save = async_save
        self._pending: PendingSave | None = None

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep_last={self.keep_last}, "
            f"keep_every={self.keep_every}, keep_best={self.keep_best}, metric={self.metric!r}, "
            f"mode={self.mode!r}, async_save={self.async_save})"
        )

    # -- listing -----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first (not verified; see :meth:`latest`).

        With ``async_save``, a save in flight may still commit, and its retention remove old
        steps, after this returns: call :meth:`wait` first for a list that stays true."""
        return [step for step, _ in self._storage.list_checkpoints()]

    def path(self, step: int) -> Location:
        """Where the checkpoint for ``step`` lives (whether or not it exists)."""
        return self.directory / step_dirname(step)

    def latest(self) -> Location | None:
        """The newest checkpoint that verifies completely, or None when there is none at all.

        "Completely" is :func:`~safeckpt.verify_checkpoint`'s audit: every digest the manifest
        records. :meth:`restore` checks what loading checks (per-chunk digests where a file has
        them), so a checkpoint whose whole-file digest alone is wrong restores but is not latest.

        Newer checkpoints that are incomplete or damaged are skipped with a
        :class:`~safeckpt.errors.CheckpointFallbackWarning` and a log line. Raises
        :class:`~safeckpt.errors.CheckpointCorruptedError` when checkpoints exist but none verifies.
        """
        self.wait()
        return first_good(self.directory, self._verify, newest_first(self._storage))

    def _verify(self, path: Location) -> object:
        return verify_checkpoint(path, storage_options=self.storage_options)

    def best(self) -> Location | None:
        """The best checkpoint by ``metric`` that verifies completely; None when no checkpoint
        has the metric. A better one that is damaged is skipped with a
        :class:`~safeckpt.errors.CheckpointFallbackWarning`, as in :meth:`latest`."""
        if self.metric is None:
            raise CheckpointUsageError(
                f"{self.directory}: best() ranks checkpoints by a metric; create the manager with "
                "metric='name' (and mode='min' or 'max') and save with metrics={'name': value}"
            )
        self.wait()
        return first_good(self.directory, self._verify, by_metric(self._storage, self.metric, self.mode))

    # -- saving ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | Mapping[str, object] | None = None,
        scheduler: object | None = None,
        config: object | None = None,
        vocab: object | None = None,
        extra: Mapping[str, object] | None = None,
        metadata: Mapping[str, object] | None = None,
        rng: bool | Mapping[str, object] = True,
        overwrite: bool = False,
        metrics: Mapping[str, object] | None = None,
    ) -> Location:
        """Save a checkpoint for ``step`` and apply retention once it is committed.

        Arguments are those of :func:`~safeckpt.save_checkpoint`, plus ``metrics``: numbers by
        name (e.g. ``{"val_loss": 0.31}``; tensors and NumPy scalars are converted, NaN and
        infinities are stored as null and never rank best), stored in the manifest's
        ``metadata["metrics"]``; required to hold ``metric`` when ``keep_best`` is set. A checkpoint already present
        for ``step`` raises :class:`~safeckpt.errors.CheckpointExistsError` unless
        ``overwrite=True`` - or unless it fails verification (e.g. the run was resumed from an
        earlier step because this one was damaged), in which case it is replaced.

        Returns:
            The checkpoint's folder. With ``async_save=True`` it is returned once the state has
            been copied, before the folder exists; :meth:`wait` returns when it does.
        """
        metadata = attach_metrics(metadata, metrics, keep_best=self.keep_best, metric=self.metric)
        self.wait()
        if not overwrite:
            overwrite = self._replace_if_damaged(step, model)
        # FSDP2/DTensor/DDP in a job: every rank saves, the coordinator prunes while the others
        # wait for it, so every rank's steps() agree once save() (or, async, wait()) returns.
        options = SaveOptions(
            directory=self.directory, scheduler=scheduler, extra=extra, metadata=metadata, rng=rng, overwrite=overwrite,
            async_=self.async_save, storage_options=self.storage_options,
            on_commit=lambda _: self._apply_retention(step),
        )  # fmt: skip
        result = save(model, optimizer, config, vocab, step, options)
        if isinstance(result, PendingSave):
            self._pending = result
            return result.path
        return result

    def _replace_if_damaged(self, step: int, model: object) -> bool:
        path = self.path(step)
        if not self._storage.exists(path):
            return False
        if isinstance(path, ObjectPath) and not self._storage.committed(path):
            # Another save's objects, in flight or interrupted (a later save deletes stale ones):
            # the create-only commit decides between two writers of one step.
            return False
        try:
            self._verify(path)
        except UNREADABLE as exc:
            logger.warning("replacing damaged checkpoint %s: %s", path, exc)
            return True
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from .distributed.api import warn_if_unsharded  # another rank may have saved this step

            warn_if_unsharded(model, stacklevel=3)
        raise checkpoint_exists(
            path, step, why=" and verifies", fix="restore() before training so the loop starts after it"
        )

    def _apply_retention(self, just_saved: int) -> None:
        if self.keep_last is None and self.keep_best is None:
            return
        committed = self._storage.list_checkpoints()
        best = None
        if self.keep_best is not None and self.metric is not None:  # check_best_policy: both or neither
            values = {step: metric_of(self._storage, path, self.metric) for step, path in committed}
            best = best_steps(values, keep_best=self.keep_best, mode=self.mode)
        keep = steps_to_keep(
            [step for step, _ in committed],
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            protect={just_saved},
            best=best,
        )
        for step, path in committed:
            if step not in keep:
                try:
                    self._storage.remove(path)
                except OSError as exc:  # the new checkpoint is committed: that save succeeded
                    message = (
                        f"{path}: could not remove this old checkpoint ({exc.strerror or exc}); "
                        f"checkpoint {just_saved} is saved. Remove it by hand to free the space; the "
                        "next save tries again"
                    )
                    logger.warning("%s", message)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    continue
                logger.info(
                    "removed checkpoint %s (keep_last=%s, keep_best=%s)", path, self.keep_last, self.keep_best
                )

    def wait(self) -> None:
        """Block until a background save has committed (retention runs right after the commit,
        on the save's thread); raises its error if it failed (then nothing is deleted)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def close(self) -> None:
        """Wait for a background save to finish (raising its error); the manager stays usable."""
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the error in flight behind the save's
            try:
                self.close()
            except Exception as save_error:
                logger.error("background checkpoint save failed too: %s", save_error)

    # -- restoring ---------------------------------------------------------------------------

    def restore(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: object | None = None,
        extra: Mapping[str, object] | None = None,
        step: int | None = None,
        restore_rng: bool | Mapping[str, object] = True,
        strict: bool = True,
        map_location: str | torch.device = "cpu",
    ) -> Checkpoint | None:
        """Restore the newest good checkpoint (or ``step``) into the given objects.

        Returns None when the folder holds no checkpoint, so a loop can start from scratch.
        Each checkpoint is read and verified once: a damaged newest one is skipped with a
        :class:`~safeckpt.errors.CheckpointFallbackWarning` (nothing is restored from it), as in
        :meth:`latest`. Values in ``extra`` with ``load_state_dict`` are restored in place; for
        the others only their presence is checked, and their state is in ``Checkpoint.extra``.
        RNG state is restored by default, as in :func:`~safeckpt.load_checkpoint`.

        Raises:
            CheckpointNotFoundError: ``step`` was given and has no checkpoint.
            CheckpointCorruptedError: checkpoints exist but none verifies (or ``step``'s does not).
            CheckpointMismatchError: the checkpoint does not fit the given objects.
        """
        self.wait()
        check_extra("CheckpointManager.restore", extra)
        targets = {
            name: value if callable(getattr(value, "load_state_dict", None)) else _Returned()
            for name, value in (extra or {}).items()
        }
        loaded: list[Checkpoint] = []

        def attempt(path: Location) -> None:
            loaded.append(
                load_checkpoint(
                    path,
                    model,
                    optimizer,
                    scheduler=scheduler,
                    extra=targets,
                    map_location=map_location,
                    strict=strict,
                    restore_rng=restore_rng,
                    storage_options=self.storage_options,
                )
            )

        if step is not None:
            path = self.path(step)
            if not self._storage.committed(path):
                raise CheckpointNotFoundError(
                    f"{path}: no committed checkpoint for step {step} (available: {self.steps()})"
                )
            attempt(path)
        elif first_good(self.directory, attempt, newest_first(self._storage)) is None:
            return None
        return loaded[-1]

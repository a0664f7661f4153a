"""PyTorch Lightning: ``Trainer(plugins=[SafeckptIO()])`` writes every Lightning checkpoint
(``epoch=3-step=100.ckpt``, ``last.ckpt``, ...) as a verified safeckpt folder, never pickled.

How Lightning's checkpoint dict is stored:

* ``state_dict`` -> ``model.safetensors`` (tied weights once);
* ``optimizer_states`` -> the optimizer tree, ``lr_schedulers`` -> the scheduler tree (lists, one
  entry per optimizer / scheduler);
* ``hyper_parameters`` -> ``config.json`` (JSON: tuples come back as lists; see the README);
* everything else (``epoch``, ``global_step``, ``loops``, ``callbacks``, precision-plugin and
  datamodule state, what ``on_save_checkpoint`` added) -> ``extra``, keyed as in the dict;
* the RNG state (Python, NumPy, torch CPU and CUDA), which Lightning itself does not save, is
  captured when the checkpoint is saved and restored when it is loaded, so ``trainer.fit(...,
  ckpt_path="last")`` continues with the same random draws when the checkpoint was written on an
  epoch's last batch (``every_n_train_steps``). Written elsewhere (at validation or epoch end,
  mid-epoch), it does not: a restarting Lightning creates dataloader iterators, which draw their
  seeds from the global RNG, at other points than the uninterrupted run (see the README).

A value that cannot be stored without pickle raises :class:`~safeckpt.errors.UnsupportedValueError`
naming its key in the checkpoint dict. Every save goes to exactly the path Lightning chose, with
``overwrite=True``: ``last.ckpt``, rewritten on each save, is swapped for the new folder in one
atomic rename (on an object store: its manifest replaced in one PUT), so it is always either the
old or the new checkpoint.

Object stores: ``ModelCheckpoint(dirpath="s3://bucket/run")`` (any fsspec URL) works; each
checkpoint is a prefix committed by its manifest (spec/FORMAT.md, "Object stores"). Lightning's
own checks on the path (``fs.exists`` for its version counter, ``fs.ls`` of ``dirpath``) see the
prefix as a directory, which is what they need. ``fit(ckpt_path="last")`` does not find a remote
``last.ckpt``: Lightning 2.x drops the URL's protocol when it lists ``dirpath`` and looks for the
file on the local disk (Lightning issue #18261), and even with the protocol its ``fs.modified``
fails on a prefix; it warns "no last checkpoint" and trains from scratch before any plugin is
called. :func:`last_checkpoint` gives the URL to pass instead.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO

from ..errors import MissingRNGStateWarning, UnsupportedValueError
from ..format.manifest import MANIFEST_NAME
from ..storage.base import Location, ObjectPath
from ..storage.locate import as_location, storage_for
from ..torch.loader import load_checkpoint as load_safeckpt
from ..torch.plan import SaveOptions, plan_checkpoint
from ..torch.rng import restore_rng
from ..torch.saver import PendingSave, write_plan

__all__ = ["SafeckptIO", "last_checkpoint", "load_from_checkpoint"]

_HPARAMS = "hyper_parameters"
_HPARAMS_TYPE = "hparams_type"
_SPLIT = ("state_dict", "optimizer_states", "lr_schedulers", _HPARAMS, _HPARAMS_TYPE)
_META = "lightning"
_LABELS = {
    "model": "checkpoint['state_dict']",
    "optimizer": "checkpoint['optimizer_states']",
    "scheduler": "checkpoint['lr_schedulers']",
    "config": f"checkpoint[{_HPARAMS!r}]",
    "extra": "checkpoint",
}
_WORKER_THREAD = (
    "SafeckptIO.save_checkpoint runs on a worker thread (inside Lightning's AsyncCheckpointIO?) "
    "while training goes on, so the RNG state it captures is not the one of the step being saved "
    "and a run resumed from {path} will draw different random numbers. Use "
    "Trainer(plugins=[SafeckptIO(async_save=True)]) instead of AsyncCheckpointIO(SafeckptIO()): it "
    "snapshots the state and the RNG on the training thread and writes in the background"
)

M = TypeVar("M", bound="pl.LightningModule")


class SafeckptIO(CheckpointIO):
    """Lightning ``CheckpointIO`` plugin writing verified, pickle-free safeckpt checkpoints.

    Args:
        async_save: copy the state (and RNG) to CPU memory on the training thread, then write
            and commit in the background; at most one save is in flight, and the next save,
            load, removal or the end of training waits for it (and raises its error).
        verify: check every file's SHA-256 when loading (sizes and headers are always checked).
        storage_options: options of the fsspec file system for URL paths (s3fs: ``endpoint_url``,
            ``key``, ``secret``, ...), used by every save, load and removal of a URL; the
            ``storage_options`` of ``trainer.save_checkpoint`` are added on top for that save.
            Local paths do not use them.

    Example:
        >>> trainer = pl.Trainer(plugins=[SafeckptIO()],  # doctest: +SKIP
        ...                      callbacks=[ModelCheckpoint(every_n_train_steps=100, save_last=True)])
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
        >>> remote = pl.Trainer(plugins=[SafeckptIO(storage_options={"endpoint_url": url})],  # doctest: +SKIP
        ...                     callbacks=[ModelCheckpoint(dirpath="s3://bucket/run", save_last=True)])
        >>> remote.fit(model, ckpt_path=last_checkpoint("s3://bucket/run", storage_options=...))  # doctest: +SKIP
    """

    def __init__(
        self, *, async_save: bool = False, verify: bool = True, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.async_save = async_save
        self.verify = verify
        self.storage_options = dict(storage_options) if storage_options else None
        self._pending: PendingSave | None = None

    def __repr__(self) -> str:
        options = "" if self.storage_options is None else f", storage_options={sorted(self.storage_options)}"
        return f"SafeckptIO(async_save={self.async_save}, verify={self.verify}{options})"

    # -- CheckpointIO --------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as the safeckpt checkpoint ``path`` (a folder or an
        fsspec URL), replacing it atomically; ``storage_options`` (for a URL) are added to the
        plugin's own."""
        location, options = self._where(path, storage_options)
        exact = threading.current_thread() is threading.main_thread()
        if not exact:
            warnings.warn(_WORKER_THREAD.format(path=path), RuntimeWarning, stacklevel=2)
        self.wait()
        rest = {k: v for k, v in checkpoint.items() if k not in _SPLIT}
        hparams_type = checkpoint.get(_HPARAMS_TYPE)
        meta: dict[str, object] = {"rng_exact": exact, "version": str(checkpoint.get("pytorch-lightning_version", ""))}
        if isinstance(hparams_type, type):
            meta[_HPARAMS_TYPE] = f"{hparams_type.__module__}.{hparams_type.__qualname__}"
        step = checkpoint.get("global_step", 0)
        try:
            plan = plan_checkpoint(
                checkpoint.get("state_dict", {}),
                checkpoint.get("optimizer_states"),
                checkpoint.get(_HPARAMS),
                None,
                step if isinstance(step, int) and step >= 0 else 0,
                scheduler=checkpoint.get("lr_schedulers"),
                extra=rest,
                metadata={_META: meta},
            )
        except UnsupportedValueError as exc:
            raise _name_lightning_key(exc, location) from None
        result = write_plan(
            plan, SaveOptions(path=location, overwrite=True, async_=self.async_save, storage_options=options)
        )
        if isinstance(result, PendingSave):
            self._pending = result

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the safeckpt folder ``path`` and rebuild Lightning's checkpoint dict from it;
        the RNG state is restored too. ``weights_only`` is accepted and has nothing to do: no
        object is ever unpickled. ``map_location`` may be a device or a device name; anything
        else (a function, a dict) loads onto the CPU and Lightning moves the state later."""
        checkpoint, rng_state, meta = self._read(path, map_location)
        if rng_state is None:
            warnings.warn(
                f"{path}: has no RNG state (it was not saved by SafeckptIO, e.g. converted from a "
                "torch.save file); training resumes with this process's random state, so dropout and "
                "shuffling will differ from the original run",
                MissingRNGStateWarning,
                stacklevel=2,
            )
        elif meta.get("rng_exact") is False:
            warnings.warn(
                f"{path}: was saved from a worker thread (AsyncCheckpointIO), so its RNG state is not "
                "the one of the saved step: the resumed run will draw different random numbers. Save "
                "with SafeckptIO(async_save=True) for an exact resume",
                MissingRNGStateWarning,
                stacklevel=2,
            )
        if rng_state is not None:
            restore_rng(rng_state, source=str(path))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete checkpoint ``path``; a safeckpt folder is hidden first, and on an object store
        the manifest is deleted first, so a half-deleted checkpoint is never taken for one."""
        location, options = self._where(path)
        if self._pending is not None and self._pending.path == location:
            self.wait()
        if isinstance(location, ObjectPath) or (location / MANIFEST_NAME).is_file():
            storage = storage_for(location.parent, options)
            if storage.exists(location):  # a committed checkpoint, leftovers, or one plain object
                storage.remove(location)
            return
        path = location  # what another CheckpointIO wrote: a file or a folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def teardown(self) -> None:
        """Wait for a background save in flight (Lightning calls this when training ends)."""
        self.wait()

    # -- safeckpt ------------------------------------------------------------------------------

    def wait(self) -> None:
        """Wait for the background save in flight, if any, and raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _where(self, path: Any, storage_options: Any | None = None) -> tuple[Location, dict[str, Any] | None]:
        """Where ``path`` is, and the fsspec options to reach it (None for a local path)."""
        location = as_location(path if isinstance(path, (str, os.PathLike)) else str(path))
        if isinstance(location, Path):
            if storage_options is not None:
                raise UnsupportedValueError(
                    f"{path}: storage_options (got {storage_options!r}) apply to fsspec URLs "
                    "(s3://..., memory://...), not to a local path; call trainer.save_checkpoint "
                    "without it, or save to a URL"
                )
            return location, None
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise UnsupportedValueError(
                f"{path}: storage_options must be a mapping of fsspec options, got {type(storage_options).__qualname__}"
            )
        return location, {**(self.storage_options or {}), **(storage_options or {})} or None

    def _read(self, path: Any, map_location: Any) -> tuple[dict[str, Any], object, dict[str, Any]]:
        self.wait()
        location, options = self._where(path)
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        ckpt = load_safeckpt(
            location, map_location=device, verify=self.verify, restore_rng=False, storage_options=options
        )
        meta = ckpt.metadata.get(_META)
        meta = dict(meta) if isinstance(meta, Mapping) else {}
        checkpoint: dict[str, Any] = {"state_dict": ckpt.model_state, **ckpt.extra}
        if ckpt.optimizer_state is not None:
            checkpoint["optimizer_states"] = ckpt.optimizer_state
        if ckpt.scheduler_state is not None:
            checkpoint["lr_schedulers"] = ckpt.scheduler_state
        if ckpt.config is not None:
            checkpoint[_HPARAMS] = ckpt.config
            if meta.get(_HPARAMS_TYPE) == "omegaconf.dictconfig.DictConfig":
                from omegaconf import DictConfig, OmegaConf

                checkpoint[_HPARAMS] = OmegaConf.create(ckpt.config)  # type: ignore[call-overload]
                checkpoint[_HPARAMS_TYPE] = DictConfig
        return checkpoint, ckpt.rng_state, meta


def _name_lightning_key(exc: UnsupportedValueError, path: Location) -> UnsupportedValueError:
    """The core's message names ``extra[...]`` / ``config[...]``; say which key of Lightning's
    checkpoint dict that is, and what to do."""
    text = str(exc)
    match = re.match(r"(model|optimizer|scheduler|config|extra)\b", text)
    hint = (
        "convert it to tensors and plain values (e.g. in on_save_checkpoint or a state_dict()), or "
        "leave it out; SafeckptIO never pickles"
    )
    if match is not None:
        text = _LABELS[match.group(1)] + text[match.end() :]
        if match.group(1) == "config":
            hint = "pass it to save_hyperparameters(ignore=[...]) or store a JSON value instead"
    return UnsupportedValueError(f"{path}: {text}. Lightning checkpoint entry: {hint}")


def load_from_checkpoint(
    cls: type[M],
    path: str | os.PathLike[str],
    map_location: Any | None = None,
    strict: bool | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> M:
    """``LitClass.load_from_checkpoint(path, **kwargs)`` for a safeckpt checkpoint.

    Lightning's own ``load_from_checkpoint`` calls ``torch.load`` directly, which no plugin sees.
    This verifies the checkpoint (a folder, or an fsspec URL with ``storage_options``), builds
    ``cls`` from the saved hyper-parameters (``kwargs`` take precedence), calls its
    ``on_load_checkpoint`` and loads the weights; the RNG is left alone.

    Example:
        >>> model = load_from_checkpoint(LitModel, "checkpoints/last.ckpt")  # doctest: +SKIP
    """
    from lightning.pytorch.core.saving import _load_state

    checkpoint, _, _ = SafeckptIO(storage_options=storage_options)._read(path, map_location)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    if isinstance(map_location, (str, torch.device)) and isinstance(model, torch.nn.Module):
        model = model.to(map_location)
    return model  # type: ignore[return-value]


def last_checkpoint(
    dirpath: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The committed ``last.ckpt`` in ``ModelCheckpoint``'s ``dirpath``, or None if there is none.

    For ``trainer.fit(ckpt_path=...)`` where ``ckpt_path="last"`` cannot find it: a remote
    ``dirpath``, whose listing Lightning looks up on the local disk (see the module docstring).
    None (train from the start) on the first run. Only ``last.ckpt`` is looked at, not the
    ``last-v1.ckpt`` Lightning names when it finds a ``last.ckpt`` it did not write in this run.

    Example:
        >>> trainer.fit(model, ckpt_path=last_checkpoint("s3://bucket/run"))  # doctest: +SKIP
    """
    last = pl.callbacks.ModelCheckpoint
    root = as_location(dirpath)
    location = root / (last.CHECKPOINT_NAME_LAST + last.FILE_EXTENSION)
    if not storage_for(root, storage_options).committed(location):
        return None
    return str(location)

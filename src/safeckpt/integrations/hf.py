"""Hugging Face: ``from safeckpt.hf import Trainer`` instead of ``from transformers import Trainer``.

Every ``checkpoint-N`` folder is then a safeckpt checkpoint, committed atomically (it appears
complete or not at all), holding:

* ``model.safetensors`` (tied weights once) and ``config.json`` (the model's config, with
  ``model_type`` and ``architectures``, so ``from_pretrained`` and ``safeckpt export --to hf``
  work on it), with the generation config and tokenizer files ``save_pretrained`` writes;
* the optimizer, LR scheduler, gradient scaler and RNG state as safeckpt trees, never pickled;
* ``trainer_state.json`` at the top level, where the Trainer reads it. It is listed in
  ``manifest.json`` like every other file, so it is verified with the rest before anything of
  the checkpoint is used (the format allows extra listed files: FORMAT.md §3).

``train(resume_from_checkpoint=True)`` resumes from the newest checkpoint that *verifies*; a
damaged or uncommitted newer one is skipped with a :class:`~safeckpt.errors.CheckpointFallbackWarning`
(the stock Trainer takes the highest-numbered folder even when it is incomplete). Loading never
calls ``torch.load``. Supported: single-process training (CPU or one GPU) with transformers
:data:`SUPPORTED_TRANSFORMERS`; DeepSpeed, FSDP, XLA, SageMaker and multi-process runs are refused
at construction, since their state is saved by other code paths.

The Trainer methods overridden here are private (``_save_checkpoint``, ``_load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``, ``_load_best_model``);
the tests pin their names and signatures so that a transformers upgrade that renames them fails
loudly instead of silently falling back to pickled checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from ..errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUsageError,
)
from ..format.limits import FILE_NAME_PATTERN
from ..format.manifest import MANIFEST_NAME
from ..pipeline.verify import verify_checkpoint
from ..storage.local import subfolders
from ..storage.posix_commit import remove_checkpoint
from ..torch.loader import Checkpoint, load_checkpoint
from ..torch.plan import plan_checkpoint
from ..torch.rng import restore_rng
from ..torch.saver import write_checkpoint

__all__ = ["SUPPORTED_TRANSFORMERS", "TRAINER_STATE_NAME", "Trainer", "latest_checkpoint"]

SUPPORTED_TRANSFORMERS = ((5, 24), (6, 0))
"""transformers versions this module is tested with: from 5.24 (inclusive) to 6.0 (exclusive)."""
TRAINER_STATE_NAME = "trainer_state.json"
_STEP = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-([0-9]+)")
_META = "hf_trainer"
logger = logging.getLogger("safeckpt")


def _check_version() -> None:
    found = tuple(int(part) for part in re.findall(r"[0-9]+", transformers.__version__)[:2])
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= found < high:
        warnings.warn(
            f"safeckpt.hf is tested with transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]}, found "
            f"{transformers.__version__}; the Trainer internals it overrides may have changed. Install "
            f"safeckpt[hf] for a supported version",
            RuntimeWarning,
            stacklevel=3,
        )


_check_version()


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest ``checkpoint-N`` folder under ``output_dir`` that verifies, or None if there is none.

    Newer folders that are damaged, uncommitted or not safeckpt checkpoints are skipped with a
    :class:`~safeckpt.errors.CheckpointFallbackWarning` saying why. Raises
    :class:`~safeckpt.errors.CheckpointCorruptedError` when checkpoints exist but none verifies.
    """
    root = Path(output_dir)
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        found = [(int(m.group(1)), root / name) for name in subfolders(root) if (m := _STEP.fullmatch(name))]
    skipped: list[str] = []
    for _, path in sorted(found, reverse=True):
        if not (path / MANIFEST_NAME).is_file():
            reason = (
                f"it has no {MANIFEST_NAME}: it is a stock transformers checkpoint (convert it with "
                "`safeckpt convert`) or a save that never completed"
            )
        else:
            try:
                verify_checkpoint(path)
                reason = ""
            except (CheckpointCorruptedError, CheckpointNotFoundError) as exc:
                reason = str(exc)
        if not reason:
            for bad in skipped:
                message = f"{bad}; resuming from {path} instead"
                logger.warning(message)
                warnings.warn(message, CheckpointFallbackWarning, stacklevel=2)
            return path
        skipped.append(f"skipping {path}: {reason}")
    if skipped:
        raise CheckpointCorruptedError(
            f"{root}: no checkpoint-N folder verifies ({'; '.join(skipped)}); resume from an explicit "
            "path or start over"
        )
    return None


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are verified, atomic, pickle-free safeckpt folders.

    A drop-in replacement: same arguments, same ``checkpoint-N`` names, same
    ``train(resume_from_checkpoint=...)``.

    Example:
        >>> from safeckpt.hf import Trainer  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # newest checkpoint that verifies  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        output_dir = str(getattr(training_args, "output_dir", None) or "")
        if "://" in output_dir:  # checked first: transformers.Trainer creates output_dir at once
            raise CheckpointUsageError(
                f"{output_dir}: safeckpt.hf.Trainer needs a local output_dir (transformers writes its logs, "
                "model card and other files there with local file calls); train into a local folder and "
                "copy checkpoints to the bucket, or use CheckpointManager/Lightning's SafeckptIO with a URL"
            )
        super().__init__(*args, **kwargs)
        unsupported = [
            name
            for name, on in (
                ("DeepSpeed", self.is_deepspeed_enabled),
                ("FSDP", self.is_fsdp_enabled),
                ("more than one process", self.args.world_size > 1),
                ("XLA", transformers.utils.is_torch_xla_available()),
                ("SageMaker model parallelism", transformers.utils.is_sagemaker_mp_enabled()),
            )
            if on
        ]
        if unsupported:
            raise CheckpointError(
                f"safeckpt.hf.Trainer does not support {', '.join(unsupported)} yet (each saves its state "
                "through its own code path); use transformers.Trainer for this run"
            )
        self._safeckpt_resume: tuple[str, Checkpoint] | None = None

    # -- saving --------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-<global_step>`` as one atomic safeckpt commit, then rotate."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if (
            self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            # The stock Trainer checks after writing the weights; here trainer_state.json is
            # committed with them, so the folder being written counts as existing.
            if best == output_dir or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.should_save:
            return
        # What the stock Trainer records of callbacks with state (EarlyStoppingCallback, ...).
        stateful: Any = self.state.stateful_callbacks
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, transformers.trainer_callback.ExportableState):
                name, state = type(callback).__name__, callback.state()
                if isinstance(stateful[name], list):
                    stateful[name].append(state)
                else:
                    stateful[name] = state
        self._write(output_dir)
        if self.args.push_to_hub:
            self._push_from_checkpoint(output_dir)
        self._rotate(run_dir, output_dir)

    def _write(self, output_dir: str) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = getattr(unwrapped, "config", None)
        if isinstance(unwrapped, transformers.PreTrainedModel) and isinstance(config, transformers.PretrainedConfig):
            # What save_pretrained records in config.json (it sets them on the config, too).
            config.dtype = str(unwrapped.dtype).split(".")[1]
            config.architectures = [type(unwrapped).__name__]
        full = not self.args.save_only_model
        scaler = getattr(self.accelerator, "scaler", None)
        plan = plan_checkpoint(
            unwrapped.state_dict(),
            self.optimizer if full and self.optimizer is not None else None,
            # to_dict() keeps model_type, so from_pretrained() reads config.json as it is.
            config.to_dict() if isinstance(config, transformers.PretrainedConfig) else None,
            None,
            self.state.global_step,
            scheduler=self.lr_scheduler if full and self.lr_scheduler is not None else None,
            extra={"scaler": scaler} if full and scaler is not None else None,
            metadata={_META: {"transformers": transformers.__version__, "save_only_model": not full}},
            rng=True,
        )
        # Exactly what TrainerState.save_to_json writes.
        state = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        plan.documents[TRAINER_STATE_NAME] = state.encode()
        for name, data in self._pretrained_files(unwrapped).items():
            if name in plan.documents or name.startswith(tuple(f"{n}." for n in plan.archives)):
                warnings.warn(f"{output_dir}: not saving {name} (written by save_pretrained): a checkpoint file has that name", stacklevel=3)
            else:
                plan.documents[name] = data
        write_checkpoint(plan, path=output_dir, overwrite=True)

    def _pretrained_files(self, model: Any) -> dict[str, bytes]:
        """What the stock Trainer's ``save_model`` writes beside the weights and ``config.json``:
        the generation config and the tokenizer or processor (``processing_class``, else the data
        collator's tokenizer), so ``from_pretrained`` of a ``checkpoint-N`` finds them. Kept as
        listed files of the checkpoint (verified with the rest; FORMAT.md §3)."""
        parts: list[Any] = []
        if isinstance(model, transformers.PreTrainedModel) and model.can_generate():
            parts.append(model.generation_config)
        processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            parts.append(processor)
        files: dict[str, bytes] = {}
        if parts:
            with tempfile.TemporaryDirectory(prefix="safeckpt-hf-") as tmp:
                for part in parts:
                    part.save_pretrained(tmp)
                for path in sorted(Path(tmp).rglob("*")):
                    name = path.relative_to(tmp).as_posix()
                    if path.is_file() and FILE_NAME_PATTERN.fullmatch(name) and name != MANIFEST_NAME:
                        files[name] = path.read_bytes()
                    elif path.is_file():
                        warnings.warn(f"not saving {name} (written by save_pretrained): checkpoint files are flat, plainly named", stacklevel=4)
        return files

    def _rotate(self, run_dir: str, newest: str) -> None:
        """Keep ``save_total_limit`` checkpoints: the one just written (``newest``), the best one
        and the most recently written others, as the stock Trainer does (by modification time, or
        by step where the file system's times are all within a second), so an ``output_dir``
        holding an earlier run's higher-numbered folders never costs the new save. Each removal
        hides the folder before deleting it, so no half-deleted folder looks like a checkpoint."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        found: dict[str, tuple[float, int]] = {}
        for name in os.listdir(run_dir):
            path = os.path.join(run_dir, name)
            if (m := _STEP.fullmatch(name)) and os.path.isdir(path):
                with contextlib.suppress(OSError):  # removed meanwhile
                    found[path] = (os.path.getmtime(path), int(m.group(1)))
        if not found:
            return
        times = [when for when, _ in found.values()]
        by_time = max(times) - min(times) >= 1.0
        order = sorted(found, key=lambda path: found[path] if by_time else found[path][1])
        best = self.state.best_model_checkpoint
        protected = {newest} | ({os.path.join(run_dir, Path(best).name)} if best else set())
        excess = len(order) - max(limit, len(protected & set(order)))
        for path in order:
            if excess <= 0:
                break
            if path in protected:
                continue
            logger.info("Deleting older checkpoint %s due to save_total_limit", path)
            if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
                remove_checkpoint(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
            excess -= 1

    # -- resuming ------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``; ``resume_from_checkpoint=True`` takes the newest
        checkpoint that verifies (see :func:`latest_checkpoint`)."""
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir or "trainer_output")
            if found is None:
                raise CheckpointNotFoundError(
                    f"{self.args.output_dir}: no checkpoint-N folder to resume from; pass "
                    "resume_from_checkpoint=None to start a new run"
                )
            resume_from_checkpoint = str(found)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._safeckpt_resume = None

    def _resumed(self, checkpoint: str) -> Checkpoint:
        """The verified checkpoint being resumed from (read once per resume)."""
        if self._safeckpt_resume is None or self._safeckpt_resume[0] != str(checkpoint):
            if not os.path.isfile(os.path.join(checkpoint, MANIFEST_NAME)):
                raise CheckpointNotFoundError(
                    f"{checkpoint}: not a safeckpt checkpoint (no {MANIFEST_NAME}); convert a stock "
                    "transformers checkpoint with `safeckpt convert` first"
                )
            self._safeckpt_resume = (str(checkpoint), load_checkpoint(checkpoint, restore_rng=False))
        return self._safeckpt_resume[1]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        ckpt = self._resumed(resume_from_checkpoint)  # verifies every file, trainer_state.json too
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        _load_model(target, ckpt)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        ckpt = self._resumed(checkpoint)
        if ckpt.optimizer_state is None:
            logger.warning("%s has no optimizer state (save_only_model=True); the optimizer starts fresh", checkpoint)
            return
        for target, state, name in (
            (self.optimizer, ckpt.optimizer_state, "optimizer"),
            (self.lr_scheduler, ckpt.scheduler_state, "scheduler"),
        ):
            if target is not None and state is not None:
                _load_state(target, state, f"{checkpoint}: {name}")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None:
            return
        state = self._resumed(checkpoint).extra.get("scaler")
        if state is not None:
            _load_state(scaler, state, f"{checkpoint}: scaler")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        ckpt = self._resumed(checkpoint)
        if ckpt.rng_state is None:
            raise CheckpointMismatchError(f"{checkpoint}: has no RNG state; the resumed run would not be exact")
        restore_rng(ckpt.rng_state, source=str(checkpoint))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isfile(os.path.join(best, MANIFEST_NAME)):
            super()._load_best_model()
            return
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        _load_model(self.accelerator.unwrap_model(self.model), load_checkpoint(best, restore_rng=False))


def _load_model(model: Any, ckpt: Checkpoint) -> None:
    """Load the weights strictly, except that a tied weight may be absent when a weight it is
    tied to is present: stock transformers folders (converted ones) store tied weights once."""
    current = model.state_dict()
    present = {current[k].data_ptr() for k in ckpt.model_state if k in current}
    missing = sorted(k for k in current if k not in ckpt.model_state and current[k].data_ptr() not in present)
    unexpected = sorted(set(ckpt.model_state) - set(current))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{ckpt.path}: model weights do not fit {type(model).__qualname__} (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]}); build the model with the config stored in the checkpoint"
        )
    bad = [k for k, v in ckpt.model_state.items() if v.shape != current[k].shape]
    if bad:
        raise CheckpointMismatchError(
            f"{ckpt.path}: {bad[0]} has shape {tuple(ckpt.model_state[bad[0]].shape)} in the checkpoint, "
            f"{tuple(current[bad[0]].shape)} in the model; build the model with the config stored in the checkpoint"
        )
    try:
        model.load_state_dict(ckpt.model_state, strict=False)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{ckpt.path}: model weights do not fit ({str(exc)[:200]})") from exc


def _load_state(target: Any, state: object, label: str) -> None:
    try:
        target.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointMismatchError(
            f"{label}: the saved state does not fit {type(target).__qualname__} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); resume with the same model, optimizer and TrainingArguments"
        ) from exc

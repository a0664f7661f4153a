"""The one exception hierarchy safeckpt raises, and its warnings.

Every error derives from :class:`CheckpointError` and also from the built-in exception a
caller would naturally catch (``FileNotFoundError``, ``ValueError``, ``TypeError``,
``OSError``), so ``except FileNotFoundError`` keeps working for code that predates safeckpt.
Messages name the file or key, what was expected, what was found, and what to do; the helpers at
the end build the parts every module repeats (a quoted value, a damaged file's message, the fix).
"""

from __future__ import annotations

from .format.layout import step_dirname

__all__ = [
    "LOAD_EARLIER",
    "NEVER_COMMITTED",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointUsageError",
    "CheckpointWriteError",
    "MissingRNGStateWarning",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "checkpoint_exists",
    "damaged",
    "short",
]

LOAD_EARLIER = "load an earlier checkpoint"
"""The fix for a checkpoint that cannot be read: a save never touches the ones before it."""
NEVER_COMMITTED = f"missing; the checkpoint was never committed (its save was interrupted), {LOAD_EARLIER}"
"""Why a checkpoint's manifest is absent (after the manifest's path)."""


class CheckpointError(Exception):
    """Base class of every error raised by safeckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or a file its manifest lists, does not exist."""


class CheckpointCorruptedError(CheckpointError, ValueError):
    """A file failed verification or parsing: wrong size or hash, truncated, malformed."""


class UnsupportedFormatError(CheckpointCorruptedError):
    """The manifest declares a format or major version this reader does not implement."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A valid checkpoint does not fit the model, optimizer or other object it is loaded into."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint for this step already exists and ``overwrite`` was not requested."""


class CheckpointUsageError(CheckpointError, TypeError):
    """Arguments that cannot go together (e.g. both ``directory=`` and ``path=``)."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A value in the state to save has a type the format cannot store."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing or committing a checkpoint failed; earlier checkpoints are untouched."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint did not verify and an older one was used instead."""


class MissingRNGStateWarning(UserWarning):
    """Training resumes without (part of) the saved RNG state: a checkpoint saved with ``rng=False``,
    a named generator that was saved but not passed to ``restore_rng=``, or NumPy's state when
    NumPy is not installed."""


def checkpoint_exists(
    folder: object, step: int, *, why: str = "", fix: str = "save under another step or path"
) -> CheckpointExistsError:
    """The one message for "this checkpoint is already there": which folder and step, what else
    is known (``why``, e.g. " and verifies") and the fix besides ``overwrite=True``.

    ``step`` is the step being saved. It names the existing checkpoint only when ``folder`` is
    that step's ``step-NNNNNNNN`` folder; a folder chosen with ``path=`` may hold any step."""
    if getattr(folder, "name", None) == step_dirname(step):
        what = f"a checkpoint for step {step} already exists{why}"
    else:
        what = f"a checkpoint already exists there{why} (this save is step {step})"
    return CheckpointExistsError(f"{folder}: {what}; pass overwrite=True to replace it, or {fix}")


def short(value: object) -> str:
    """``repr(value)``, cut to 80 characters: a value read from a damaged or hostile file stays
    one readable line when a message quotes it."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def damaged(
    source: object, what: str, *, cause: str = "the file is damaged", fix: str = ""
) -> CheckpointCorruptedError:
    """The one shape of "this file cannot be trusted": ``{source}: {what}; {cause}``, then
    ``, {fix}`` when there is something to do besides the obvious (e.g. :data:`LOAD_EARLIER`)."""
    return CheckpointCorruptedError(f"{source}: {what}; {cause}" + (f", {fix}" if fix else ""))

"""The one exception hierarchy safeckpt raises, and its warnings.

Every error derives from :class:`CheckpointError` and also from the built-in exception a
caller would naturally catch (``FileNotFoundError``, ``ValueError``, ``TypeError``,
``OSError``), so ``except FileNotFoundError`` keeps working for code that predates safeckpt.
Messages name the file or key, what was expected, what was found, and what to do.
"""

from __future__ import annotations

__all__ = [
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
]


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
    is known (``why``, e.g. " and verifies") and the fix besides ``overwrite=True``."""
    return CheckpointExistsError(
        f"{folder}: a checkpoint for step {step} already exists{why}; pass overwrite=True to replace it, or {fix}"
    )

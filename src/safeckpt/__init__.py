"""safeckpt: verified, pickle-free checkpoints of complete PyTorch training state.

The whole public API is re-exported here; nothing else needs a deep import.

Example:
    >>> import safeckpt  # doctest: +SKIP
    >>> path = safeckpt.save_checkpoint(model, opt, config, vocab, step)  # doctest: +SKIP
    >>> ckpt = safeckpt.load_checkpoint(path, model=model, optimizer=opt)  # doctest: +SKIP
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .errors import CheckpointCorruptedError as CheckpointCorruptedError
from .errors import CheckpointError as CheckpointError
from .errors import CheckpointExistsError as CheckpointExistsError
from .errors import CheckpointFallbackWarning as CheckpointFallbackWarning
from .errors import CheckpointMismatchError as CheckpointMismatchError
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import CheckpointWriteError as CheckpointWriteError
from .errors import UnsupportedFormatError as UnsupportedFormatError
from .errors import UnsupportedValueError as UnsupportedValueError
from .loader import Checkpoint as Checkpoint
from .loader import load_checkpoint as load_checkpoint
from .saver import PendingSave as PendingSave
from .saver import save_checkpoint as save_checkpoint
from .verify import verify_checkpoint as verify_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "PendingSave",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

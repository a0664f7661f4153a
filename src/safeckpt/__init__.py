"""safeckpt: verified, pickle-free checkpoints of complete PyTorch training state.

The whole public API is re-exported here; nothing else needs a deep import.

Example:
    >>> import safeckpt  # doctest: +SKIP
    >>> path = safeckpt.save_checkpoint(model, opt, config, vocab, step)  # doctest: +SKIP
    >>> ckpt = safeckpt.load_checkpoint(path, model=model, optimizer=opt)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__
from .errors import CheckpointCorruptedError as CheckpointCorruptedError
from .errors import CheckpointError as CheckpointError
from .errors import CheckpointExistsError as CheckpointExistsError
from .errors import CheckpointFallbackWarning as CheckpointFallbackWarning
from .errors import CheckpointMismatchError as CheckpointMismatchError
from .errors import CheckpointNotFoundError as CheckpointNotFoundError
from .errors import CheckpointUsageError as CheckpointUsageError
from .errors import CheckpointWriteError as CheckpointWriteError
from .errors import MissingRNGStateWarning as MissingRNGStateWarning
from .errors import UnsupportedFormatError as UnsupportedFormatError
from .errors import UnsupportedValueError as UnsupportedValueError

# The API below loads on first use, so that `import safeckpt` stays light and never imports torch
# by itself (`safeckpt.numpy` and `verify_checkpoint` work without it). To export another name
# from a module that imports torch, add it here (name -> module) and to __all__.
_LAZY = {
    "Checkpoint": ".torch.loader",
    "CheckpointManager": ".manager",
    "Divergence": ".resume",
    "ResumeReport": ".resume",
    "TrainState": ".resume",
    "check_resume": ".resume",
    "load_checkpoint": ".torch.loader",
    "PendingSave": ".torch.saver",
    "save_checkpoint": ".torch.saver",
    "verify_checkpoint": ".pipeline.verify",
}

if TYPE_CHECKING:
    from .manager import CheckpointManager as CheckpointManager
    from .pipeline.verify import verify_checkpoint as verify_checkpoint
    from .resume import Divergence as Divergence
    from .resume import ResumeReport as ResumeReport
    from .resume import TrainState as TrainState
    from .resume import check_resume as check_resume
    from .torch.loader import Checkpoint as Checkpoint
    from .torch.loader import load_checkpoint as load_checkpoint
    from .torch.saver import PendingSave as PendingSave
    from .torch.saver import save_checkpoint as save_checkpoint


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointUsageError",
    "CheckpointWriteError",
    "Divergence",
    "MissingRNGStateWarning",
    "PendingSave",
    "ResumeReport",
    "TrainState",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "check_resume",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

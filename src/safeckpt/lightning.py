"""PyTorch Lightning integration (needs ``pip install safeckpt[lightning]``).

Example:
    >>> from safeckpt.lightning import SafeckptIO  # doctest: +SKIP
    >>> trainer = lightning.pytorch.Trainer(plugins=[SafeckptIO()])  # doctest: +SKIP
"""

from __future__ import annotations

from .integrations.lightning import SafeckptIO as SafeckptIO
from .integrations.lightning import last_checkpoint as last_checkpoint
from .integrations.lightning import load_from_checkpoint as load_from_checkpoint

__all__ = ["SafeckptIO", "last_checkpoint", "load_from_checkpoint"]

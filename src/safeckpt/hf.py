"""Hugging Face transformers integration (needs ``pip install safeckpt[hf]``).

Example:
    >>> from safeckpt.hf import Trainer  # instead of: from transformers import Trainer  # doctest: +SKIP
    >>> from safeckpt.hf import export_hf  # doctest: +SKIP
    >>> export_hf("out/checkpoint-500", "exported")  # model.safetensors + config.json  # doctest: +SKIP
"""

from __future__ import annotations

from .integrations.hf import SUPPORTED_TRANSFORMERS as SUPPORTED_TRANSFORMERS
from .integrations.hf import Trainer as Trainer
from .integrations.hf import latest_checkpoint as latest_checkpoint
from .integrations.hf_convert import import_hf_checkpoint as import_hf_checkpoint
from .integrations.hf_export import export_hf as export_hf

__all__ = ["SUPPORTED_TRANSFORMERS", "Trainer", "export_hf", "import_hf_checkpoint", "latest_checkpoint"]

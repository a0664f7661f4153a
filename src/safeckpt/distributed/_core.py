"""Every piece of safeckpt's torch-side core that the distributed backend uses, in one place.

Keeping these imports here means that only this module follows the core when it moves. (The
torch-free modules, ``sharding`` and ``numpy_shards``, import the format and pipeline layers
directly, so that they stay usable without torch.)
"""

from __future__ import annotations

from types import ModuleType

from .._version import __version__
from ..configs import config_metadata, config_to_json
from ..errors import checkpoint_exists
from ..format.documents import dump_json, dump_msgpack, load_json, load_msgpack
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest, build
from ..format.safetensors import DTYPE_SIZES
from ..format.tree import decode_document, encode_document
from ..pipeline.read import is_sharded, locate_checkpoint
from ..storage.base import FileSource, PendingWrite
from ..storage.base import Location as StorageLocation
from ..storage.locate import as_location, storage_for
from ..storage.posix_commit import TMP_PREFIX, list_checkpoints, step_dirname
from ..torch.background import PendingSave, acquire_slot
from ..torch.rng import capture_rng, restore_rng
from ..torch.state import state_of, vocab_to_json
from ..torch.tensors import DTYPE_NAMES, TORCH_DTYPES, TensorCollector, archive_parts, tensors_from_buffer


def core_loader() -> ModuleType:
    """``safeckpt.torch.loader`` (imported on use: it dispatches to this package)."""
    from ..torch import loader

    return loader


def core_saver() -> ModuleType:
    """``safeckpt.torch.saver`` (imported on use: it dispatches to this package)."""
    from ..torch import saver

    return saver


__all__ = [
    "DTYPE_NAMES",
    "DTYPE_SIZES",
    "MANIFEST_NAME",
    "TMP_PREFIX",
    "TORCH_DTYPES",
    "FileEntry",
    "FileSource",
    "Manifest",
    "PendingSave",
    "PendingWrite",
    "StorageLocation",
    "TensorCollector",
    "__version__",
    "acquire_slot",
    "archive_parts",
    "as_location",
    "build",
    "capture_rng",
    "checkpoint_exists",
    "config_metadata",
    "config_to_json",
    "core_loader",
    "core_saver",
    "decode_document",
    "dump_json",
    "dump_msgpack",
    "encode_document",
    "is_sharded",
    "list_checkpoints",
    "load_json",
    "load_msgpack",
    "locate_checkpoint",
    "restore_rng",
    "state_of",
    "step_dirname",
    "storage_for",
    "tensors_from_buffer",
    "vocab_to_json",
]

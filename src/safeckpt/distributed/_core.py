"""Every piece of safeckpt's torch-side core that the distributed backend uses, in one place.

Keeping these imports here means that only this module follows the core when it moves. (The
torch-free modules, ``sharding`` and ``numpy_shards``, import the format and pipeline layers
directly, so that they stay usable without torch.)
"""

from __future__ import annotations

from types import ModuleType

from .._version import __version__
from ..errors import checkpoint_exists
from ..format.documents import dump_msgpack, load_json, load_msgpack
from ..format.layout import step_dirname
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest, build
from ..format.safetensors import DTYPE_SIZES, TensorInfo, bools_valid, header_end, parse_header
from ..format.tree import decode_document, encode_document
from ..pipeline.read import is_sharded, locate_checkpoint
from ..storage.base import CheckpointFolder, FileSource, PendingWrite, VerifiedRanges
from ..storage.base import Location as StorageLocation
from ..storage.locate import as_location, storage_for
from ..torch.background import PendingSave, acquire_slot
from ..torch.plan import SaveOptions, plan_documents, plan_trees, standard_trees
from ..torch.rng import restore_rng
from ..torch.tensors import DTYPE_NAMES, TORCH_DTYPES, TensorCollector, archive_parts, tensor_memory


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
    "TORCH_DTYPES",
    "CheckpointFolder",
    "FileEntry",
    "FileSource",
    "Manifest",
    "PendingSave",
    "PendingWrite",
    "SaveOptions",
    "StorageLocation",
    "TensorCollector",
    "TensorInfo",
    "VerifiedRanges",
    "__version__",
    "acquire_slot",
    "archive_parts",
    "as_location",
    "bools_valid",
    "build",
    "checkpoint_exists",
    "core_loader",
    "core_saver",
    "decode_document",
    "dump_msgpack",
    "encode_document",
    "header_end",
    "is_sharded",
    "load_json",
    "load_msgpack",
    "locate_checkpoint",
    "parse_header",
    "plan_documents",
    "plan_trees",
    "restore_rng",
    "standard_trees",
    "step_dirname",
    "storage_for",
    "tensor_memory",
]

"""Every piece of safeckpt's torch-side core that the distributed backend uses, in one place.

Keeping these imports here means that only this module follows the core when it moves. (The
torch-free modules, ``sharding`` and ``numpy_shards``, import the format and pipeline layers
directly, so that they stay usable without torch.)
"""

from __future__ import annotations

from types import ModuleType

from .._version import __version__
from ..format.documents import dump_msgpack, load_json, load_msgpack
from ..format.layout import TMP_PREFIX, step_dirname
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest, build
from ..format.safetensors import DTYPE_SIZES
from ..format.tree import decode_document, encode_document
from ..pipeline.read import locate_local as locate_checkpoint  # sharded checkpoints: local folders only
from ..storage.local import LocalStorage, list_checkpoints
from ..storage.posix import read_bounded, read_files
from ..storage.posix_commit import PosixPendingWrite, write_error
from ..storage.posix_write import fsync_dir, write_file
from ..torch.background import PendingSave, acquire_slot
from ..torch.plan import SaveOptions, plan_documents, plan_trees, standard_trees
from ..torch.rng import restore_rng
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
    "LocalStorage",
    "Manifest",
    "PendingSave",
    "PosixPendingWrite",
    "SaveOptions",
    "TensorCollector",
    "__version__",
    "acquire_slot",
    "archive_parts",
    "build",
    "core_loader",
    "core_saver",
    "decode_document",
    "dump_msgpack",
    "encode_document",
    "fsync_dir",
    "list_checkpoints",
    "load_json",
    "load_msgpack",
    "locate_checkpoint",
    "plan_documents",
    "plan_trees",
    "read_bounded",
    "read_files",
    "restore_rng",
    "standard_trees",
    "step_dirname",
    "tensors_from_buffer",
    "write_error",
    "write_file",
]

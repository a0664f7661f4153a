"""Every piece of safeckpt's core that the distributed backend uses, imported in one place.

The core is being reorganised; keeping the imports here means that only this module follows it.
"""

from __future__ import annotations

from types import ModuleType

from .._version import __version__
from ..archive import DTYPE_SIZES
from ..background import PendingSave, acquire_slot
from ..commit import TMP_PREFIX, PendingCheckpoint, list_checkpoints, step_dirname, write_error
from ..documents import dump_json, dump_msgpack, load_json, load_msgpack
from ..fileio import fsync_dir, read_bounded, read_files, write_file
from ..manifest import MANIFEST_NAME, FileEntry, Manifest, check_file_name
from ..reading import locate_checkpoint
from ..rng import capture_rng, restore_rng
from ..state import config_to_json, state_of, vocab_to_json
from ..tensors import DTYPE_NAMES, TORCH_DTYPES, TensorArchive, archive_parts, tensors_from_buffer
from ..tree import decode_document, encode_document


def core_loader() -> ModuleType:
    """``safeckpt.loader`` (imported on use: it dispatches to this package)."""
    from .. import loader

    return loader


def core_saver() -> ModuleType:
    """``safeckpt.saver`` (imported on use: it dispatches to this package)."""
    from .. import saver

    return saver


__all__ = [
    "DTYPE_NAMES",
    "DTYPE_SIZES",
    "MANIFEST_NAME",
    "TMP_PREFIX",
    "TORCH_DTYPES",
    "FileEntry",
    "Manifest",
    "PendingCheckpoint",
    "PendingSave",
    "TensorArchive",
    "__version__",
    "acquire_slot",
    "archive_parts",
    "capture_rng",
    "check_file_name",
    "config_to_json",
    "core_loader",
    "core_saver",
    "decode_document",
    "dump_json",
    "dump_msgpack",
    "encode_document",
    "fsync_dir",
    "list_checkpoints",
    "load_json",
    "load_msgpack",
    "locate_checkpoint",
    "read_bounded",
    "read_files",
    "restore_rng",
    "state_of",
    "step_dirname",
    "tensors_from_buffer",
    "vocab_to_json",
    "write_error",
    "write_file",
]

"""Read safeckpt checkpoints into numpy arrays, without torch.

The same verified path as :func:`safeckpt.load_checkpoint` (locate, parse the manifest, read and
check every file's size and SHA-256, only then parse), with tensors materialised as numpy arrays:
``BF16`` and the two ``F8`` dtypes come from ``ml_dtypes``, everything else is a native numpy
dtype. Nothing here imports torch, so a checkpoint can be inspected, served or converted on a
machine that has none. Requires the ``numpy`` extra (``pip install 'safeckpt[numpy]'``).

Example:
    >>> from safeckpt.numpy import load_checkpoint  # doctest: +SKIP
    >>> ckpt = load_checkpoint("checkpoints")  # doctest: +SKIP
    >>> ckpt.model_state["embed.weight"].dtype  # doctest: +SKIP
    dtype('float32')
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

try:
    import ml_dtypes
except ImportError as exc:  # pragma: no cover - the numpy extra installs it
    raise ImportError(
        "safeckpt.numpy needs ml_dtypes for bfloat16 and float8 tensors; "
        "install it with: pip install 'safeckpt[numpy]'"
    ) from exc

from .format.documents import load_json
from .format.safetensors import DTYPE_SIZES, parse_header
from .format.tree import TREE_NAMES
from .pipeline.read import (
    CheckpointContents,
    decode_tree,
    is_sharded,
    locate_checkpoint,
    model_aliases,
    read_checkpoint_files,
)
from .storage.base import Buffer

__all__ = ["NUMPY_DTYPES", "Checkpoint", "arrays_from_buffer", "load_checkpoint"]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}  # fmt: skip
"""The numpy dtype of every format dtype (all little-endian)."""


class Checkpoint(CheckpointContents[np.ndarray]):
    """Everything a checkpoint holds, as returned by :func:`load_checkpoint`.

    The fields match :class:`safeckpt.Checkpoint`; tensors are ``numpy.ndarray``; ``rng_state``
    is the RNG tree as stored (see spec/FORMAT.md) — restoring it needs the torch loader.
    """

    _repr_name = "safeckpt.numpy.Checkpoint"


def arrays_from_buffer(buffer: Buffer, *, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a verified safetensors archive into arrays (views of ``buffer`` where aligned).

    Returns the arrays by name, in file order, and the archive's ``__metadata__``.
    """
    infos, metadata = parse_header(buffer, source=source)
    out: dict[str, np.ndarray] = {}
    for info in sorted(infos, key=lambda i: i.begin):
        dtype = NUMPY_DTYPES[info.dtype]
        count = (info.end - info.begin) // DTYPE_SIZES[info.dtype]
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=info.begin)
        if info.begin % DTYPE_SIZES[info.dtype]:
            array = array.copy()  # misaligned (not written by safeckpt): copy to aligned memory
        out[info.name] = array.reshape(info.shape)
    return out, metadata


def _tree_arrays(buffer: Buffer, source: str) -> dict[str, np.ndarray]:
    # Own copies: tree arrays are small and are often updated in place by whoever resumes.
    arrays, _ = arrays_from_buffer(buffer, source=source)
    return {k: a.copy() for k, a in arrays.items()}


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Verify a checkpoint and return its contents with numpy arrays for tensors; no torch needed.

    Args:
        path: a checkpoint folder, its ``manifest.json``, or a root holding ``step-*`` folders
            (the newest committed one is read).
        verify: check every file's SHA-256 (sizes are always checked).

    Returns:
        A :class:`Checkpoint`: model state as ``{name: ndarray}`` (tied names share one array),
        optimizer/scheduler/RNG/extra state as plain trees (dict, list, tuple, int, float, str,
        bytes, None, ndarray), config and vocabulary as parsed JSON.

    Raises:
        CheckpointNotFoundError: the checkpoint or one of its files is missing.
        CheckpointCorruptedError: a file failed verification or parsing
            (:class:`~safeckpt.errors.UnsupportedFormatError` for an unknown major version).

    Example:
        >>> ckpt = load_checkpoint("checkpoints/step-00000100")  # doctest: +SKIP
        >>> ckpt.step, sorted(ckpt.model_state)[:1]  # doctest: +SKIP
        (100, ['embed.weight'])
    """
    folder = locate_checkpoint(path)
    if isinstance(folder, Path) and is_sharded(folder):  # format 1.2, sharded: assembled from its shards
        from .distributed.numpy_shards import load_sharded

        return load_sharded(folder, verify=verify)
    manifest, buffers = read_checkpoint_files(folder, verify=verify)
    source = str(folder / "model.safetensors")
    model_state, model_meta = arrays_from_buffer(buffers["model.safetensors"], source=source)
    for alias, target in model_aliases(model_meta, model_state.keys(), source=source).items():
        model_state[alias] = model_state[target]
    trees = {name: decode_tree(name, buffers, folder, _tree_arrays) for name in TREE_NAMES}
    config = vocab = None
    if "config.json" in buffers:
        config = load_json(bytes(buffers["config.json"]), source=str(folder / "config.json"))
    if "vocab.json" in buffers:
        vocab = load_json(bytes(buffers["vocab.json"]), source=str(folder / "vocab.json"))
    return Checkpoint(
        path=folder,
        step=manifest.step,
        config=config,
        vocab=vocab,
        model_state=model_state,
        optimizer_state=trees["optimizer"],
        extra=trees["extra"] if isinstance(trees["extra"], dict) else {},
        metadata=dict(manifest.metadata),
        manifest=manifest,
        scheduler_state=trees["scheduler"],
        rng_state=trees["rng"],
    )

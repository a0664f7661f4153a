"""A sharded checkpoint read into numpy arrays, without torch: ``safeckpt.numpy.load_checkpoint``
of a format-1.2 folder.

Every listed file is read and verified first (as for any checkpoint), then ``sharding.json`` is
parsed strictly and each tensor is assembled from its chunks into one full array, each chunk
checked against its declared dtype and shape. The state comes back as a plain process sees it:
``model_state`` keyed by parameter name; ``optimizer_state`` as DCP stores it (keyed by
parameter name, not index); ``scheduler_state``; and, from a checkpoint of one rank, its RNG
tree and ``extra``. From several ranks, ``rng_state`` is None and ``extra`` maps ``rank-RRRRR``
to each rank's ``extra`` (as ``consolidate`` writes it).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointCorruptedError
from ..format.documents import load_json, load_msgpack
from ..format.tree import decode_document
from ..numpy import NUMPY_DTYPES, Checkpoint, arrays_from_buffer
from ..pipeline.read import read_checkpoint_files
from .sharding import SHARDING_NAME, Sharding, parse_sharding

__all__ = ["load_sharded"]


def _nest(flat: dict[str, object], sharding: Sharding) -> dict[str, Any]:
    """The nested state dict: each key placed at its path (int items index lists)."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        path = sharding.paths[key]
        node: Any = root
        for part, following in itertools.pairwise(path):
            empty: Any = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                node.extend([None] * (int(part) + 1 - len(node)))
                node[int(part)] = node[int(part)] if node[int(part)] is not None else empty
                node = node[int(part)]
            else:
                node = node.setdefault(part, empty)
        if isinstance(node, list):
            node.extend([None] * (int(path[-1]) + 1 - len(node)))
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return root


def _tree(entry: object, source: str) -> object:
    if not isinstance(entry, dict) or not isinstance(entry.get("structure"), bytes):
        raise CheckpointCorruptedError(f"{source}: expected an encoded state tree; the checkpoint is damaged")
    tensors = entry.get("tensors") or {}

    def resolve(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointCorruptedError(f"{source}: refers to tensor {name!r}, which is not stored")
        return tensors[name]

    return decode_document(load_msgpack(entry["structure"], source=source), source=source, resolve_tensor=resolve)


def load_sharded(folder: Path, *, verify: bool = True) -> Checkpoint:
    """Read the sharded checkpoint ``folder`` (verified) into numpy arrays."""
    manifest, buffers = read_checkpoint_files(folder, verify=verify)
    files = {entry.name: entry for entry in manifest.files}
    sharding = parse_sharding(buffers[SHARDING_NAME], files=files, source=str(folder / SHARDING_NAME))
    arrays = {
        name: arrays_from_buffer(buffers[name], source=str(folder / name))[0]
        for name in sharding.files()
        if name.endswith(".safetensors")
    }
    documents = {
        name: load_msgpack(bytes(buffers[name]), source=str(folder / name))
        for name in sharding.files()
        if name.endswith(".msgpack")
    }
    flat: dict[str, object] = {}
    for key, entry in sharding.tensors.items():
        full = np.zeros(entry.shape, dtype=NUMPY_DTYPES[entry.dtype])
        for chunk in entry.chunks:
            source = str(folder / chunk.location.file)
            piece = arrays[chunk.location.file].get(chunk.location.name)
            if piece is None or piece.dtype != full.dtype or piece.shape != chunk.sizes:
                raise CheckpointCorruptedError(
                    f"{source}: tensor {chunk.location.name!r} is missing or not {entry.dtype} of shape "
                    f"{chunk.sizes} as {SHARDING_NAME} declares; the checkpoint is damaged"
                )
            full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))] = piece
        flat[key] = full
    for key, location in sharding.values.items():
        source = f"{folder / location.file} [{key!r}]"
        document = documents[location.file]
        if not isinstance(document, dict) or key not in document:
            raise CheckpointCorruptedError(f"{source}: missing, though {SHARDING_NAME} places it there")

        def refuse(name: str, source: str = source) -> object:
            raise CheckpointCorruptedError(f"{source}: refers to tensor {name!r}; sharded values hold no tensors")

        flat[key] = decode_document(document[key], source=source, resolve_tensor=refuse)
    state = _nest(flat, sharding)
    ranks = {
        int(name.removeprefix("rank-")): {k: _tree(v, f"{folder} [{name}.{k}]") for k, v in own.items()}
        for name, own in state.items()
        if name.startswith("rank-") and isinstance(own, dict)
    }
    if sharding.world_size == 1:
        rng, extra = ranks.get(0, {}).get("rng"), ranks.get(0, {}).get("extra") or {}
    else:
        rng, extra = None, {f"rank-{r:05d}": own["extra"] for r, own in sorted(ranks.items()) if "extra" in own}
    config = load_json(bytes(buffers["config.json"]), source=str(folder / "config.json")) if "config.json" in buffers else None
    vocab = load_json(bytes(buffers["vocab.json"]), source=str(folder / "vocab.json")) if "vocab.json" in buffers else None
    return Checkpoint(
        path=folder,
        step=manifest.step,
        config=config,
        vocab=vocab,
        model_state=dict(state.get("model", {})),
        optimizer_state=state.get("optimizer"),
        extra=extra if isinstance(extra, dict) else {},
        metadata=dict(manifest.metadata),
        manifest=manifest,
        scheduler_state=_tree(state["scheduler"], f"{folder} [scheduler]") if "scheduler" in state else None,
        rng_state=rng,
    )

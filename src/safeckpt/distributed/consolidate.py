"""``consolidate``: a sharded checkpoint rewritten as an ordinary single-process one.

The result is what ``save_checkpoint`` writes for an unsharded model (``model.safetensors``,
``optimizer.*`` keyed by parameter index as ``torch.optim`` does, ...), so ``load_checkpoint``,
``safeckpt.numpy`` and the JavaScript reader open it. One process reads (and verifies) every
shard and holds the full state in memory.

RNG state and ``extra`` were saved per rank: from a checkpoint of one rank they are kept as
they are; from several ranks the RNG states are dropped (no single process can continue all of
their streams; loading then needs ``restore_rng=False``) and ``extra`` becomes
``{"rank-00000": {...}, "rank-00001": {...}}``. The manifest's metadata records
``consolidated_from`` with the original world size and step folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointMismatchError
from ._core import StorageLocation, as_location, core_saver, locate_checkpoint, plan_trees
from .api import _documents
from .dcp_calls import load
from .layout import decode_tree, rank_key, template
from .reader import Reader, is_sharded

__all__ = ["consolidate"]


def _by_index(optimizer: dict[str, Any]) -> dict[str, Any]:
    """DCP's parameter-name keyed optimizer state as ``torch.optim``'s index keyed one."""
    ids: dict[str, int] = {}
    groups = []
    for group in optimizer.get("param_groups", []):
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    state = {ids[name]: value for name, value in optimizer.get("state", {}).items() if name in ids}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def consolidate(
    src: str | os.PathLike[str] | StorageLocation,
    dst: str | os.PathLike[str] | StorageLocation,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> StorageLocation:
    """Write the sharded checkpoint ``src`` as a single-process checkpoint under the root ``dst``.

    Args:
        src: a sharded checkpoint folder, its ``manifest.json``, or a root (its newest); or an
            fsspec URL (``s3://bucket/run``).
        dst: root folder for the result (``dst/step-NNNNNNNN``, same step as ``src``), or a URL.
        overwrite: replace a checkpoint of that step in ``dst``.
        storage_options: options of the fsspec file system of URL ``src``/``dst`` (both use
            them; for one URL and one local path, leave them out and configure the file system
            through its environment variables).

    Returns:
        The new checkpoint folder.

    Example:
        >>> consolidate("ckpts/step-00000100", "export")  # doctest: +SKIP
        PosixPath('export/step-00000100')
    """
    folder = locate_checkpoint(src, storage_options=storage_options)
    if not is_sharded(folder, storage_options=storage_options):
        raise CheckpointMismatchError(f"{folder}: is already a single-process checkpoint; copy it instead")
    reader = Reader(folder, storage_options=storage_options)
    reader.read_metadata()
    sharding, manifest = reader.sharding, reader.manifest
    assert sharding is not None and manifest is not None
    prefixes = {str(path[0]) for path in sharding.paths.values()}
    state = template(sharding, prefixes)
    load(state, folder, reader=reader, single_process=True)
    documents = _documents(folder, reader)
    source = str(folder)
    ranks = {
        rank: {name: decode_tree(entry, source=f"{source} [{rank_key(rank)}.{name}]") for name, entry in own.items()}
        for rank in range(sharding.world_size)
        if isinstance(own := state.get(rank_key(rank)), dict)
    }
    scheduler = decode_tree(state["scheduler"], source=f"{source} [scheduler]") if "scheduler" in state else None
    optimizer = _by_index(state["optimizer"]) if "optimizer" in state else None
    if sharding.world_size == 1:
        rng, extra = ranks.get(0, {}).get("rng"), ranks.get(0, {}).get("extra")
    else:
        rng = None
        extra = {rank_key(rank): own["extra"] for rank, own in ranks.items() if "extra" in own} or None
    metadata: dict[str, object] = {
        **manifest.metadata,
        "consolidated_from": {"world_size": sharding.world_size, "checkpoint": folder.name},
    }
    trees = {"optimizer": optimizer, "scheduler": scheduler, "rng": rng, "extra": extra if isinstance(extra, dict) else None}
    plan = plan_trees(
        state.get("model", {}), trees, manifest.step, config=documents.get("config.json"),
        vocab=documents.get("vocab.json"), metadata=metadata,
    )  # fmt: skip
    return core_saver().write_checkpoint(plan, as_location(dst), overwrite=overwrite, storage_options=storage_options)

"""A single-process safeckpt checkpoint loaded into a sharded (FSDP2/DTensor) or DDP model.

Every rank reads and verifies the whole checkpoint (the core loader), the state is checked
against the model and optimizer on every rank, and then ``set_model_state_dict`` /
``set_optimizer_state_dict`` with ``full_state_dict=True`` keep each rank's own shard. RNG and
``extra`` were saved by one process, so they map one to one only onto a job of one rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import CheckpointMismatchError
from ._core import StorageLocation, core_loader
from ._core import restore_rng as restore_rng_state
from .dcp_calls import agree
from .layout import group_rank

__all__ = ["load_single_into_sharded"]


def _full_shapes(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _by_name(saved: Mapping[str, Any], names: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """A saved (parameter-id keyed) optimizer state re-keyed by parameter names, group by group,
    using the names ``get_optimizer_state_dict`` gives the live optimizer's parameters."""
    groups, live = saved.get("param_groups"), names["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live):
        raise CheckpointMismatchError(
            f"{source}: the optimizer has {len(live)} parameter group(s), the checkpoint "
            f"{len(groups) if isinstance(groups, list) else 'none'}"
        )
    ids: dict[object, str] = {}
    out_groups = []
    for number, (group, live_group) in enumerate(zip(groups, live, strict=True)):
        if len(group["params"]) != len(live_group["params"]):
            raise CheckpointMismatchError(
                f"{source}: parameter group {number} has {len(live_group['params'])} parameters, "
                f"the checkpoint's {len(group['params'])}"
            )
        ids.update(zip(group["params"], live_group["params"], strict=True))
        out_groups.append({**group, "params": list(live_group["params"])})
    state = {ids[k]: v for k, v in saved.get("state", {}).items() if k in ids}
    return {"state": state, "param_groups": out_groups}


def load_single_into_sharded(
    folder: StorageLocation,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    group: dist.ProcessGroup | None,
    scheduler: object | None,
    extra: Mapping[str, object] | None,
    strict: bool,
    verify: bool,
    restore_rng: bool | Mapping[str, object],
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load the single-process checkpoint ``folder`` into a sharded ``model`` (every rank)."""
    _, world = group_rank(group)
    loader = core_loader()
    source = str(folder)

    def read_and_check() -> Any:
        if world != 1 and restore_rng is not False:
            raise CheckpointMismatchError(
                f"{source}: was saved by one process and is loaded on {world} ranks, so its RNG "
                "state does not map onto them; pass restore_rng=False to load it anyway, knowing "
                "the resumed run will not repeat the original's random draws"
            )
        if world != 1 and extra:
            raise CheckpointMismatchError(
                f"{source}: was saved by one process and is loaded on {world} ranks, so its extra "
                "state does not map onto them; load without extra= and rebuild it for this job"
            )
        ckpt = loader.load_checkpoint(folder, None, None, verify=verify, restore_rng=False, storage_options=storage_options)
        live = _full_shapes(get_model_state_dict(model))
        saved = _full_shapes(ckpt.model_state)
        missing = [k for k in live if k not in saved]
        unexpected = [k for k in saved if k not in live]
        found = [(k, saved[k], live[k]) for k in live if k in saved and saved[k] != live[k]]
        problems = [f"{k!r}: checkpoint {s}, model {m}" for k, s, m in found if s[0] != m[0]]
        if strict:
            problems += [f"{k!r} is missing from the checkpoint" for k in missing]
            problems += [f"{k!r}: checkpoint {s}, model {m}" for k, s, m in found if s[0] == m[0]]
            problems += [f"unexpected key {k!r} in the checkpoint" for k in unexpected]
        elif saved and live and len(missing) == len(live):
            problems.append(f"no tensor of the checkpoint matches the model ({len(saved)} saved); nothing would be loaded")
        if problems:
            fix = "" if not strict or any(s[0] != m[0] for _, s, m in found) else (
                "; or pass strict=False to load the tensors that match (dtypes are then cast; "
                "Checkpoint.missing_keys / unexpected_keys list the rest)"
            )
            raise CheckpointMismatchError(f"{source}: the model does not fit: {'; '.join(problems[:10])}{fix}")
        named = None
        if optimizer is not None:
            if ckpt.optimizer_state is None:
                raise CheckpointMismatchError(f"{source}: has no optimizer state; load without optimizer=")
            named = _by_name(ckpt.optimizer_state, get_optimizer_state_dict(model, optimizer), source=source)
        if scheduler is not None and ckpt.scheduler_state is None:
            raise CheckpointMismatchError(f"{source}: has no scheduler state; load without scheduler=")
        if restore_rng is not False and ckpt.rng_state is None:
            raise CheckpointMismatchError(f"{source}: has no RNG state (saved with rng=False); pass restore_rng=False")
        for name in extra or {}:
            if name not in ckpt.extra:
                raise CheckpointMismatchError(f"{source}: has no extra state {name!r} (saved: {sorted(map(str, ckpt.extra))})")
        return ckpt, named, missing, unexpected

    ckpt, named, ckpt.missing_keys, ckpt.unexpected_keys = agree(group, read_and_check)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    # strict=False: only the keys the model has, each in the model's dtype (torch would cast).
    live = {k: v.dtype if isinstance(v, torch.Tensor) else None for k, v in get_model_state_dict(model).items()}
    state = {
        k: v.to(live[k]) if isinstance(v, torch.Tensor) and live[k] is not None else v
        for k, v in ckpt.model_state.items()
        if k in live
    }
    set_model_state_dict(model, state, options=options)
    if optimizer is not None:
        # checked by _by_name; a parameter without saved state stays without, as in one process
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
    if scheduler is not None:
        loader._restore_in_place(scheduler, ckpt.scheduler_state, f"{folder}: scheduler")
    for name, target in (extra or {}).items():
        loader._restore_in_place(target, ckpt.extra[name], f"{folder}: extra[{name!r}]")
    if restore_rng is not False:
        generators = restore_rng if isinstance(restore_rng, Mapping) else None
        restore_rng_state(ckpt.rng_state, generators, source=source)
    return ckpt

"""One rank of the 2-D device mesh scenario (started by ``dist_harness`` with this workers file).

Usage: ``python hsdp_workers.py mesh2d RANK 4 INIT_FILE TMP``. On 4 ranks it saves HSDP (a
``("replicate", "shard")`` mesh of 2 x 2, where DCP writes each replicated piece once) and
tensor parallel + FSDP (a ``("dp", "tp")`` mesh), and loads them back on 4, 2 and 1 ranks.
Checks are recorded as in ``dist_workers`` (whose helpers this file reuses), in
``TMP/out/rank-RANK.json``.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from dist_workers import (
    Position,
    build,
    check,
    continue_after_save,
    equal_states,
    expect,
    full_state,
    local_params,
    record,
    train,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import safeckpt

CONFIG, VOCAB = {"lr": 0.01, "dims": (5, 7, 3)}, ["<pad>", "a"]


def tp_fsdp(mesh: DeviceMesh, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """An MLP with its two layers tensor-parallel over ``tp`` and fully sharded over ``dp``:
    parameters are DTensors on the 2-D mesh. The hidden width is even: ``RowwiseParallel``
    assumes even shards of its input (7 fails in sharding propagation)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    return model, optimizer, scheduler


def mesh2d(rank: int, world: int, tmp: Path) -> None:
    g2 = dist.new_group([0, 1])
    hsdp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    root = tmp / "hsdp"
    model, opt, sched = build(hsdp_mesh)
    with check("hsdp_parameters_replicated_and_sharded"):
        weight = dict(model.named_parameters())["0.weight"]
        assert isinstance(weight, DTensor), type(weight)
        assert tuple(weight.placements) == (Replicate(), Shard(0)), weight.placements
    train(model, opt, sched, range(3))
    torch.manual_seed(1000 + rank)  # a different RNG stream on every rank, replicas included
    with check("hsdp_save_world_4"):
        path = safeckpt.save_checkpoint(
            model, opt, CONFIG, VOCAB, 3, directory=root, scheduler=sched, extra={"data": Position(10 + rank)}
        )
        assert path == root / "step-00000003" and (path / "manifest.json").is_file()
    after_save_draws, reference, reference_losses = continue_after_save(model, opt, sched, range(3, 6), "hsdp_reference.safetensors")

    with check("hsdp_resume_world_4_bit_identical_rng_and_extra_per_rank"):
        model2, opt2, sched2 = build(hsdp_mesh, seed=7)
        position = Position(-1)
        ckpt = safeckpt.load_checkpoint(
            root, model=model2, optimizer=opt2, scheduler=sched2, extra={"data": position}
        )
        assert torch.equal(torch.rand(3), after_save_draws), "RNG of this rank not restored"
        assert position.offset == 10 + rank and position.order == (10 + rank, 11 + rank), (
            position.state_dict()
        )
        assert (ckpt.step, ckpt.config, ckpt.vocab) == (3, {"lr": 0.01, "dims": [5, 7, 3]}, VOCAB)
        equal_states(full_state(model2, opt2), reference)
        assert train(model2, opt2, sched2, range(3, 6)) == reference_losses
    dist.barrier()

    if rank < 2:
        fsdp2, opt2, sched2 = build(DeviceMesh.from_group(g2, "cpu"), seed=5)
        before = local_params(fsdp2)
        with check("hsdp_into_fsdp_world_2_refuses_rng_and_extra"):
            expect(
                safeckpt.CheckpointMismatchError,
                lambda: safeckpt.load_checkpoint(root, model=fsdp2, optimizer=opt2, scheduler=sched2),
                "per-rank RNG state cannot be restored",
                "saved on 4 rank(s)",
                "loaded on 2",
                "restore_rng=False",
            )
            expect(
                safeckpt.CheckpointMismatchError,
                lambda: safeckpt.load_checkpoint(
                    root, model=fsdp2, optimizer=opt2, restore_rng=False, extra={"data": Position(-1)}
                ),
                "per-rank extra state cannot be restored",
                "saved on 4 rank(s)",
                "loaded on 2",
                "load without extra=",
            )
            assert all(torch.equal(a, b) for a, b in zip(before, local_params(fsdp2), strict=True))
        with check("hsdp_into_fsdp_world_2_equals_reference"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ckpt = safeckpt.load_checkpoint(
                    root, model=fsdp2, optimizer=opt2, scheduler=sched2, restore_rng=False
                )
            assert any(issubclass(w.category, safeckpt.MissingRNGStateWarning) for w in caught)
            assert ckpt.rng_state is None and ckpt.extra == {}, (ckpt.rng_state, ckpt.extra)
            equal_states(full_state(fsdp2, opt2), reference)
            assert sched2.state_dict()["last_epoch"] == 3  # type: ignore[attr-defined]
    dist.barrier()
    tensor_parallel(rank, tmp)


def tensor_parallel(rank: int, tmp: Path) -> None:
    """TP over ``tp`` + FSDP over ``dp``: save on 4 ranks, resume on the same layout."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    root = tmp / "tp_fsdp"
    model, opt, sched = tp_fsdp(mesh)
    train(model, opt, sched, range(2))
    torch.manual_seed(2000 + rank)
    with check("tp_fsdp_save_world_4"):
        safeckpt.save_checkpoint(
            model, opt, None, None, 2, directory=root, scheduler=sched, extra={"data": Position(rank)}
        )
    after_save_draws, reference, reference_losses = continue_after_save(model, opt, sched, range(2, 4), "tp_fsdp_reference.safetensors")
    with check("tp_fsdp_resume_world_4_bit_identical"):
        model2, opt2, sched2 = tp_fsdp(mesh, seed=3)
        position = Position(-1)
        safeckpt.load_checkpoint(
            root, model=model2, optimizer=opt2, scheduler=sched2, extra={"data": position}
        )
        assert torch.equal(torch.rand(3), after_save_draws), "RNG of this rank not restored"
        assert position.offset == rank, position.state_dict()
        equal_states(full_state(model2, opt2), reference)
        assert train(model2, opt2, sched2, range(2, 4)) == reference_losses
    dist.barrier()


def entry() -> None:
    scenario, rank, world, init, tmp = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        Path(sys.argv[5]),
    )
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        {"mesh2d": mesh2d}[scenario](rank, world, tmp)
        record("finished", "ok")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    entry()

"""One rank of a multi-process scenario (started by ``dist_harness``): ``main``, ``sigkill``, ``remote``,
``agreement``.

Usage: ``python dist_workers.py SCENARIO RANK WORLD INIT_FILE TMP``. Every check records
``"ok"`` or the failure in ``TMP/out/rank-RANK.json``; the tests assert on those records.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import safeckpt
from safeckpt import distributed as sd

RESULTS: dict[str, str] = {}
RANK = int(sys.argv[2])
OUT = Path(sys.argv[5]) / "out"


def record(name: str, value: str) -> None:
    """Write this rank's results so far; atomically (a rank may be killed at any moment, by the
    test or by a scenario, and the test must still read what was recorded before)."""
    RESULTS[name] = value
    tmp = OUT / f".rank-{RANK}.{threading.get_ident()}.json"
    tmp.write_text(json.dumps(RESULTS, indent=1))
    os.replace(tmp, OUT / f"rank-{RANK}.json")


@contextlib.contextmanager
def check(name: str) -> Iterator[None]:
    """Record ``name`` as ok, or as the failure (the scenario goes on with the next check)."""
    try:
        yield
    except Exception as exc:  # recorded for the test to show
        record(name, f"FAIL {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
    else:
        record(name, "ok")


class Position:
    """A data position object with state_dict/load_state_dict, different on every rank."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.order = (offset, offset + 1)

    def state_dict(self) -> dict[str, object]:
        return {"offset": self.offset, "order": self.order}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.offset = state["offset"]  # type: ignore[assignment]
        self.order = state["order"]  # type: ignore[assignment]


def build(mesh: DeviceMesh | None, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """An MLP whose layers shard unevenly on 3 and 4 ranks (7 rows, 3 rows), AdamW, StepLR."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    if mesh is not None:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    return model, optimizer, scheduler


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: range) -> list[float]:
    losses = []
    for step in steps:
        batch = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + step))
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer state as full tensors (gathered from every rank), flat names."""
    options = StateDictOptions(full_state_dict=True)
    flat = {f"model.{k}": v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            flat[f"optim.{fqn}.{key}"] = torch.as_tensor(value).detach().clone()
    for index, group in enumerate(osd["param_groups"]):
        flat[f"lr.{index}"] = torch.tensor(group["lr"], dtype=torch.float64)
    return flat


def equal_states(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(reference), sorted(set(state) ^ set(reference))
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def same_as_reference(state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    equal_states(state, load_file(str(OUT / "reference.safetensors")))


def continue_after_save(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, steps: range, reference_file: str,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    """What the uninterrupted run does right after a save, for a resume to match: this rank's
    next random draws, the full state (a collective; rank 0 also writes it to ``reference_file``
    for the plain-process tests) and the losses of ``steps``."""
    draws = torch.rand(3)
    reference = full_state(model, opt)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file(reference, str(OUT / reference_file))
    losses = train(model, opt, sched, steps)
    dist.barrier(group)
    return draws, reference, losses


def local_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.to_local().clone() if hasattr(p, "to_local") else p.detach().clone() for p in model.parameters()]


def expect(error: type[BaseException], run: Callable[[], object], *fragments: str) -> BaseException:
    """``run()`` raises ``error`` (never a bare BaseException) whose message holds ``fragments``."""
    try:
        run()
    except error as exc:
        for fragment in fragments:
            assert fragment in str(exc), (fragment, str(exc))
        return exc
    except BaseException as exc:
        raise AssertionError(f"expected {error.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"expected {error.__name__}, nothing was raised")


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def main(rank: int, world: int, tmp: Path) -> None:
    g2 = dist.new_group([0, 1])
    g3 = dist.new_group([0, 1, 2])
    root = tmp / "run"
    cfg, vocab = {"lr": 0.01, "dims": (5, 7, 3)}, ["<pad>", "a"]

    if rank < 2:
        mesh2 = DeviceMesh.from_group(g2, "cpu")
        model, opt, sched = build(mesh2)
        train(model, opt, sched, range(3))
        torch.manual_seed(1000 + rank)  # a different RNG stream on every rank
        with check("save_world_2"):
            path = safeckpt.save_checkpoint(
                model, opt, cfg, vocab, 3, directory=root, scheduler=sched, extra={"data": Position(10 + rank)}
            )
            assert path == root / "step-00000003" and (path / "manifest.json").is_file()
        after_save_draws, _, reference_losses = continue_after_save(
            model, opt, sched, range(3, 6), "reference.safetensors", g2
        )
        with check("resume_same_world_bit_identical"):
            model2, opt2, sched2 = build(mesh2, seed=7)
            position = Position(-1)
            ckpt = safeckpt.load_checkpoint(root, model=model2, optimizer=opt2, scheduler=sched2, extra={"data": position})
            assert torch.equal(torch.rand(3), after_save_draws), "RNG of this rank not restored"
            assert position.offset == 10 + rank and position.order == (10 + rank, 11 + rank), position.state_dict()
            assert (ckpt.step, ckpt.config, ckpt.vocab) == (3, {"lr": 0.01, "dims": [5, 7, 3]}, vocab)
            assert train(model2, opt2, sched2, range(3, 6)) == reference_losses
    dist.barrier()

    for size, group in ((3, g3), (4, None)):
        if rank < size:
            mesh = DeviceMesh.from_group(group or dist.group.WORLD, "cpu")  # type: ignore[arg-type]
            model, opt, sched = build(mesh, seed=5)
            before = local_params(model)
            with check(f"load_world_{size}_refuses_rng"):
                expect(
                    safeckpt.CheckpointMismatchError,
                    lambda: safeckpt.load_checkpoint(root, model=model, optimizer=opt, scheduler=sched),
                    "saved on 2 rank(s)", f"loaded on {size}", "restore_rng=False",
                )
                assert all(torch.equal(a, b) for a, b in zip(before, local_params(model), strict=True))
            with check(f"load_world_{size}_equals_reference"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    safeckpt.load_checkpoint(root, model=model, optimizer=opt, scheduler=sched, restore_rng=False)
                assert any(issubclass(w.category, safeckpt.MissingRNGStateWarning) for w in caught)
                same_as_reference(full_state(model, opt))
                assert sched.state_dict()["last_epoch"] == 3  # type: ignore[attr-defined]
        dist.barrier()

    single = tmp / "single"
    if rank == 0:
        with check("consolidate"):
            sd.consolidate(root / "step-00000003", single)
            assert safeckpt.verify_checkpoint(single / "step-00000003").step == 3
    dist.barrier()
    with check("single_process_checkpoint_into_fsdp2_world_4"):
        mesh4 = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # type: ignore[arg-type]
        model, opt, sched = build(mesh4, seed=9)
        safeckpt.load_checkpoint(single, model=model, optimizer=opt, scheduler=sched, restore_rng=False)
        same_as_reference(full_state(model, opt))
    dist.barrier()
    if rank < 2:
        failures(rank, tmp, root, g2)
    dist.barrier()


def failures(rank: int, tmp: Path, root: Path, g2: dist.ProcessGroup) -> None:
    mesh2 = DeviceMesh.from_group(g2, "cpu")
    bad = tmp / "bad"
    target = bad / "step-00000003"
    for name, damage, file in (
        ("flipped_byte", lambda: flip_byte(target / "shard-00001.safetensors"), "shard-00001.safetensors"),
        ("truncated_shard", lambda: os.truncate(target / "shard-00000.safetensors", 100), "shard-00000.safetensors"),
        ("damaged_sharding_json", lambda: flip_byte(target / "sharding.json", 40), "sharding.json"),
    ):
        if rank == 0:
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(root, bad)
            damage()
        dist.barrier(g2)
        with check(f"corrupt_{name}_every_rank_raises_before_restoring"):
            model, opt, sched = build(mesh2, seed=3)
            before = local_params(model)
            expect(
                safeckpt.CheckpointCorruptedError,
                lambda: safeckpt.load_checkpoint(bad, model=model, optimizer=opt),
                file, "rank",
            )
            assert all(torch.equal(a, b) for a, b in zip(before, local_params(model), strict=True))
        dist.barrier(g2)

    model, opt, sched = build(mesh2)
    train(model, opt, sched, range(1))
    with check("failed_rank_leaves_nothing"):
        from safeckpt.storage import posix_write

        real = posix_write.write_file

        def full_disk(*args: object, **kwargs: object) -> object:
            if rank == 1:
                raise OSError(errno.ENOSPC, "No space left on device", "shard")
            return real(*args, **kwargs)  # type: ignore[arg-type]

        posix_write.write_file = full_disk  # type: ignore[assignment]
        try:
            expect(
                safeckpt.CheckpointWriteError,
                lambda: safeckpt.save_checkpoint(model, opt, None, None, 7, directory=root),
                "rank 1", "disk is full",
            )
        finally:
            posix_write.write_file = real
        dist.barrier(g2)
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".safeckpt")) == ["step-00000003"]

    with check("invalid_options_refused_on_every_rank_before_writing"):
        # The sharded save plans as the single-process one does: metadata and extra are checked
        # on every rank before DCP writes a byte (metadata used to fail in the coordinator's finish()).
        expect(
            safeckpt.UnsupportedValueError,
            lambda: safeckpt.save_checkpoint(model, opt, None, None, 8, directory=root, metadata={"bad": object()}),
            "metadata['bad']",
        )
        loader = torch.utils.data.DataLoader(list(range(4)))
        expect(
            safeckpt.CheckpointUsageError,
            lambda: safeckpt.save_checkpoint(model, opt, None, None, 8, directory=root, extra={"data": loader}),
            "extra['data']", "StatefulDataLoader",
        )
        dist.barrier(g2)
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".safeckpt")) == ["step-00000003"]

    with check("async_manager_commits_and_prunes"):
        manager = safeckpt.CheckpointManager(tmp / "async", keep_last=2, async_save=True)
        for step in (1, 2, 3):
            train(model, opt, sched, range(step, step + 1))
            manager.save(step, model=model, optimizer=opt, scheduler=sched)
        manager.wait()
        dist.barrier(g2)
        assert manager.steps() == [2, 3], manager.steps()
        restored, ropt, rsched = build(mesh2, seed=4)
        ckpt = manager.restore(model=restored, optimizer=ropt, scheduler=rsched)
        assert ckpt is not None and ckpt.step == 3
    with check("async_saves_keep_the_state_of_their_call"):
        # Training goes on while each save writes; the second and third saves stage into the CPU
        # copy the first one made (dcp_calls.reusing_stager), which must hold their own step's state.
        saved = {}
        for step in (10, 11, 12):
            train(model, opt, sched, range(step, step + 1))
            saved[step] = full_state(model, opt)
            pending = safeckpt.save_checkpoint(model, opt, None, None, step, directory=tmp / "async-state", async_=True)
            train(model, opt, sched, range(step + 100, step + 101))  # changes every parameter in place
        pending.wait()
        for step in (10, 11, 12):
            restored, ropt, _ = build(mesh2, seed=5)
            safeckpt.load_checkpoint(tmp / "async-state" / f"step-{step:08d}", model=restored, optimizer=ropt, restore_rng=False)
            got = full_state(restored, ropt)
            for key, value in saved[step].items():
                assert torch.equal(got[key], value), (step, key)
    with check("async_error_raised_by_next_call"):
        from safeckpt.distributed import writer as writer_module

        real_finish = writer_module.Writer.finish

        def failing_finish(self: object, *args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, "Input/output error", "manifest.json")

        writer_module.Writer.finish = failing_finish  # type: ignore[assignment,method-assign]
        try:
            manager.save(4, model=model, optimizer=opt)
            with contextlib.suppress(BaseException):
                manager._pending._thread.join()  # type: ignore[union-attr]
        finally:
            writer_module.Writer.finish = real_finish  # type: ignore[method-assign]
        expect(safeckpt.CheckpointWriteError, lambda: manager.save(5, model=model, optimizer=opt), "rank 0", "Input/output error", "manifest.json")
        dist.barrier(g2)
        assert 4 not in manager.steps()

    with check("ddp_roundtrip_written_once"):
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3), process_group=g2)
        dopt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        ddp(torch.randn(2, 4)).sum().backward()
        dopt.step()
        path = safeckpt.save_checkpoint(ddp, dopt, None, None, 1, directory=tmp / "ddp")
        sharding = json.loads((path / "sharding.json").read_text())
        for key in ("model.weight", "model.bias"):
            assert len(sharding["tensors"][key]["chunks"]) == 1, sharding["tensors"][key]
        torch.manual_seed(1)
        fresh = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3), process_group=g2)
        fopt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        safeckpt.load_checkpoint(path, model=fresh, optimizer=fopt)
        assert torch.equal(fresh.module.weight, ddp.module.weight)
        assert torch.equal(fopt.state_dict()["state"][0]["momentum_buffer"], dopt.state_dict()["state"][0]["momentum_buffer"])

    with check("dtensor_only_roundtrip"):

        def tensor_parallel(seed: int) -> torch.nn.Module:
            torch.manual_seed(seed)
            module = torch.nn.Linear(6, 4)
            for name, param in list(module.named_parameters()):
                setattr(module, name, torch.nn.Parameter(distribute_tensor(param.detach(), mesh2, [Shard(0)])))
            return module

        original, copy = tensor_parallel(0), tensor_parallel(1)
        path = safeckpt.save_checkpoint(original, None, None, None, 1, directory=tmp / "tp", rng=False)
        safeckpt.load_checkpoint(path, model=copy, restore_rng=False)
        assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(original.parameters(), copy.parameters(), strict=True))

    with check("no_unpickling_of_file_data"):
        trapped_load(lambda: safeckpt.load_checkpoint(root, model=build(mesh2, seed=2)[0], restore_rng=False))

    with check("dcp_direct_use"):
        direct(tmp, model, opt, g2)


def trapped_load(load: Callable[[], object]) -> None:
    """Run ``load`` with every unpickler failing, except DCP's in-memory exchange of plans
    between ranks (``distributed_c10d``), which the no-pickle claim does not cover."""
    import pickle

    import torch.serialization

    def allowed() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.endswith("distributed_c10d.py"):
                return True
            frame = frame.f_back  # type: ignore[assignment]
        return False

    real_loads, real_unpickler, real_torch_load = pickle.loads, pickle.Unpickler, torch.load

    def loads(*args: object, **kwargs: object) -> object:
        if not allowed():
            raise AssertionError("pickle.loads called on the load path")
        return real_loads(*args, **kwargs)  # type: ignore[arg-type]

    class Unpickler(real_unpickler):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            if not allowed():
                raise AssertionError("pickle.Unpickler used on the load path")
            super().__init__(*args, **kwargs)

    def torch_load(*args: object, **kwargs: object) -> object:
        raise AssertionError("torch.load called on the load path")

    pickle.loads, pickle.Unpickler = loads, Unpickler  # type: ignore[assignment,misc]
    torch.load = torch.serialization.load = torch_load  # type: ignore[assignment]
    try:
        load()
    finally:
        pickle.loads, pickle.Unpickler = real_loads, real_unpickler  # type: ignore[misc]
        torch.load = torch.serialization.load = real_torch_load


def direct(tmp: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, group: dist.ProcessGroup) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "meta": {"epoch": 2, "betas": (0.9, 0.99), 7: "seven"}}
    dcp.save(state, storage_writer=sd.Writer(tmp / "dcp", step=1), planner=sd.SavePlanner(), process_group=group)
    assert (tmp / "dcp" / "step-00000001" / "manifest.json").is_file()
    target = {"model": get_state_dict(model, opt)[0], "meta": {"epoch": None, "betas": None, 7: None}}
    dcp.load(target, storage_reader=sd.Reader(tmp / "dcp"), planner=sd.LoadPlanner(allow_partial_load=True), process_group=group)
    assert target["meta"] == {"epoch": 2, "betas": (0.9, 0.99), 7: "seven"}, target["meta"]
    for planner in (None, dcp.DefaultLoadPlanner()):
        try:
            dcp.load(target, storage_reader=sd.Reader(tmp / "dcp"), planner=planner, process_group=group)
        except CheckpointException as exc:
            assert "safeckpt.distributed.LoadPlanner()" in str(exc), str(exc)
        else:
            raise AssertionError("the default load planner was accepted")
    try:
        dcp.save(state, storage_writer=sd.Writer(tmp / "dcp", step=2), planner=sd.SavePlanner(), use_collectives=False, process_group=group)
    except sd.UsageError as exc:
        assert "use_collectives=True" in str(exc)
    else:
        raise AssertionError("use_collectives=False was accepted")
    try:
        dcp.save(state, storage_writer=sd.Writer(tmp / "dcp", step=3), process_group=group)
    except CheckpointException as exc:
        assert "safeckpt.distributed.SavePlanner()" in str(exc), str(exc)
    else:
        raise AssertionError("the default save planner was accepted")
    assert sorted(p.name for p in (tmp / "dcp").iterdir() if p.name.startswith("step-")) == ["step-00000001"]


def sigkill(rank: int, world: int, tmp: Path) -> None:
    """Step 1 commits; during step 2 rank ``KILL_RANK`` (default 0: the coordinator, which owns
    the temporary folder) kills itself in the middle of writing its shard. The other rank
    records how its save ended (``step_2_error``) if it ends at all."""
    victim = int(os.environ.get("KILL_RANK", "0"))
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # type: ignore[arg-type]
    model, opt, sched = build(mesh)
    train(model, opt, sched, range(2))
    root = tmp / "run"
    safeckpt.save_checkpoint(model, opt, None, None, 1, directory=root)
    record("committed_step_1", "ok")
    from safeckpt.storage import posix_write

    real = posix_write.write_file
    dying = threading.Lock()  # the shard files are written on several threads: one dies, the rest wait

    def die_midway(dir_fd: int, name: str, parts: object, size_hint: int = 0) -> object:
        if rank == victim and name.endswith(".safetensors"):
            dying.acquire()
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd)
            os.write(fd, b"partial shard")
            os.close(fd)
            record("killed_while_writing", "ok")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(dir_fd, name, parts, size_hint)  # type: ignore[arg-type]

    posix_write.write_file = die_midway  # type: ignore[assignment]
    try:
        safeckpt.save_checkpoint(model, opt, None, None, 2, directory=root)
    except BaseException as exc:  # recorded for the test: which error a surviving rank sees
        record("step_2_error", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
        raise
    record("step_2_returned", "should not happen")


def remote(rank: int, world: int, tmp: Path) -> None:
    """FSDP2 on 2 ranks against the S3 server whose storage options are in ``S3_OPTIONS`` (JSON),
    under the URL ``S3_ROOT``; and ``save_checkpoint(path=...)`` of a sharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options, url = json.loads(os.environ["S3_OPTIONS"]), os.environ["S3_ROOT"]
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # type: ignore[arg-type]
    model, opt, sched = build(mesh)
    train(model, opt, sched, range(3))
    torch.manual_seed(1000 + rank)
    manager = safeckpt.CheckpointManager(f"{url}/run", keep_last=2, storage_options=options)
    with check("s3_manager_save"):
        path = manager.save(3, model=model, optimizer=opt, scheduler=sched, vocab=["<pad>", "a"], extra={"data": Position(10 + rank)})
        assert str(path) == f"{url}/run/step-00000003", path
    after_save_draws, _, reference_losses = continue_after_save(model, opt, sched, range(3, 5), "reference.safetensors")
    with check("s3_resume_bit_identical"):
        model2, opt2, sched2 = build(mesh, seed=7)
        position = Position(-1)
        ckpt = manager.restore(model=model2, optimizer=opt2, scheduler=sched2, extra={"data": position})
        assert ckpt is not None and ckpt.step == 3 and ckpt.vocab == ["<pad>", "a"]
        assert torch.equal(torch.rand(3), after_save_draws), "RNG of this rank not restored"
        assert position.offset == 10 + rank, position.state_dict()
        assert train(model2, opt2, sched2, range(3, 5)) == reference_losses
    with check("s3_dcp_direct"):
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "meta": {"epoch": 2, 7: "seven"}}
        writer = sd.Writer(f"{url}/dcp", step=1, storage_options=options)
        dcp.save(state, storage_writer=writer, planner=sd.SavePlanner())
        assert str(writer.final) == f"{url}/dcp/step-00000001"
        target = {"model": get_state_dict(model, opt)[0], "meta": {"epoch": None, 7: None}}
        reader = sd.Reader(f"{url}/dcp", storage_options=options)
        dcp.load(target, storage_reader=reader, planner=sd.LoadPlanner(allow_partial_load=True))
        assert target["meta"] == {"epoch": 2, 7: "seven"}, target["meta"]
    with check("s3_corrupted_object_every_rank_raises"):
        bad = safeckpt.save_checkpoint(model, opt, None, None, 5, directory=f"{url}/bad", storage_options=options)
        if rank == 0:
            from s3fs import S3FileSystem

            fs = S3FileSystem(**options)
            (shard,) = [key for key in fs.find(str(bad)) if key.endswith("shard-00001.safetensors")]
            data = bytearray(fs.cat_file(shard))
            data[-5] ^= 0x40
            fs.pipe_file(shard, bytes(data))
        dist.barrier()
        model3, opt3, _ = build(mesh, seed=3)
        before = local_params(model3)
        expect(
            safeckpt.CheckpointCorruptedError,
            lambda: safeckpt.load_checkpoint(bad, model=model3, optimizer=opt3, storage_options=options),
            "shard-00001.safetensors", "rank",
        )
        assert all(torch.equal(a, b) for a, b in zip(before, local_params(model3), strict=True))
    for where, place in (("local", str(tmp / "exports" / "final")), ("s3", f"{url}/exports/final")):
        with check(f"path_{where}"):
            opts = options if where == "s3" else None
            path = safeckpt.save_checkpoint(model, opt, None, None, 5, path=place, storage_options=opts)
            assert str(path) == place, path
            expect(
                safeckpt.CheckpointExistsError,
                lambda: safeckpt.save_checkpoint(model, opt, None, None, 6, path=place, storage_options=opts),
                "already exists",
            )
            model4, opt4, _ = build(mesh, seed=4)
            ckpt = safeckpt.load_checkpoint(place, model=model4, optimizer=opt4, storage_options=opts)
            assert ckpt.step == 5
            assert all(torch.equal(a, b) for a, b in zip(local_params(model), local_params(model4), strict=True))
    dist.barrier()
    if rank == 0:
        with check("path_local_leaves_only_the_checkpoint"):
            assert sorted(p.name for p in (tmp / "exports").iterdir() if not p.name.startswith(".safeckpt")) == ["final"]


def agreement(rank: int, world: int, tmp: Path) -> None:
    """Every rank agrees (2 ranks, FSDP2 unless said): what a load restores or refuses, what a
    save commits, and what the manager pruned, whatever differs between the ranks."""
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # type: ignore[arg-type]
    root = tmp / "agree"
    model, opt, sched = build(mesh)
    train(model, opt, sched, range(2))
    path = safeckpt.save_checkpoint(model, opt, None, None, 2, directory=root, extra={"data": Position(rank)})
    reference = full_state(model, opt)

    with check("optimizer_state_restored_when_grads_exist"):
        fresh, fopt, _ = build(mesh, seed=3)
        fresh(torch.randn(2, 5)).sum().backward()  # a sanity step before resuming: grads, no state
        safeckpt.load_checkpoint(path, model=fresh, optimizer=fopt, restore_rng=False)
        equal_states(full_state(fresh, fopt), reference)
        assert all(p.grad is not None for p in fresh.parameters()), "the caller's gradients were dropped"

    with check("missing_extra_refused_on_every_rank_before_restoring"):
        fresh, fopt, _ = build(mesh, seed=3)
        before = local_params(fresh)
        wanted = {"data": Position(-1), **({"sampler": Position(-1)} if rank == 1 else {})}
        expect(
            safeckpt.CheckpointMismatchError,
            lambda: safeckpt.load_checkpoint(path, model=fresh, optimizer=fopt, extra=wanted),
            "rank 1", "no extra state 'sampler'",
        )
        assert all(torch.equal(a, b) for a, b in zip(before, local_params(fresh), strict=True))

    with check("unlike_optimizer_refused_before_restoring"):
        for options, fragment in (
            ({"amsgrad": True}, "max_exp_avg_sq"),
            ({"split": True}, "parameter group"),
        ):
            fresh, _, _ = build(mesh, seed=3)
            params = list(fresh.parameters())
            groups = [{"params": params[:2]}, {"params": params[2:]}] if options.pop("split", False) else params
            fopt = torch.optim.AdamW(groups, lr=1e-2, **options)  # type: ignore[arg-type]
            before = local_params(fresh)
            expect(safeckpt.CheckpointMismatchError, lambda: safeckpt.load_checkpoint(path, model=fresh, optimizer=fopt, restore_rng=False), fragment)
            assert all(torch.equal(a, b) for a, b in zip(before, local_params(fresh), strict=True))
            assert all(g.get("amsgrad") == options.get("amsgrad", False) for g in fopt.param_groups)

    with check("strict_false_loads_what_matches"):

        class Wider(torch.nn.Sequential):
            pass

        torch.manual_seed(4)
        wider = Wider(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 3))
        for layer in wider:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(wider, mesh=mesh)
        expect(safeckpt.CheckpointMismatchError, lambda: safeckpt.load_checkpoint(path, model=wider, restore_rng=False), "strict=False")
        ckpt = safeckpt.load_checkpoint(path, model=wider, strict=False, restore_rng=False)
        assert ckpt.missing_keys == ["3.weight", "3.bias"] and ckpt.unexpected_keys == [], ckpt.missing_keys
        got = get_model_state_dict(wider, options=StateDictOptions(full_state_dict=True))
        assert all(torch.equal(got[k], reference[f"model.{k}"]) for k in ("0.weight", "2.bias"))
        half, _, _ = build(None, seed=4)
        half = half.to(torch.bfloat16)
        for layer in half:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(half, mesh=mesh)
        safeckpt.load_checkpoint(path, model=half, strict=False, restore_rng=False)
        got = get_model_state_dict(half, options=StateDictOptions(full_state_dict=True))
        assert torch.equal(got["0.weight"], reference["model.0.weight"].to(torch.bfloat16))
        if rank == 0:
            sd.consolidate(path, tmp / "single")
        dist.barrier()
        ckpt = safeckpt.load_checkpoint(tmp / "single", model=wider, strict=False, restore_rng=False)
        assert ckpt.missing_keys == ["3.weight", "3.bias"], ckpt.missing_keys

    with check("one_rank_bad_extra_raises_on_every_rank"):
        bad = {"data": {"seen": {1, 2} if rank == 1 else [1, 2]}}
        expect(
            safeckpt.UnsupportedValueError,
            lambda: safeckpt.save_checkpoint(model, opt, None, None, 3, directory=root, extra=bad),
            "rank 1", "extra['data']['seen']",
        )

    with check("different_arguments_refused_on_every_rank"):
        expect(
            safeckpt.CheckpointUsageError,
            lambda: safeckpt.save_checkpoint(model, opt, None, None, 4 + rank, directory=root),
            "rank 1 passed step=5", "step=4",
        )
        config = {"lr": 1} if rank == 1 else None
        expect(
            safeckpt.CheckpointUsageError,
            lambda: safeckpt.save_checkpoint(model, opt, config, None, 4, directory=root),
            "rank 1 passed config=",
        )
        dist.barrier()
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000002"]

    with check("manager_pruned_on_every_rank_when_save_returns"):
        import time

        manager = safeckpt.CheckpointManager(tmp / "kept", keep_last=2)
        if rank == 0:  # a slow file system: the coordinator prunes after the others returned
            prune = manager._apply_retention
            manager._apply_retention = lambda step: (time.sleep(1.0), prune(step))  # type: ignore[method-assign]
        for step in (1, 2, 3):
            manager.save(step, model=model, optimizer=opt)
            assert manager.steps() == [max(1, step - 1), step][-min(step, 2):], manager.steps()

    with check("per_rank_state_of_one_rank_only_loads"):
        mine = {"data": Position(7)} if rank == 0 else None  # only rank 0 has a data position
        saved = safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp / "one-extra", rng=False, extra=mine)
        fresh, _, _ = build(mesh, seed=3)
        position = Position(-1)
        safeckpt.load_checkpoint(saved, model=fresh, restore_rng=False, extra={"data": position} if rank == 0 else None)
        assert all(torch.equal(a, b) for a, b in zip(local_params(model), local_params(fresh), strict=True))
        assert position.offset == (7 if rank == 0 else -1)

    with check("parameter_without_optimizer_state_stays_without"):
        unused, uopt, _ = build(mesh, seed=5)
        unused[0](torch.randn(3, 5)).sum().backward()  # the last layer takes no part: no state
        uopt.step()
        uopt.zero_grad()
        saved = safeckpt.save_checkpoint(unused, uopt, None, None, 1, directory=tmp / "unused", rng=False)
        fresh, fopt, _ = build(mesh, seed=3)
        safeckpt.load_checkpoint(saved, model=fresh, optimizer=fopt, restore_rng=False)
        equal_states(full_state(fresh, fopt), full_state(unused, uopt))
        assert len(fopt.state) == len(uopt.state) == 2, (len(fopt.state), len(uopt.state))

    with check("any_error_of_one_rank_raises_on_every_rank"):

        class Unstarted(Position):
            def state_dict(self) -> dict[str, object]:
                if rank == 1:
                    raise RuntimeError("iterator not started on this rank")
                return super().state_dict()

        err = expect(
            safeckpt.CheckpointError,
            lambda: safeckpt.save_checkpoint(model, opt, None, None, 3, directory=root, extra={"data": Unstarted(0)}),
            "rank 1", "RuntimeError: iterator not started",
        )
        assert isinstance(err.__cause__, RuntimeError) == (rank == 1), repr(err.__cause__)

    with check("every_file_verified_once_per_load"):
        from safeckpt.format.manifest import FileEntry
        from safeckpt.storage.local import LocalFolder

        opened: list[str] = []
        original = LocalFolder.open_verified

        def counted(self: LocalFolder, entries: list[FileEntry], *, verify: bool = True) -> object:
            opened.extend(entry.name for entry in entries)
            return original(self, entries, verify=verify)

        LocalFolder.open_verified = counted  # type: ignore[assignment,method-assign]
        try:
            fresh, fopt, _ = build(mesh, seed=3)
            safeckpt.load_checkpoint(path, model=fresh, optimizer=fopt, extra={"data": Position(-1)})
        finally:
            LocalFolder.open_verified = original  # type: ignore[method-assign]
        assert sorted(opened) == sorted(set(opened)), sorted(opened)
        assert f"shard-{rank:05d}.safetensors" in opened, opened
        equal_states(full_state(fresh, fopt), reference)

    with check("a_model_neither_ddp_nor_sharded_saved_on_another_rank_warns"):
        plain = torch.nn.Linear(3, 2)  # ddp.module, say: a single-process save of this rank alone
        shared = safeckpt.CheckpointManager(tmp / "plain-shared")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            safeckpt.save_checkpoint(plain, None, None, None, 1, directory=tmp / f"plain-{rank}", rng=False)
            if rank == 0:
                shared.save(1, model=plain, rng=False)
            dist.barrier()
            if rank == 1:  # the race the warning is about: rank 0 saved this step already
                expect(safeckpt.CheckpointExistsError, lambda: shared.save(1, model=plain, rng=False), "already exists")
        ours = [w for w in caught if "neither DDP nor sharded" in str(w.message)]
        assert len(ours) == (2 if rank == 1 else 0), [str(w.message) for w in caught]
        assert all("rank 1 of 2" in str(w.message) and w.filename == __file__ for w in ours), ours

    with check("ddp_saves_the_buffers_of_rank_0"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        for step in range(2):  # each rank's own data: running statistics drift apart
            ddp(torch.randn(5, 4, generator=torch.Generator().manual_seed(step)) + 3 * rank).sum().backward()
        mine = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("1.running")}
        saved = safeckpt.save_checkpoint(ddp, None, None, None, 1, directory=tmp / "ddp-bn", rng=False)
        stats = [None] * world
        dist.all_gather_object(stats, mine)
        assert not torch.equal(stats[0]["1.running_mean"], stats[1]["1.running_mean"])  # type: ignore[index]
        ckpt = safeckpt.load_checkpoint(saved, restore_rng=False)  # this process alone: full tensors
        for key, value in stats[0].items():  # type: ignore[union-attr]
            assert torch.equal(ckpt.model_state[key], value), key
    dist.barrier()


def entry() -> None:
    scenario, rank, world, init, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        {"main": main, "sigkill": sigkill, "remote": remote, "agreement": agreement}[scenario](rank, world, tmp)
        record("finished", "ok")
    finally:
        if scenario in ("main", "agreement"):
            dist.destroy_process_group()


if __name__ == "__main__":
    entry()

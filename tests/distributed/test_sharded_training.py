"""Sharded training through the public API, in real multi-process jobs (gloo on CPU).

One job of 4 processes (``dist_workers.main``) saves an FSDP2 model + AdamW + StepLR on 2 ranks
and checks, on the ranks involved: resuming on 2 ranks with bit-identical losses and per-rank
RNG/extra; loading on 3 and 4 ranks (uneven and empty shards) equal to the saved state; a
single-process checkpoint (made by ``consolidate``) loading into FSDP2 on 4 ranks; damaged
files; a rank failing mid-save; async saves through the manager; DDP and DTensor-only models;
a load with unpicklers booby-trapped; direct ``dcp.save``/``dcp.load``. Each test below asserts
on one of those checks, on every rank that ran it. A second job SIGKILLs a rank mid-save.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import dist_harness
import pytest
import torch
from safetensors.torch import load_file

import safeckpt

Results = dist_harness.Results


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("sharded")
    return tmp, dist_harness.run("main", 4, tmp)


@pytest.mark.parametrize(
    ("check", "ranks"),
    [
        ("save_world_2", range(2)),
        ("resume_same_world_bit_identical", range(2)),
        ("load_world_3_refuses_rng", range(3)),
        ("load_world_3_equals_reference", range(3)),
        ("load_world_4_refuses_rng", range(4)),
        ("load_world_4_equals_reference", range(4)),
        ("consolidate", range(1)),
        ("single_process_checkpoint_into_fsdp2_world_4", range(4)),
        ("corrupt_flipped_byte_every_rank_raises_before_restoring", range(2)),
        ("corrupt_truncated_shard_every_rank_raises_before_restoring", range(2)),
        ("corrupt_damaged_sharding_json_every_rank_raises_before_restoring", range(2)),
        ("failed_rank_leaves_nothing", range(2)),
        ("invalid_options_refused_on_every_rank_before_writing", range(2)),
        ("async_manager_commits_and_prunes", range(2)),
        ("async_saves_keep_the_state_of_their_call", range(2)),
        ("async_error_raised_by_next_call", range(2)),
        ("ddp_roundtrip_written_once", range(2)),
        ("dtensor_only_roundtrip", range(2)),
        ("no_unpickling_of_file_data", range(2)),
        ("dcp_direct_use", range(2)),
        ("finished", range(4)),
    ],
)
def test_multi_process_check(job: tuple[Path, Results], check: str, ranks: range) -> None:
    dist_harness.assert_ok(*job, check, ranks)


def test_plain_process_loads_sharded_checkpoint_into_ordinary_module(job: tuple[Path, Results]) -> None:
    """World size 1: no process group, an ordinary nn.Module and AdamW (inference, export)."""
    tmp, _ = job
    reference = load_file(str(tmp / "out" / "reference.safetensors"))
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="saved on 2 rank"):
        safeckpt.load_checkpoint(tmp / "run", model=model, optimizer=optimizer)
    with pytest.warns(safeckpt.MissingRNGStateWarning):
        ckpt = safeckpt.load_checkpoint(tmp / "run", model=model, optimizer=optimizer, restore_rng=False)
    assert ckpt.step == 3 and ckpt.vocab == ["<pad>", "a"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[f"model.{name}"]), name
    state = optimizer.state_dict()
    for index, (name, _) in enumerate(model.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][index][key], reference[f"optim.{name}.{key}"]), (name, key)
    assert state["param_groups"][0]["lr"] == reference["lr.0"].item()
    assert state["param_groups"][0]["betas"] == (0.9, 0.999)


def test_plain_process_load_without_model_returns_full_tensors(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    reference = load_file(str(tmp / "out" / "reference.safetensors"))
    ckpt = safeckpt.load_checkpoint(tmp / "run", restore_rng=False)
    assert set(ckpt.model_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(torch.equal(t, reference[f"model.{k}"]) for k, t in ckpt.model_state.items())
    assert ckpt.scheduler_state is not None and ckpt.scheduler_state["last_epoch"] == 3


def test_numpy_reader_assembles_the_two_rank_checkpoint(job: tuple[Path, Results]) -> None:
    import safeckpt.numpy

    tmp, _ = job
    reference = load_file(str(tmp / "out" / "reference.safetensors"))
    ckpt = safeckpt.numpy.load_checkpoint(tmp / "run")
    assert ckpt.step == 3 and ckpt.config == {"lr": 0.01, "dims": [5, 7, 3]}
    for key, array in ckpt.model_state.items():
        assert torch.equal(torch.from_numpy(array), reference[f"model.{key}"]), key
    for name, state in ckpt.optimizer_state["state"].items():  # type: ignore[index]
        assert torch.equal(torch.from_numpy(state["exp_avg"]), reference[f"optim.{name}.exp_avg"]), name
    assert ckpt.rng_state is None and ckpt.extra["rank-00001"]["data"] == {"offset": 11, "order": (11, 12)}
    assert ckpt.scheduler_state["last_epoch"] == 3  # type: ignore[index]


def test_sharded_checkpoint_verifies_and_lists_every_file(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    manifest = safeckpt.verify_checkpoint(tmp / "run")
    names = {entry.name for entry in manifest.files}
    assert names == {
        "config.json", "vocab.json", "sharding.json", "shard-00000.safetensors", "shard-00001.safetensors",
        "shard-00000-whole.safetensors", "shard-00001-whole.safetensors", "shard-00000.msgpack", "shard-00001.msgpack",
    }  # fmt: skip
    assert manifest.format_version == (1, 2)
    sharding = json.loads((tmp / "run" / "step-00000003" / "sharding.json").read_text())
    assert sharding["world_size"] == 2
    assert [c["sizes"] for c in sharding["tensors"]["model.0.weight"]["chunks"]] == [[4, 5], [3, 5]]
    # Every rank needs AdamW's step counts (rank 0 writes those every rank holds), rank r only the
    # pieces of rank r: they live in separate files, so a load on 2 ranks reads no other rank's pieces.
    files = {fqn: {c["file"] for c in entry["chunks"]} for fqn, entry in sharding["tensors"].items()}
    steps = [fqn for fqn in files if fqn.startswith("optimizer.state.") and fqn.endswith(".step")]
    assert steps and all(files[fqn] == {"shard-00000-whole.safetensors"} for fqn in steps)
    assert files["model.0.weight"] == {"shard-00000.safetensors", "shard-00001.safetensors"}


def test_consolidated_checkpoint_is_an_ordinary_one(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    reference = load_file(str(tmp / "out" / "reference.safetensors"))
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = safeckpt.load_checkpoint(tmp / "single", model=model, optimizer=optimizer, restore_rng=False)
    assert (ckpt.path / "model.safetensors").is_file() and not (ckpt.path / "sharding.json").exists()
    assert ckpt.metadata["consolidated_from"] == {"world_size": 2, "checkpoint": "step-00000003"}
    assert set(ckpt.extra) == {"rank-00000", "rank-00001"}
    assert ckpt.extra["rank-00001"]["data"] == {"offset": 11, "order": (11, 12)}
    assert ckpt.rng_state is None
    assert all(torch.equal(v, reference[f"model.{k}"]) for k, v in model.state_dict().items())


def test_sigkill_of_one_rank_mid_save_commits_nothing(tmp_path: Path) -> None:
    procs = dist_harness.start("sigkill", 2, tmp_path)
    try:
        assert procs[0].wait(dist_harness.TIMEOUT) == -signal.SIGKILL, dist_harness.log(tmp_path, 0)
    finally:
        procs[1].kill()  # it may be stuck in a collective with the dead coordinator
        procs[1].wait()
    results = dist_harness.results(tmp_path, 2)
    assert results[0].get("killed_while_writing") == "ok", dist_harness.log(tmp_path, 0)
    assert "step_2_returned" not in results[1]
    root = tmp_path / "run"
    assert safeckpt.CheckpointManager(root).steps() == [1]
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save's temporary folder should be there for the next save to clean"
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    assert safeckpt.load_checkpoint(root, model=model, restore_rng=False).step == 1
    from safeckpt import distributed as sd

    sd.save({"w": torch.ones(2)}, root, step=9)  # the next save cleans the dead one's folder
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]

"""Sharded checkpoints through the storage seam: FSDP2 on 2 ranks saving to and loading from an S3
API server (moto on loopback), ``save_checkpoint(path=...)`` of a sharded model, ``map_location``
of a sharded load in one process, and a non-coordinator rank SIGKILLed in the middle of a save.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import dist_harness
import pytest
import torch
from safetensors.torch import load_file

import safeckpt
from safeckpt import distributed as sd

Results = dist_harness.Results


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, dict[str, object]]]:
    """A fresh bucket on a moto S3 server: its URL and the storage options that reach it."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from s3_server import S3Server, options

    server = S3Server()
    server.start()
    opts = options(server.url)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}", opts
    server.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, s3: tuple[str, dict[str, object]]) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("remote")
    url, opts = s3
    env = {"S3_ROOT": url, "S3_OPTIONS": json.dumps(opts), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    return tmp, dist_harness.run("remote", 2, tmp, env=env)


@pytest.mark.parametrize(
    "check",
    [
        "s3_manager_save",
        "s3_resume_bit_identical",
        "s3_dcp_direct",
        "s3_corrupted_object_every_rank_raises",
        "path_local",
        "path_s3",
        "finished",
    ],
)
def test_two_rank_check(job: tuple[Path, Results], check: str) -> None:
    dist_harness.assert_ok(*job, check, range(2))


def test_save_path_leaves_only_the_checkpoint(job: tuple[Path, Results]) -> None:
    _, results = job
    assert results[0].get("path_local_leaves_only_the_checkpoint") == "ok", results[0]


def test_plain_process_loads_the_s3_checkpoint(job: tuple[Path, Results], s3: tuple[str, dict[str, object]]) -> None:
    tmp, _ = job
    url, opts = s3
    reference = load_file(str(tmp / "out" / "reference.safetensors"))
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    with pytest.warns(safeckpt.MissingRNGStateWarning):
        ckpt = safeckpt.load_checkpoint(
            f"{url}/run", model=model, optimizer=optimizer, restore_rng=False, storage_options=opts
        )
    assert ckpt.step == 3 and str(ckpt.path) == f"{url}/run/step-00000003"
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[f"model.{name}"]), name
    state = optimizer.state_dict()
    for index, (name, _) in enumerate(model.named_parameters()):
        assert torch.equal(state["state"][index]["exp_avg"], reference[f"optim.{name}.exp_avg"]), name
    assert safeckpt.verify_checkpoint(f"{url}/run", storage_options=opts).format_version == (1, 2)


def test_plain_process_refuses_the_corrupted_object(job: tuple[Path, Results], s3: tuple[str, dict[str, object]]) -> None:
    url, opts = s3
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="shard-00001.safetensors"):
        safeckpt.load_checkpoint(f"{url}/bad", model=model, restore_rng=False, storage_options=opts)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_map_location_places_a_sharded_load_in_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": {k: v.detach().clone() for k, v in source.state_dict().items()},
        "optimizer": {"state": {"weight": {"momentum_buffer": optimizer.state_dict()["state"][0]["momentum_buffer"]}}},
    }
    folder = sd.save(state, tmp_path, step=1)

    loaded = safeckpt.load_checkpoint(folder, restore_rng=False, map_location=torch.device("cpu"))
    assert all(torch.equal(loaded.model_state[k], v) for k, v in state["model"].items())
    shapes = safeckpt.load_checkpoint(folder, restore_rng=False, map_location="meta")  # shapes, no memory
    assert {k: (v.device.type, tuple(v.shape)) for k, v in shapes.model_state.items()} == {
        "weight": ("meta", (2, 3)), "bias": ("meta", (2,)),
    }  # fmt: skip
    momentum = shapes.optimizer_state["state"]["weight"]["momentum_buffer"]  # type: ignore[index]
    assert momentum.device.type == "meta"

    target = torch.nn.Linear(3, 2)
    ckpt = safeckpt.load_checkpoint(folder, model=target, restore_rng=False, map_location="meta")
    assert torch.equal(target.weight, source.weight)  # the module is restored where it lives
    assert target.weight.device.type == "cpu" and ckpt.model_state["weight"].device.type == "meta"


def test_sigkill_of_a_non_coordinator_rank_mid_save_commits_nothing(tmp_path: Path) -> None:
    """Rank 1 dies while writing its shard of step 2: the coordinator's save fails (its peer is
    gone) instead of committing, step 1 still loads, and no leftover survives the next save."""
    procs = dist_harness.start("sigkill", 2, tmp_path, env={"KILL_RANK": "1"})
    try:
        assert procs[1].wait(dist_harness.TIMEOUT) == -signal.SIGKILL, dist_harness.log(tmp_path, 1)
        coordinator = procs[0].wait(dist_harness.TIMEOUT)  # it notices its peer is gone and fails
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = dist_harness.results(tmp_path, 2)
    assert results[1].get("killed_while_writing") == "ok", dist_harness.log(tmp_path, 1)
    assert coordinator != 0 and "step_2_returned" not in results[0], dist_harness.log(tmp_path, 0)
    error = results[0].get("step_2_error", "")
    assert error.startswith("safeckpt.distributed.dcp_calls.DistributedCheckpointError"), dist_harness.log(tmp_path, 0)
    assert "step-00000002 was not committed" in error, error
    root = tmp_path / "run"
    assert safeckpt.CheckpointManager(root).steps() == [1]
    assert not (root / "step-00000002").exists()
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    assert safeckpt.load_checkpoint(root, model=model, restore_rng=False).step == 1
    sd.save({"w": torch.ones(2)}, root, step=9)  # cleans whatever the failed save left
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert safeckpt.CheckpointManager(root).steps() == [1, 9]

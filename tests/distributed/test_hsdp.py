"""2-D device meshes: HSDP and tensor parallel + FSDP, in one job of 4 processes (gloo on CPU).

The job (``hsdp_workers.mesh2d``) saves HSDP (``("replicate", "shard")``, 2 x 2) with AdamW,
StepLR, per-rank RNG and ``extra``, then resumes it on the same layout with bit-identical losses
and every rank's own RNG and ``extra``, and loads it into plain FSDP on 2 ranks (RNG and
``extra`` refused by name, model and optimizer equal to the saved state). It then saves and
resumes TP + FSDP (``("dp", "tp")``). The tests below assert on those checks, on the format
(each replicated piece written once) and on loads of both checkpoints in this plain process.
"""

from __future__ import annotations

import json
from pathlib import Path

import dist_harness
import pytest
import torch
from safetensors.torch import load_file

import safeckpt

Results = dist_harness.Results
WORKERS = Path(__file__).with_name("hsdp_workers.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("mesh2d")
    return tmp, dist_harness.run("mesh2d", 4, tmp, workers=WORKERS)


@pytest.mark.parametrize(
    ("check", "ranks"),
    [
        ("hsdp_parameters_replicated_and_sharded", range(4)),
        ("hsdp_save_world_4", range(4)),
        ("hsdp_resume_world_4_bit_identical_rng_and_extra_per_rank", range(4)),
        ("hsdp_into_fsdp_world_2_refuses_rng_and_extra", range(2)),
        ("hsdp_into_fsdp_world_2_equals_reference", range(2)),
        ("tp_fsdp_save_world_4", range(4)),
        ("tp_fsdp_resume_world_4_bit_identical", range(4)),
        ("finished", range(4)),
    ],
)
def test_multi_process_check(job: tuple[Path, Results], check: str, ranks: range) -> None:
    dist_harness.assert_ok(*job, check, ranks)


def test_hsdp_replicas_write_each_piece_once_and_every_rank_its_own_state(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    folder = tmp / "hsdp" / "step-00000003"
    sharding = json.loads((folder / "sharding.json").read_text())
    assert sharding["world_size"] == 4
    for key in ("model.0.weight", "optimizer.state.0.weight.exp_avg", "optimizer.state.0.weight.exp_avg_sq"):
        chunks = sharding["tensors"][key]["chunks"]
        assert sorted((c["offsets"], c["sizes"]) for c in chunks) == [([0, 0], [4, 5]), ([4, 0], [3, 5])], (
            chunks
        )
    for rank in range(4):  # replicas hold the same pieces, but each its own RNG and extra
        own = f"rank-{rank:05d}"
        files = [c["file"] for c in sharding["tensors"][f"{own}.rng.tensors.torch"]["chunks"]]
        assert files in ([f"shard-{rank:05d}.safetensors"], [f"shard-{rank:05d}-whole.safetensors"])
        assert sharding["values"][f"{own}.extra.structure"]["file"] == f"shard-{rank:05d}.msgpack"

    import safeckpt.numpy

    ckpt = safeckpt.numpy.load_checkpoint(tmp / "hsdp")
    assert ckpt.extra == {
        f"rank-{r:05d}": {"data": {"offset": 10 + r, "order": (10 + r, 11 + r)}} for r in range(4)
    }


def plain_load(root: Path, hidden: int, reference: dict[str, torch.Tensor], *, saved_on: int) -> None:
    """Load a sharded checkpoint into an ordinary module + AdamW; both equal ``reference``."""
    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    with pytest.raises(safeckpt.CheckpointMismatchError, match=f"saved on {saved_on} rank"):
        safeckpt.load_checkpoint(root, model=model, optimizer=optimizer)
    with pytest.warns(safeckpt.MissingRNGStateWarning):
        safeckpt.load_checkpoint(root, model=model, optimizer=optimizer, restore_rng=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[f"model.{name}"]), name
    state = optimizer.state_dict()
    for index, (name, _) in enumerate(model.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][index][key], reference[f"optim.{name}.{key}"]), (name, key)
    assert state["param_groups"][0]["lr"] == reference["lr.0"].item()


def test_plain_process_loads_hsdp_checkpoint_into_ordinary_module(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    plain_load(tmp / "hsdp", 7, load_file(str(tmp / "out" / "hsdp_reference.safetensors")), saved_on=4)


def test_plain_process_loads_tp_fsdp_checkpoint_into_ordinary_module(job: tuple[Path, Results]) -> None:
    tmp, _ = job
    plain_load(tmp / "tp_fsdp", 8, load_file(str(tmp / "out" / "tp_fsdp_reference.safetensors")), saved_on=4)

"""Every rank of a sharded job agrees, in one job of 2 processes (``dist_workers.agreement``):
a load restores the optimizer even when gradients exist, and refuses what does not fit (a
missing ``extra`` entry on one rank, an unlike optimizer) on every rank before touching the
model; ``strict=False`` loads what matches; a save one rank cannot encode, or that the ranks
call with different arguments, raises on every rank; the manager's pruning is visible to every
rank when ``save`` returns; DDP saves rank 0's buffers; per-rank state saved by some ranks
only loads; a parameter without optimizer state stays without; any error of one rank (not only
safeckpt's) raises on every rank; a load verifies each file once; a model neither DDP nor sharded
saved on a rank other than 0 warns that the ranks may race for one folder."""

from __future__ import annotations

from pathlib import Path

import dist_harness
import pytest

Results = dist_harness.Results


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("agreement")
    return tmp, dist_harness.run("agreement", 2, tmp)


@pytest.mark.parametrize(
    "check",
    [
        "optimizer_state_restored_when_grads_exist",
        "ddp_saves_the_buffers_of_rank_0",
        "one_rank_bad_extra_raises_on_every_rank",
        "missing_extra_refused_on_every_rank_before_restoring",
        "unlike_optimizer_refused_before_restoring",
        "strict_false_loads_what_matches",
        "different_arguments_refused_on_every_rank",
        "manager_pruned_on_every_rank_when_save_returns",
        "per_rank_state_of_one_rank_only_loads",
        "parameter_without_optimizer_state_stays_without",
        "any_error_of_one_rank_raises_on_every_rank",
        "every_file_verified_once_per_load",
        "a_model_neither_ddp_nor_sharded_saved_on_another_rank_warns",
        "finished",
    ],
)
def test_ranks_agree(job: tuple[Path, Results], check: str) -> None:
    dist_harness.assert_ok(*job, check, range(2))

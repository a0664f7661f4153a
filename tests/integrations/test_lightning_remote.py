"""Lightning with ``ModelCheckpoint(dirpath="s3://...")``: SafeckptIO saves, prunes and resumes
through the object store (moto's S3 API on loopback). The plugin gets the endpoint from its
``storage_options``; Lightning's own file-system calls (``fs.exists``, ``fs.ls``) from the
environment, as s3fs reads it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("s3fs")
import lightning_train  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from s3fs import S3FileSystem  # noqa: E402

import safeckpt  # noqa: E402
from s3_server import S3Server, options  # noqa: E402
from safeckpt.lightning import SafeckptIO, last_checkpoint, load_from_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)
KEPT = ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]  # save_top_k=2 + last


@pytest.fixture()
def s3(server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3FileSystem]:
    """The server as the environment's S3 endpoint (for Lightning's ``get_filesystem``); a file
    system on it for the test to look at the bucket (no listings cache: it must see each change)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    S3FileSystem.clear_instance_cache()
    yield S3FileSystem(**options(server.url), use_listings_cache=False)  # type: ignore[arg-type]
    S3FileSystem.clear_instance_cache()


def train(dirpath: str, steps: int, plugin: SafeckptIO, losses: Path, ckpt_path: str | None = None) -> pl.Trainer:
    """lightning_train's run (dropout, shuffled data, AdamW + StepLR) for ``steps`` steps,
    checkpointing every 4 steps into ``dirpath``, top 2 by step and last."""
    pl.seed_everything(0, verbose=False)
    model = lightning_train.Regressor()
    checkpoint = ModelCheckpoint(
        dirpath=dirpath, every_n_train_steps=lightning_train.EVERY, save_top_k=2, monitor="step", mode="max",
        save_last=True,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=steps, plugins=[plugin], callbacks=[checkpoint, lightning_train.RecordLoss(str(losses), None)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, lightning_train.data(), ckpt_path=ckpt_path)
    return trainer


def prefixes(fs: S3FileSystem, root: str) -> list[str]:
    return sorted(name.rsplit("/", 1)[-1] for name in fs.ls(root.removeprefix("s3://"), detail=False))


def test_remote_run_resumes_exactly_and_prunes_manifest_first(s3: S3FileSystem, server: S3Server, bucket: str, tmp_path: Path) -> None:
    opts = options(server.url)
    full, run = f"s3://{bucket}/full", f"s3://{bucket}/run"
    uninterrupted = train(full, lightning_train.STEPS, SafeckptIO(storage_options=opts), tmp_path / "full.txt")

    assert last_checkpoint(run, storage_options=opts) is None  # first run: nothing to resume
    train(run, 8, SafeckptIO(storage_options=opts), tmp_path / "run.txt")
    assert prefixes(s3, run) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    resume = last_checkpoint(run, storage_options=opts)
    assert resume == f"{run}/last.ckpt"
    resumed = train(run, lightning_train.STEPS, SafeckptIO(async_save=True, storage_options=opts), tmp_path / "run.txt", resume)

    # the same losses step by step (RNG restored: dropout and shuffling repeat) and the same weights
    assert (tmp_path / "run.txt").read_text() == (tmp_path / "full.txt").read_text()
    for name, tensor in uninterrupted.lightning_module.state_dict().items():
        assert torch.equal(resumed.lightning_module.state_dict()[name], tensor), name
    # the pruned top-k checkpoints (steps 4 and 8) are gone, manifest and objects; the rest verify
    assert prefixes(s3, run) == prefixes(s3, full) == KEPT
    for name in ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]:
        assert not s3.exists(f"{bucket}/run/{name}/manifest.json") and not s3.find(f"{bucket}/run/{name}")
    for name in KEPT:
        safeckpt.verify_checkpoint(f"{run}/{name}", storage_options=opts)
    last = safeckpt.load_checkpoint(f"{run}/last.ckpt", restore_rng=False, storage_options=opts)
    assert last.step == lightning_train.STEPS and last.extra["global_step"] == lightning_train.STEPS
    model = load_from_checkpoint(lightning_train.Regressor, f"{run}/last.ckpt", storage_options=opts)
    assert torch.equal(model.net[0].weight, uninterrupted.lightning_module.net[0].weight)


def test_corrupted_object_is_refused_on_resume(s3: S3FileSystem, server: S3Server, bucket: str, tmp_path: Path) -> None:
    opts, run = options(server.url), f"s3://{bucket}/run"
    train(run, 4, SafeckptIO(storage_options=opts), tmp_path / "losses.txt")
    (weights,) = s3.glob(f"{bucket}/run/last.ckpt/objects-*/model.safetensors")
    data = bytearray(s3.cat_file(weights))
    data[-1] ^= 0xFF  # same size, one tensor byte flipped
    s3.pipe_file(weights, bytes(data))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="model.safetensors"):
        train(run, 8, SafeckptIO(storage_options=opts), tmp_path / "losses.txt", f"{run}/last.ckpt")


def test_ckpt_path_last_cannot_see_a_remote_dirpath(s3: S3FileSystem, server: S3Server, bucket: str, tmp_path: Path) -> None:
    """Lightning's own limit (issue #18261), which no plugin sees: it lists ``dirpath`` without the
    protocol and looks on the local disk, so ``ckpt_path="last"`` warns and starts over. If this
    starts failing, Lightning changed: check ``fit(ckpt_path="last")`` and the README."""
    opts, run = options(server.url), f"s3://{bucket}/run"
    train(run, 4, SafeckptIO(storage_options=opts), tmp_path / "losses.txt")
    with pytest.warns(UserWarning, match="no last checkpoint available"):
        trainer = train(run, 1, SafeckptIO(storage_options=opts), tmp_path / "again.txt", "last")
    assert trainer.ckpt_path is None


def test_storage_options_per_call_override_the_plugins(s3: S3FileSystem, server: S3Server, bucket: str, tmp_path: Path) -> None:
    good = options(server.url)
    io = SafeckptIO(storage_options={**good, "endpoint_url": "http://127.0.0.1:9"})  # nothing listens there
    state = {"state_dict": {"w": torch.arange(3.0)}, "global_step": 7, "epoch": 0}
    url = f"s3://{bucket}/run/manual.ckpt"
    io.save_checkpoint(state, url, storage_options={"endpoint_url": server.url})
    assert torch.equal(SafeckptIO(storage_options=good).load_checkpoint(url)["state_dict"]["w"], torch.arange(3.0))
    io.save_checkpoint(state, tmp_path / "local.ckpt")  # the plugin's options are for URLs only
    assert SafeckptIO().load_checkpoint(tmp_path / "local.ckpt")["global_step"] == 7
    SafeckptIO(storage_options=good).remove_checkpoint(url)
    assert not s3.find(f"{bucket}/run/manual.ckpt")

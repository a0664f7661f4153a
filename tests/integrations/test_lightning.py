"""Lightning: SafeckptIO checkpoints, killed runs resumed with ckpt_path="last" repeat the losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
import lightning_train  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt.lightning import SafeckptIO, load_from_checkpoint  # noqa: E402

CHILD = Path(lightning_train.__file__)


def read_losses(path: Path) -> dict[int, str]:
    """``step -> loss`` (as written); a step trained twice (before a kill and after the resume)
    must have had the same loss both times."""
    losses: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        assert losses.setdefault(int(step), loss) == loss, f"step {step} trained twice with different losses"
    return losses


def committed_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "manifest.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return None  # not there yet, or being swapped


def run_child(root: Path, losses: Path, *flags: str, kill_after: int | None = None) -> None:
    """Run the training child; with ``kill_after``, SIGKILL it as soon as ``last.ckpt`` holds that
    step (the child waits on stdin two steps later, so it never finishes first)."""
    args = [sys.executable, str(CHILD), str(root), str(losses), *flags]
    if kill_after is not None:
        args += ["--block-at", str(kill_after + 2)]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if kill_after is None:
            _, err = child.communicate(timeout=300)
            assert child.returncode == 0, err.decode()[-3000:]
            return
        while committed_step(root / "last.ckpt") != kill_after:
            assert child.poll() is None, child.stderr.read().decode()[-3000:] if child.stderr else ""
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr:
            child.stderr.close()
        if child.stdin:
            child.stdin.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    lightning_train.main([str(tmp / "ckpts"), str(tmp / "losses.txt")])  # in this process: saves an import
    losses = read_losses(tmp / "losses.txt")
    assert sorted(losses) == list(range(1, lightning_train.STEPS + 1))
    return losses


def test_killed_runs_resume_exactly_sync_and_async(uninterrupted: dict[int, str], tmp_path: Path) -> None:
    root, losses = tmp_path / "ckpts", tmp_path / "losses.txt"
    # 1. synchronous saves, killed once step 8 is committed as last.ckpt;
    run_child(root, losses, kill_after=8)
    assert committed_step(root / "last.ckpt") == 8
    # 2. resumed with async_save=True, killed once its background save of step 12 committed;
    run_child(root, losses, "--resume", "--async-save", kill_after=12)
    # 3. resumed again, synchronously, to the end.
    run_child(root, losses, "--resume")
    assert read_losses(losses) == uninterrupted
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert names == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]  # save_top_k=2 + last
    for name in names:
        safeckpt.verify_checkpoint(root / name)
    assert committed_step(root / "last.ckpt") == 16


class Tiny(pl.LightningModule):
    def __init__(self, width: int = 4, labels: tuple[str, ...] = ("a", "b")) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, width)
        self.extra_state: object = None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint: dict[str, object]) -> None:
        if self.extra_state is not None:
            checkpoint["my_state"] = self.extra_state


def fit(model: pl.LightningModule, root: Path, plugin: object, steps: int = 2) -> pl.Trainer:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps, plugins=[plugin], logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, data)
    return trainer


def test_checkpoint_layout_and_load_from_checkpoint(tmp_path: Path) -> None:
    model = Tiny(width=5)
    fit(model, tmp_path, SafeckptIO())
    ckpt = safeckpt.load_checkpoint(tmp_path / "last.ckpt", restore_rng=False)
    assert ckpt.config == {"width": 5, "labels": ["a", "b"]}  # hyper_parameters -> config.json
    assert set(ckpt.model_state) == {"layer.weight", "layer.bias"}
    assert isinstance(ckpt.optimizer_state, list) and isinstance(ckpt.scheduler_state, list)
    assert ckpt.extra["global_step"] == 2 and "loops" in ckpt.extra and "callbacks" in ckpt.extra
    assert ckpt.rng_state is not None

    loaded = load_from_checkpoint(Tiny, tmp_path / "last.ckpt")
    assert loaded.hparams.width == 5
    assert torch.equal(loaded.layer.weight, model.layer.weight)
    assert load_from_checkpoint(Tiny, tmp_path / "last.ckpt", width=5, labels=("x",)).hparams.labels == ("x",)


def test_unstorable_object_names_its_key_and_is_never_pickled(tmp_path: Path) -> None:
    model = Tiny()
    model.extra_state = {"ok": 1, "handle": object()}
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        fit(model, tmp_path, SafeckptIO(), steps=1)
    message = str(info.value)
    assert "checkpoint['my_state']['handle']" in message and "never pickles" in message
    assert not list(tmp_path.glob("*.ckpt")), "nothing is committed"


def test_async_checkpoint_io_wrapper_warns_naming_async_save(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match=r"SafeckptIO\(async_save=True\)"):
        fit(Tiny(), tmp_path, AsyncCheckpointIO(SafeckptIO()))
    with pytest.warns(safeckpt.MissingRNGStateWarning, match="worker thread"):
        SafeckptIO().load_checkpoint(tmp_path / "last.ckpt")


def test_last_ckpt_is_swapped_atomically_and_removals_hide_first(tmp_path: Path) -> None:
    io = SafeckptIO()
    state = {"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "epoch": 0}
    io.save_checkpoint(state, tmp_path / "last.ckpt")
    io.save_checkpoint({**state, "state_dict": {"w": torch.ones(2)}, "global_step": 2}, tmp_path / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["global_step"] == 2
    safeckpt.save_checkpoint({"w": torch.ones(2)}, None, None, None, 5, path=tmp_path / "plain.ckpt", rng=False)
    with pytest.warns(safeckpt.MissingRNGStateWarning, match="no RNG state"):
        assert io.load_checkpoint(tmp_path / "plain.ckpt")["state_dict"].keys() == {"w"}
    io.remove_checkpoint(tmp_path / "plain.ckpt")
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert not os.path.lexists(tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == [".safeckpt.lock"]


def test_omegaconf_hyper_parameters_come_back_as_dictconfig(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    hparams = omegaconf.OmegaConf.create({"width": 4, "ids": {0: "a"}})
    io = SafeckptIO()
    io.save_checkpoint(
        {"state_dict": {}, "global_step": 3, "hyper_parameters": hparams, "hparams_type": type(hparams)},
        tmp_path / "a.ckpt",
    )
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert isinstance(loaded["hyper_parameters"], omegaconf.DictConfig)
    assert loaded["hyper_parameters"].width == 4 and loaded["hparams_type"] is omegaconf.DictConfig


def test_unstorable_hyper_parameter_says_to_ignore_it(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        SafeckptIO().save_checkpoint(
            {"state_dict": {}, "hyper_parameters": {"backbone": torch.nn.Linear(1, 1)}}, tmp_path / "a.ckpt"
        )
    assert "checkpoint['hyper_parameters']['backbone']" in str(info.value)
    assert "save_hyperparameters(ignore=" in str(info.value)
    with pytest.raises(safeckpt.UnsupportedValueError, match="storage_options"):
        SafeckptIO().save_checkpoint({"state_dict": {}}, tmp_path / "b.ckpt", storage_options={"x": 1})

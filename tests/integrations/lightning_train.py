"""Child process for the Lightning kill-and-resume tests: trains a small model with dropout and a
shuffled DataLoader, checkpointing through SafeckptIO, appending ``step loss`` lines to a file.

Usage: lightning_train.py ROOT LOSSES [--async-save] [--resume] [--block-at STEP]
``--block-at`` makes the run wait on stdin after that step, so that the parent can SIGKILL it
mid-run without depending on how fast this machine trains.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from safeckpt.lightning import SafeckptIO

STEPS, EVERY, BATCHES_PER_EPOCH = 16, 4, 4


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> object:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)}


class RecordLoss(pl.Callback):
    def __init__(self, losses: str, block_at: int | None) -> None:
        self.losses = losses
        self.block_at = block_at

    def on_train_batch_end(self, trainer: pl.Trainer, module: object, outputs: dict, batch: object, idx: int) -> None:
        with open(self.losses, "a") as file:
            file.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")
        if trainer.global_step == self.block_at:
            sys.stdin.read()  # the parent kills us while we wait here (or earlier)


def data() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4 * BATCHES_PER_EPOCH, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("losses")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--block-at", type=int)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    checkpoint = ModelCheckpoint(
        dirpath=args.root, every_n_train_steps=EVERY, save_top_k=2, monitor="step", mode="max", save_last=True
    )
    trainer = pl.Trainer(
        max_steps=STEPS, plugins=[SafeckptIO(async_save=args.async_save)], callbacks=[checkpoint,
        RecordLoss(args.losses, args.block_at)], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, data(), ckpt_path="last" if args.resume else None)


if __name__ == "__main__":
    main()

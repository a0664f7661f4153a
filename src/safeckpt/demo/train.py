"""One training process of the demo: ``python -m safeckpt.demo.train --run-dir D --config JSON``.

It trains the character-level transformer for ``config.steps`` steps, appending each step's
loss to ``--losses`` (one JSON line per step, flushed at once so a killed process leaves its
history behind) and printing ``step N`` on stdout after each step, which the parent process
watches to choose when to kill it. With ``--save-every K`` it saves a checkpoint through
:class:`~safeckpt.CheckpointManager` after every K-th step; with ``--resume`` it first
restores the newest good checkpoint (model, AdamW, warmup+cosine schedule, data position, RNG)
and continues at the step after it. At the end it saves the final state to ``RUN_DIR/final``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..manager import CheckpointManager
from ..torch.saver import save_checkpoint
from .corpus import generate_corpus
from .data import ShuffledBatches
from .model import CharTransformer, ModelConfig

__all__ = ["TrainConfig", "main"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the run; the resumed process must be given the same."""

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.1
    corpus_kb: int = 256
    seed: int = 0
    threads: int = 1

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))


@dataclass
class _Run:
    vocab: list[str]
    model: CharTransformer
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.SequentialLR
    batches: ShuffledBatches


def _build(cfg: TrainConfig) -> _Run:
    text = generate_corpus(cfg.corpus_kb * 1024, seed=1234)
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in text], dtype=torch.uint8)
    model_cfg = ModelConfig(len(vocab), cfg.seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout)
    model = CharTransformer(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    warmup = max(1, min(cfg.warmup, cfg.steps - 1))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.steps - warmup), eta_min=cfg.lr / 10),
        ],
        milestones=[warmup],
    )
    batches = ShuffledBatches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed + 1)
    return _Run(vocab, model, optimizer, scheduler, batches)


def train(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    losses_path: Path,
    save_every: int = 0,
    resume: bool = False,
    label: str = "train",
    progress: bool = True,
) -> int:
    """Train (or resume) one run; returns the process exit status."""
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = _build(cfg)
    model, optimizer, scheduler, batches = run.model, run.optimizer, run.scheduler, run.batches
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=3, async_save=True)
    start = 0
    if resume:
        ckpt = manager.restore(model=model, optimizer=optimizer, scheduler=scheduler, extra={"data": batches})
        if ckpt is None:
            print(f"{label}: no checkpoint in {manager.directory}; starting from step 0", file=sys.stderr)
        elif ckpt.config != asdict(cfg):
            print(f"{label}: {ckpt.path} was saved with config {ckpt.config}, not {asdict(cfg)}", file=sys.stderr)
            return 1
        else:
            start = ckpt.step + 1
            print(f"resumed from {ckpt.path.name} at step {start}", flush=True)
    model.train()
    with losses_path.open("a", encoding="utf-8") as log, manager:
        bar = _progress_bar(start, cfg.steps, label, enabled=progress)
        for step in range(start, cfg.steps):
            inputs, targets = batches.next()
            loss = model.loss(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            log.write(json.dumps({"step": step, "loss": value, "lr": lr}) + "\n")
            log.flush()
            if save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
                manager.save(
                    step, model=model, optimizer=optimizer, scheduler=scheduler,
                    config=asdict(cfg), vocab=run.vocab, extra={"data": batches}, metadata={"loss": value},
                )
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update()
            print(f"step {step}", flush=True)
        bar.close()
    save_checkpoint(
        model, optimizer, asdict(cfg), run.vocab, cfg.steps - 1,
        directory=run_dir / "final", scheduler=scheduler, extra={"data": batches}, overwrite=True,
    )
    return 0


class _Bar(Protocol):
    def set_postfix(self, **kwargs: object) -> None: ...
    def update(self) -> object: ...
    def close(self) -> None: ...


class _NoBar:
    def set_postfix(self, **kwargs: object) -> None:
        pass

    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(start: int, total: int, label: str, *, enabled: bool) -> _Bar:
    try:
        from tqdm import tqdm
    except ImportError:  # the [demo] extra is not installed: the bar is only cosmetic
        return _NoBar()
    if not enabled:
        return _NoBar()
    return tqdm(
        desc=label, total=total, initial=start, file=sys.stderr, mininterval=0.25, dynamic_ncols=True
    )


def main(argv: list[str]) -> int:
    """Entry point of the training subprocess."""
    parser = argparse.ArgumentParser(prog="python -m safeckpt.demo.train")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--losses", type=Path, required=True, help="JSON-lines file to append losses to")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--label", default="train")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_json(args.config)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    return train(
        cfg, args.run_dir, losses_path=args.losses, save_every=args.save_every,
        resume=args.resume, label=args.label, progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


"""Child process (and in-process helper) for the Hugging Face Trainer tests: a GPT-2 built from a
tiny config (dropout on) trains on random tokens, saving every SAVE_STEPS, appending ``step loss``
lines to a file.

Usage: hf_train.py OUT LOSSES [--resume] [--block-at STEP] [--trap-unpickling]
``--block-at`` makes the run wait on stdin during that step, so that the parent can SIGKILL it
mid-run without depending on how fast this machine trains.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers

from safeckpt.hf import Trainer

STEPS, SAVE_STEPS = 12, 4


def tiny_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )


def dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (20, 12), generator=gen)  # 5 batches per epoch: saves fall mid-epoch
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(
    out: str, losses: str, *, block_at: int | None = None, base: type[transformers.Trainer] = Trainer,
    steps: int = STEPS, args: dict[str, object] | None = None, **trainer_options: object,
) -> transformers.Trainer:  # fmt: skip
    """The test run's Trainer; ``args`` override TrainingArguments, ``trainer_options`` go to the Trainer."""
    class Recording(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:  # an evaluation (which asks for the outputs too)
                return loss
            step = self.state.global_step + 1
            with open(losses, "a") as record:
                record.write(f"{step} {float(loss.detach())!r}\n")
            if step == block_at:
                sys.stdin.read()  # the parent kills us while we wait here (or earlier)
            return loss

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_config())
    training_args = transformers.TrainingArguments(**{
        "output_dir": out, "max_steps": steps, "per_device_train_batch_size": 4, "save_strategy": "steps",
        "save_steps": SAVE_STEPS, "save_total_limit": 2, "logging_steps": 1000, "report_to": "none", "use_cpu": True,
        "seed": 0, "learning_rate": 1e-2, "warmup_steps": 2, "disable_tqdm": True, "dataloader_num_workers": 0,
        **(args or {}),
    })  # type: ignore[arg-type]  # fmt: skip
    return Recording(model=model, args=training_args, train_dataset=dataset(), **trainer_options)


def trap_unpickling() -> None:
    """Make every unpickling entry point fail: resuming must not need any of them."""
    import pickle

    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unpickler was called while resuming")

    torch.load = trap  # type: ignore[assignment]
    torch.serialization.load = trap  # type: ignore[assignment]
    pickle.load = pickle.loads = trap  # type: ignore[assignment]
    pickle.Unpickler = trap  # type: ignore[assignment, misc]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("losses")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--block-at", type=int)
    parser.add_argument("--trap-unpickling", action="store_true")
    args = parser.parse_args(argv)
    trainer = make_trainer(args.out, args.losses, block_at=args.block_at)
    if args.trap_unpickling:
        trap_unpickling()
    trainer.train(resume_from_checkpoint=True if args.resume else None)


if __name__ == "__main__":
    main()

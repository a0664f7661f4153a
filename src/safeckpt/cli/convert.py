"""``safeckpt convert IN.pt ROOT``: import a ``torch.save`` file with torch's ``weights_only``
loader and a small allow-list (see :mod:`safeckpt.convert`); never plain pickle.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CheckpointExistsError, CheckpointUsageError
from ..storage.base import ObjectPath
from ..storage.locate import as_location
from ._common import EXIT_OK, add_command, add_storage_options, as_flags, storage_options

__all__ = ["register", "run"]

HELP = (
    "import a torch.save .pt/.pth/.bin file or a Hugging Face Trainer checkpoint-N folder (read with "
    "torch.load(weights_only=True), never plain pickle)"
)


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "convert",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Understands a bare state dict and the usual "
        "{model, optimizer, scheduler, args/config/hparams, vocab, step/epoch, ...} layout; other "
        "entries go to extra. argparse.Namespace and numpy scalars, dtypes and arrays are allowed; "
        "any other class is refused by name unless --allow-class names it. The result has no RNG "
        "state: load it with load_checkpoint(..., restore_rng=False). A Trainer checkpoint-N folder becomes "
        "ROOT/checkpoint-N with its RNG state and trainer_state.json, which safeckpt.hf.Trainer resumes.",
    )
    p.add_argument("source", metavar="IN", help="torch.save file (.pt, .pth, .bin) or a Trainer checkpoint-N folder")
    p.add_argument("directory", metavar="ROOT", help="checkpoint root to write step-NNNNNNNN into, or a URL (torch.save files only)")
    p.add_argument("--step", type=_step, default=None, help="step to record (default: the file's own step, else 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of that step")
    p.add_argument(
        "--allow-class", action="append", default=[], metavar="MODULE.NAME", dest="allow_classes",
        help="let the loader rebuild instances of this class as plain records of their attributes "
        "(its code is never imported or run); repeatable",
    )  # fmt: skip
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if os.path.isdir(args.source):
        return _run_trainer_folder(args)
    from ..convert import convert_torch_file

    try:
        result = convert_torch_file(
            args.source, args.directory, step=args.step, overwrite=args.overwrite, allow_classes=args.allow_classes,
            storage_options=storage_options(args),
        )  # fmt: skip
    except CheckpointExistsError as exc:
        raise as_flags(exc) from None
    print(f"wrote {result.path} (step {result.step}; read {args.source} with torch.load(weights_only=True))")
    for key, where in result.placed.items():
        print(f"  {key} -> {where}")
    print(
        "note: the checkpoint has no RNG state (a torch.save file holds none safeckpt can restore); "
        "load it with load_checkpoint(..., restore_rng=False)"
    )
    return EXIT_OK


def _run_trainer_folder(args: argparse.Namespace) -> int:
    """A stock ``transformers.Trainer`` ``checkpoint-N`` folder -> ``ROOT/checkpoint-N``."""
    from ..integrations.hf_convert import import_hf_checkpoint

    if isinstance(as_location(args.directory), ObjectPath):
        raise CheckpointUsageError(
            f"{args.directory}: a Trainer folder converts into a local folder only; convert it locally, "
            "then copy the checkpoint-N folder into the bucket, manifest.json last"
        )
    if args.step is not None or args.allow_classes:
        raise CheckpointUsageError(
            f"{args.source}: --step and --allow-class apply to torch.save files only; a Trainer folder "
            "keeps its own step and is read with torch.load(weights_only=True) alone"
        )
    target = Path(args.directory) / Path(args.source).resolve().name
    try:
        path = import_hf_checkpoint(args.source, target, overwrite=args.overwrite)
    except CheckpointExistsError as exc:
        raise as_flags(exc) from None
    print(f"wrote {path} (read {args.source} with torch.load(weights_only=True))")
    return EXIT_OK

"""``safeckpt export CKPT OUT --to {torch,safetensors,hf}``: write a verified checkpoint in a format
other tools read (see :mod:`safeckpt.export`; new targets are one line of ``EXPORT_TARGETS``).
"""

from __future__ import annotations

import argparse
import os

from ..errors import CheckpointExistsError, CheckpointUsageError
from ..export import EXPORT_TARGETS, local_target
from . import _files
from ._common import EXIT_OK, add_command, add_quiet, add_storage_options, progress, storage_options

__all__ = ["register", "run"]

HELP = (
    "write a checkpoint as one torch.save file (default), the model as a plain safetensors file, or a "
    "Hugging Face from_pretrained folder"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. The checkpoint is verified first. --to torch "
        "writes {model, optimizer, scheduler, config, vocab, step, extra, metadata}, which "
        "`safeckpt convert` turns back into the same checkpoint (without RNG state); --to "
        "safetensors writes the model weights for safetensors.torch.load_file; --to hf writes the folder "
        "OUT (model.safetensors + config.json) for transformers' from_pretrained, when the checkpoint's "
        "config is a transformers config (or --model-type names the model). OUT is a local path "
        "whose folder exists (--to hf creates the folder OUT).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder, its manifest.json, or a root (the newest); or a URL")
    p.add_argument("target", metavar="OUT", help="file (a folder with --to hf) to write; refused if it exists, unless --overwrite")
    p.add_argument("--to", choices=sorted(EXPORT_TARGETS), default="torch", help="output format (default: torch)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--model-type", metavar="TYPE", default=None,
        help="--to hf only: the transformers model_type (e.g. gpt2) when the checkpoint's config does not record it",
    )  # fmt: skip
    add_quiet(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_checkpoint
    from . import _trees

    if args.model_type is not None and args.to != "hf":
        raise CheckpointUsageError(f"--model-type applies to --to hf only, not to --to {args.to}; drop it")
    target = local_target(args.target)  # before the checkpoint is read: a URL is refused at once
    if not args.overwrite and os.path.lexists(target):
        raise CheckpointExistsError(f"{target}: already exists; pass --overwrite to replace it")
    opts = storage_options(args)
    folder = _files.locate(args.checkpoint, storage_options=opts)
    manifest = _files.read_manifest(folder, storage_options=opts)
    with progress(sum(e.size for e in manifest.files), f"read {folder.name}", quiet=args.quiet) as bar:
        checkpoint = _trees.load(folder, manifest, done=bar.update, storage_options=opts)
    try:
        written = export_checkpoint(checkpoint, target, to=args.to, overwrite=args.overwrite, model_type=args.model_type)
    except CheckpointExistsError:
        raise CheckpointExistsError(f"{target}: already exists; pass --overwrite to replace it") from None
    print(f"wrote {written} ({args.to}, step {checkpoint.step}, from {folder})")
    return EXIT_OK

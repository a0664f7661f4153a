"""``safeckpt consolidate SRC DST``: rewrite a sharded (multi-rank) checkpoint as a
single-process one that ``load_checkpoint``, ``safeckpt.numpy`` and the JavaScript reader open
(see :func:`safeckpt.distributed.consolidate`). Either side may be an fsspec URL."""

from __future__ import annotations

import argparse

from ..errors import CheckpointExistsError
from ._common import EXIT_OK, add_command, add_storage_options, as_flags, storage_options

__all__ = ["register", "run"]

HELP = "rewrite a sharded checkpoint (saved on several ranks) as a single-process checkpoint"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "consolidate",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Every shard is verified and the full state is "
        "held in memory. RNG state of several ranks is dropped (load the result with "
        "restore_rng=False); their extra state is kept per rank.",
    )
    p.add_argument(
        "source", metavar="SRC",
        help="sharded checkpoint folder, its manifest.json, or a root (the newest); or a URL (s3://bucket/run)",
    )  # fmt: skip
    p.add_argument("directory", metavar="DST", help="checkpoint root to write step-NNNNNNNN into (a folder or a URL)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of that step in DST")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed import consolidate

    try:
        path = consolidate(args.source, args.directory, overwrite=args.overwrite, storage_options=storage_options(args))
    except CheckpointExistsError as exc:
        raise as_flags(exc) from None
    print(f"wrote {path} (consolidated from {args.source})")
    return EXIT_OK

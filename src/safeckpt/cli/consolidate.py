"""``safeckpt consolidate SRC DST``: rewrite a sharded (multi-rank) checkpoint as a
single-process one that ``load_checkpoint``, ``safeckpt.numpy`` and the JavaScript reader open
(see :func:`safeckpt.distributed.consolidate`). Local folders only: sharded checkpoints are not
written to or read from object stores yet, so a URL is refused before anything is read."""

from __future__ import annotations

import argparse

from ..errors import CheckpointUsageError
from ..storage.base import ObjectPath
from ..storage.locate import as_location
from ._common import EXIT_OK, add_command

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
    p.add_argument("source", metavar="SRC", help="sharded checkpoint folder, its manifest.json, or a root (the newest)")
    p.add_argument("directory", metavar="DST", help="checkpoint root to write step-NNNNNNNN into")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of that step in DST")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for path in (args.source, args.directory):
        if isinstance(as_location(path), ObjectPath):
            raise CheckpointUsageError(
                f"{path}: consolidate works on local folders only (sharded checkpoints are not kept in "
                "object stores yet); consolidate into a local folder, then copy that step-* folder into "
                "the bucket, manifest.json last"
            )
    from ..distributed import consolidate

    path = consolidate(args.source, args.directory, overwrite=args.overwrite)
    print(f"wrote {path} (consolidated from {args.source})")
    return EXIT_OK

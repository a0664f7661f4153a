"""``safeckpt prune ROOT --keep-last N [--keep-every M] [--dry-run]``: delete old checkpoints by
the rules :class:`~safeckpt.CheckpointManager` applies (:mod:`safeckpt.retention`), each through
the commit protocol's safe removal (the folder is uncommitted by a rename before any file goes).
Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointNotFoundError, CheckpointWriteError
from ..retention import steps_to_remove
from . import _files
from ._common import EXIT_OK, add_command, add_json, emit_json

__all__ = ["prune", "register", "run"]

HELP = "delete old checkpoints, keeping the newest N (and every M-th step), like CheckpointManager"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "prune",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}: keeps the N newest committed checkpoints plus "
        "every step that is a multiple of M, and deletes the other committed ones. Uncommitted "
        "folders are left alone. Each checkpoint is renamed out of sight before its files are "
        "deleted, so an interrupted prune never leaves a half-deleted checkpoint.",
    )
    p.add_argument("root", metavar="ROOT", help="folder holding step-* checkpoint folders")
    p.add_argument("--keep-last", type=_positive, required=True, metavar="N", help="keep the N newest committed checkpoints")
    p.add_argument("--keep-every", type=_positive, default=None, metavar="M", help="also keep every checkpoint whose step is a multiple of M")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_json(p)
    p.set_defaults(run=run)


def prune(root: str, *, keep_last: int, keep_every: int | None = None, dry_run: bool = False) -> dict[str, object]:
    """Apply the retention rules to ``root``; returns the report ``prune --json`` prints."""
    folder = Path(root)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: is not a folder of checkpoints; check the path")
    storage = _files.LocalStorage(folder)
    committed = dict(storage.list_checkpoints())
    remove = steps_to_remove(committed, keep_last=keep_last, keep_every=keep_every)
    removed: list[int] = []
    for step in remove:
        if not dry_run:
            try:
                storage.remove(committed[step])  # uncommitted by a hidden rename, then deleted
            except OSError as exc:
                raise CheckpointWriteError(
                    exc.errno or 0,
                    f"{committed[step]}: could not remove it ({exc.strerror or exc}); removed so far: "
                    f"{removed or 'none'}. Fix the cause and run prune again",
                ) from exc
        removed.append(step)
    return {
        "root": str(folder),
        "dry_run": dry_run,
        "keep_last": keep_last,
        "keep_every": keep_every,
        "kept": sorted(set(committed) - set(remove)),
        "removed": removed,
    }


def run(args: argparse.Namespace) -> int:
    report = prune(args.root, keep_last=args.keep_last, keep_every=args.keep_every, dry_run=args.dry_run)
    if args.json:
        emit_json(report)
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    removed = report["removed"]
    assert isinstance(removed, list)
    for step in removed:
        print(f"{verb} step {step}")
    print(f"kept {len(report['kept'])} checkpoint(s): {report['kept']}; {verb} {len(removed)}")  # type: ignore[arg-type]
    return EXIT_OK

"""``safeckpt prune ROOT --keep-last N [--keep-every M] [--dry-run]``: delete old checkpoints by
the rules :class:`~safeckpt.CheckpointManager` applies (:mod:`safeckpt.retention`), each through
the storage's safe removal: a local folder is uncommitted by a rename before any file goes; in an
object store (``s3://bucket/run``) the manifest is deleted before the data objects. Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from ..retention import steps_to_remove
from . import _files
from ._common import EXIT_OK, add_command, add_json, add_storage_options, emit_json, storage_options

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
        "folders are left alone. Each checkpoint is uncommitted before its files are deleted (renamed "
        "out of sight; in an object store, its manifest.json deleted first), so an interrupted prune "
        "never leaves a half-deleted checkpoint that looks committed.",
    )
    p.add_argument("root", metavar="ROOT", help="folder holding step-* checkpoint folders, or a URL (s3://bucket/run)")
    p.add_argument("--keep-last", type=_positive, required=True, metavar="N", help="keep the N newest committed checkpoints")
    p.add_argument("--keep-every", type=_positive, default=None, metavar="M", help="also keep every checkpoint whose step is a multiple of M")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    add_json(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def prune(
    root: str, *, keep_last: int, keep_every: int | None = None, dry_run: bool = False, storage_options: _files.Options = None
) -> dict[str, object]:
    """Apply the retention rules to ``root``; returns the report ``prune --json`` prints."""
    folder, storage = _files.storage_at(root, storage_options=storage_options)
    if isinstance(folder, Path) and not folder.is_dir():
        raise CheckpointNotFoundError(f"{folder}: is not a folder of checkpoints; check the path")
    if isinstance(folder, _files.ObjectPath) and not storage.exists(folder):
        raise CheckpointNotFoundError(f"{folder}: nothing is stored under this URL; check the bucket and path")
    committed = dict(storage.list_checkpoints())
    remove = steps_to_remove(committed, keep_last=keep_last, keep_every=keep_every)
    removed: list[int] = []
    for step in remove:
        if not dry_run:
            try:
                storage.remove(committed[step])  # uncommitted first (rename, or manifest deleted), then deleted
            except CheckpointError:
                raise
            except Exception as exc:  # OSError locally; the object store's client errors after retries
                raise CheckpointWriteError(
                    getattr(exc, "errno", None) or 0,
                    f"{committed[step]}: could not remove it ({getattr(exc, 'strerror', None) or exc}); removed "
                    f"so far: {removed or 'none'}. Fix the cause and run prune again",
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
    report = prune(
        args.root, keep_last=args.keep_last, keep_every=args.keep_every, dry_run=args.dry_run,
        storage_options=storage_options(args),
    )  # fmt: skip
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

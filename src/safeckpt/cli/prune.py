"""``safeckpt prune ROOT --keep-last N [--keep-every M] [--dry-run]``: delete old checkpoints by
the rules :class:`~safeckpt.CheckpointManager` applies (:mod:`safeckpt.retention`), each through
the storage's safe removal: a local folder is uncommitted by a rename before any file goes; in an
object store (``s3://bucket/run``) the manifest is deleted before the data objects. Torch-free.

Before anything is deleted the checkpoints are stream-verified newest first until one verifies,
and that one is kept whatever the rules say (as ``CheckpointManager`` keeps the one it has just
saved): a damaged newest checkpoint never costs the run its last good one. Those that failed are
reported, and the exit status is 1; when none verifies, nothing is deleted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from ..fallback import try_in_order
from ..retention import steps_to_remove
from . import _files
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    add_json,
    add_storage_options,
    emit_json,
    storage_options,
)

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
        "folders are left alone. The checkpoints are first verified (every file's SHA-256, streamed) "
        "newest first until one verifies; that one is kept even when the rules would delete it, and "
        "those that failed are listed (exit status 1). When none verifies, nothing is deleted. Each "
        "checkpoint is uncommitted before its files are deleted (renamed out of sight; in an object "
        "store, its manifest.json deleted first), so an interrupted prune never leaves a "
        "half-deleted checkpoint that looks committed.",
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
    newest_first = [(step, committed[step], None) for step in sorted(committed, reverse=True)]
    good, failed = try_in_order(lambda path: _verify(path, storage_options), newest_first)
    if good is None and failed:
        listing = "; ".join(f"{path.name}: {why}" for _, path, why in failed)
        raise CheckpointCorruptedError(
            f"{folder}: none of the {len(failed)} committed checkpoint(s) verifies, so nothing was removed "
            f"({listing}); restore a good copy, or remove them by hand"
        )
    protect = () if good is None else (good[0],)  # the newest that verifies: the run's resume point
    remove = steps_to_remove(committed, keep_last=keep_last, keep_every=keep_every, protect=protect)
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
        "verified": None if good is None else good[0],
        "failed": [{"step": step, "path": str(path), "error": why} for step, path, why in failed],
    }


def _verify(path: _files.Location, storage_options: _files.Options) -> None:
    """Stream-verify one checkpoint (as ``safeckpt verify``); raises what a damaged one raises."""
    _files.audit(path, _files.read_manifest(path, storage_options=storage_options), storage_options=storage_options)


def run(args: argparse.Namespace) -> int:
    report = prune(
        args.root, keep_last=args.keep_last, keep_every=args.keep_every, dry_run=args.dry_run,
        storage_options=storage_options(args),
    )  # fmt: skip
    failed = report["failed"]
    assert isinstance(failed, list)
    status = EXIT_FAILED if failed else EXIT_OK
    if args.json:
        emit_json(report)
        return status
    for failure in failed:
        print(f"safeckpt: error: {failure['error']}", file=sys.stderr)
        print(f"FAILED step {failure['step']}: does not verify")
    if failed:
        print(f"kept step {report['verified']}: the newest checkpoint that verifies (training resumes from it)")
    verb = "would remove" if args.dry_run else "removed"
    removed = report["removed"]
    assert isinstance(removed, list)
    for step in removed:
        print(f"{verb} step {step}")
    print(f"kept {len(report['kept'])} checkpoint(s): {report['kept']}; {verb} {len(removed)}")  # type: ignore[arg-type]
    return status

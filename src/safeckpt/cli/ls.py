"""``safeckpt ls ROOT``: every checkpoint of a run with its step, time, size and whether it is
committed (and with ``--verify`` whether it verifies); leftover temporary and trash folders of
interrupted saves and removals are listed apart. Torch-free.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError
from . import _files
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    add_json,
    add_quiet,
    emit_json,
    human_size,
    iso_time,
    progress,
)

__all__ = ["list_root", "register", "run"]

HELP = "list a run's checkpoints: step, time, size, committed or not, and verified with --verify"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "ls",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Folders left by interrupted saves or removals "
        "(.tmp-*, .trash-*) are listed separately; the next save cleans them. Times are the "
        "manifest's 'created' for committed checkpoints, else the folder's modification time (UTC).",
    )
    p.add_argument("root", metavar="ROOT", help="folder holding step-* checkpoint folders")
    p.add_argument("--verify", action="store_true", help="also verify every committed checkpoint (exit 1 if one fails)")
    add_json(p)
    add_quiet(p)
    p.set_defaults(run=run)


def _folder_size(path: Path) -> int:
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _mtime(path: Path) -> str | None:
    try:
        return iso_time(os.lstat(path).st_mtime)
    except OSError:
        return None


def _checkpoint(path: Path, step: int, *, verify: bool, quiet: bool) -> dict[str, object]:
    row: dict[str, object] = {"step": step, "path": str(path), "committed": False, "created": None, "size": None, "files": None}
    if verify:
        row["verified"] = False
    row["error"] = None
    if not (path / _files.MANIFEST_NAME).is_file():
        row.update(created=_mtime(path), size=_folder_size(path), error=f"{_files.MANIFEST_NAME} is missing: never committed")
        return row
    row["committed"] = True
    try:
        manifest = _files.read_manifest(path)
    except CheckpointError as exc:
        row.update(created=_mtime(path), size=_folder_size(path), error=str(exc))
        return row
    size = sum(entry.size for entry in manifest.files) + (path / _files.MANIFEST_NAME).stat().st_size
    row.update(created=manifest.created or _mtime(path), size=size, files=len(manifest.files) + 1)
    if manifest.step != step:
        row["error"] = f"{path / _files.MANIFEST_NAME}: says step {manifest.step}, the folder's name step {step}"
    if verify and row["error"] is None:
        try:
            with progress(size, f"verify {path.name}", quiet=quiet) as bar:
                _files.audit(path, manifest, done=bar.update)
        except CheckpointError as exc:
            row["error"] = str(exc)
        else:
            row["verified"] = True
    return row


def list_root(root: str, *, verify: bool = False, quiet: bool = True) -> dict[str, object]:
    """The report ``ls --json`` prints (see spec/cli/ls.schema.json)."""
    folder = Path(root)
    if (folder / _files.MANIFEST_NAME).is_file():
        raise CheckpointNotFoundError(
            f"{folder}: is a checkpoint, not a root of checkpoints; list {folder.parent} or run "
            f"safeckpt inspect {folder}"
        )
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{folder}: does not exist; check the path") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{folder}: is not a folder; pass the folder holding step-* checkpoints") from None
    checkpoints, leftovers = [], []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        path = folder / entry.name
        step = _files.parse_step(entry.name)
        if step is not None:
            checkpoints.append(_checkpoint(path, step, verify=verify, quiet=quiet))
        elif entry.name.startswith((_files.TMP_PREFIX, _files.TRASH_PREFIX)):
            kind = "temporary" if entry.name.startswith(_files.TMP_PREFIX) else "trash"
            leftovers.append({"path": str(path), "kind": kind, "modified": _mtime(path), "size": _folder_size(path)})
    checkpoints.sort(key=lambda row: int(row["step"]))  # type: ignore[call-overload]
    return {"root": str(folder), "checkpoints": checkpoints, "leftovers": leftovers}


def run(args: argparse.Namespace) -> int:
    report = list_root(args.root, verify=args.verify, quiet=args.quiet)
    checkpoints = report["checkpoints"]
    leftovers = report["leftovers"]
    assert isinstance(checkpoints, list) and isinstance(leftovers, list)
    failed = args.verify and any(row["committed"] and not row["verified"] for row in checkpoints)
    if args.json:
        emit_json(report)
        return EXIT_FAILED if failed else EXIT_OK
    if not checkpoints:
        print(f"{report['root']}: no checkpoints")
    for row in checkpoints:
        state = "committed" if row["committed"] else "UNCOMMITTED"
        if args.verify and row["committed"]:
            state += ", verified" if row.get("verified") else ", FAILED"
        size = human_size(row["size"]) if row["size"] is not None else "?"
        print(f"{row['step']:>10}  {row['created'] or '?':<25} {size:>10}  {state}  {Path(row['path']).name}")
        if row["error"] is not None:
            print(f"{'':>12}{row['error']}")
    if leftovers:
        print("temporary and trash folders (a running save's, or left by an interrupted save or removal; the next save removes dead ones):")
        for row in leftovers:
            print(f"  {row['kind']:<9} {row['modified'] or '?':<25} {human_size(row['size']):>10}  {Path(row['path']).name}")
    return EXIT_FAILED if failed else EXIT_OK

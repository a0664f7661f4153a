"""``safeckpt ls ROOT``: every checkpoint of a run with its step, time, size and whether it is
committed (and with ``--verify`` whether it verifies); leftover temporary and trash folders of
interrupted saves and removals are listed apart. In an object store (``s3://bucket/run``) the
leftovers are the ``objects-*`` upload prefixes no manifest names (spec/FORMAT.md §10.1).
Torch-free.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError
from . import _files
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    add_json,
    add_quiet,
    add_storage_options,
    emit_json,
    human_size,
    iso_time,
    progress,
    storage_options,
)

__all__ = ["list_root", "register", "run"]

HELP = "list a run's checkpoints: step, time, size, committed or not, and verified with --verify"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "ls",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Folders left by interrupted saves or removals "
        "(.tmp-*, .trash-*; in an object store, objects-* uploads no manifest names) are listed "
        "separately; the next save cleans them. Times are the manifest's 'created' for committed "
        "checkpoints, else the folder's modification time or the upload's start (UTC).",
    )
    p.add_argument("root", metavar="ROOT", help="folder holding step-* checkpoint folders, or a URL (s3://bucket/run)")
    p.add_argument("--verify", action="store_true", help="also verify every committed checkpoint (exit 1 if one fails)")
    add_json(p)
    add_quiet(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def _folder_size(path: _files.Location, fs: Any = None) -> int:
    if isinstance(path, _files.ObjectPath):
        return int(fs.du(str(path)))
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _mtime(path: _files.Location) -> str | None:
    if isinstance(path, _files.ObjectPath):
        return None  # a prefix has no time of its own
    try:
        return iso_time(os.lstat(path).st_mtime)
    except OSError:
        return None


def _checkpoint(
    path: _files.Location, step: int, committed: bool, *, verify: bool, quiet: bool, fs: Any, opts: _files.Options
) -> dict[str, object]:
    row: dict[str, object] = {"step": step, "path": str(path), "committed": False, "created": None, "size": None, "files": None}
    if verify:
        row["verified"] = False
    row["error"] = None
    if not committed:
        where = " (its uploads are listed with the leftovers)" if fs is not None else ""
        row.update(created=_mtime(path), size=_folder_size(path, fs), error=f"{_files.MANIFEST_NAME} is missing: never committed{where}")
        return row
    row["committed"] = True
    try:
        manifest = _files.read_manifest(path, storage_options=opts)
    except CheckpointError as exc:
        row.update(created=_mtime(path), size=_folder_size(path, fs), error=str(exc))
        return row
    stored = path / _files.MANIFEST_NAME
    size = sum(e.size for e in manifest.files) + (int(fs.size(str(stored))) if fs is not None else os.stat(str(stored)).st_size)
    row.update(created=manifest.created or _mtime(path), size=size, files=len(manifest.files) + 1)
    if manifest.step != step:
        row["error"] = f"{path / _files.MANIFEST_NAME}: says step {manifest.step}, the folder's name step {step}"
    if verify and row["error"] is None:
        try:
            with progress(size, f"verify {path.name}", quiet=quiet) as bar:
                _files.audit(path, manifest, done=bar.update, storage_options=opts)
        except CheckpointError as exc:
            row["error"] = str(exc)
        else:
            row["verified"] = True
    return row


def list_root(root: str, *, verify: bool = False, quiet: bool = True, storage_options: _files.Options = None) -> dict[str, object]:
    """The report ``ls --json`` prints (see spec/cli/ls.schema.json)."""
    folder, storage = _files.storage_at(root, storage_options=storage_options)
    if storage.committed(folder):
        raise CheckpointNotFoundError(
            f"{folder}: is a checkpoint, not a root of checkpoints; list {folder.parent} or run "
            f"safeckpt inspect {folder}"
        )
    if isinstance(folder, _files.ObjectPath):
        return _list_objects(folder, storage, verify=verify, quiet=quiet, opts=storage_options)
    assert isinstance(storage, _files.LocalStorage)
    try:
        leftovers = [
            {"path": str(path), "kind": kind, "modified": _mtime(path), "size": _folder_size(path)}
            for path, kind in storage.leftovers()
        ]
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{folder}: does not exist; check the path") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{folder}: is not a folder; pass the folder holding step-* checkpoints") from None
    checkpoints = [
        _checkpoint(path, step, committed, verify=verify, quiet=quiet, fs=None, opts=None)
        for step, path, committed in storage.scan_steps()
    ]
    checkpoints.sort(key=lambda row: int(row["step"]))  # type: ignore[call-overload]
    return {"root": str(folder), "checkpoints": checkpoints, "leftovers": leftovers}


def _list_objects(root: _files.ObjectPath, storage: Any, *, verify: bool, quiet: bool, opts: _files.Options) -> dict[str, object]:
    """:func:`list_root` of an object-store root: ``step-*`` prefixes, and as leftovers the
    ``objects-*`` uploads no manifest names (a running save's, an interrupted or losing one's,
    or an overwritten checkpoint's; a save deletes them once stale)."""
    if not storage.exists(root):
        raise CheckpointNotFoundError(f"{root}: nothing is stored under this URL; check the bucket and path")
    fs = storage.fs
    checkpoints = [
        _checkpoint(place, step, committed, verify=verify, quiet=quiet, fs=fs, opts=opts)
        for step, place, committed in storage.scan_steps()
    ]
    leftovers = [
        {"path": str(place), "kind": "upload", "modified": iso_time(started.timestamp()) if started else None, "size": _folder_size(place, fs)}
        for place, started in storage.uploads()
    ]
    return {"root": str(root), "checkpoints": checkpoints, "leftovers": leftovers}


def run(args: argparse.Namespace) -> int:
    report = list_root(args.root, verify=args.verify, quiet=args.quiet, storage_options=storage_options(args))
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
        print(f"{row['step']:>10}  {row['created'] or '?':<25} {size:>10}  {state}  {_tail(row['path'])}")
        if row["error"] is not None:
            print(f"{'':>12}{row['error']}")
    if leftovers:
        print(
            "leftovers: temporary and trash folders or uncommitted uploads (a running save's, or left by an "
            "interrupted save, a removal or an overwrite; saves remove dead or stale ones):"
        )
        for row in leftovers:
            print(f"  {row['kind']:<9} {row['modified'] or '?':<25} {human_size(row['size']):>10}  {_tail(row['path'])}")
    return EXIT_FAILED if failed else EXIT_OK


def _tail(path: str) -> str:
    """The part of a listed path below the root (``step-00000009/objects-...`` for an upload)."""
    parts = path.replace(os.sep, "/").rsplit("/", 2)
    return "/".join(parts[-2:]) if parts[-1].startswith(_files.OBJECTS_PREFIX) else parts[-1]

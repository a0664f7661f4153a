"""``safeckpt verify PATH...``: check every file's size and SHA-256 (whole file and per chunk)
against the manifest, for each path given. Torch-free; memory stays small whatever the size.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError, CheckpointUsageError
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
    progress,
    storage_options,
)

__all__ = ["register", "run"]

HELP = "check every file's size and SHA-256 against the manifest (torch-free)"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "verify",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Every path is checked and reported, even after "
        "one fails; the exit status is 1 if any failed. A root of step-* folders verifies its "
        "newest committed checkpoint (use `safeckpt ls --verify ROOT` for all of them).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint folder, its manifest.json, or a root of step-* folders; or a URL (s3://bucket/run)")
    add_json(p)
    add_quiet(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def verify_one(path: str, *, quiet: bool, storage_options: _files.Options = None) -> dict[str, object]:
    """Verify one path; returns its report (``ok`` False with ``error`` when it failed)."""
    report: dict[str, object] = {"path": path, "ok": False, "checkpoint": None, "step": None, "files": None, "bytes": None, "error": None}
    try:
        folder = _files.locate(path, storage_options=storage_options)
        report["checkpoint"] = str(folder)
        manifest = _files.read_manifest(folder, storage_options=storage_options)
        report["step"] = manifest.step
        total = sum(entry.size for entry in manifest.files)
        with progress(total, f"verify {folder.name}", quiet=quiet) as bar:
            _files.audit(folder, manifest, done=bar.update, storage_options=storage_options)
    except CheckpointUsageError:  # bad arguments, not a bad checkpoint: exit 2 (cli.main)
        raise
    except CheckpointError as exc:
        report["error"] = str(exc)
        return report
    report.update(ok=True, files=len(manifest.files), bytes=total)
    return report


def run(args: argparse.Namespace) -> int:
    reports = []
    for path in args.paths:
        report = verify_one(path, quiet=args.quiet, storage_options=storage_options(args))
        reports.append(report)
        if args.json:
            continue
        if report["ok"]:
            size = report["bytes"]
            assert isinstance(size, int)
            print(f"OK {path}: step {report['step']}, {report['files']} files, {human_size(size)} verified")
        else:
            print(f"safeckpt: error: {report['error']}", file=sys.stderr)
            print(f"FAILED {path}")
    ok = all(report["ok"] for report in reports)
    if args.json:
        emit_json({"ok": ok, "checkpoints": reports})
    return EXIT_OK if ok else EXIT_FAILED

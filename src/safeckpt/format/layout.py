"""What the names in a root of checkpoints mean: ``step-N`` folders, temporary and trash folders,
an object store's ``objects-*`` prefixes.

Pure (no I/O): the storage implementations (:mod:`safeckpt.storage.posix_commit`,
:mod:`safeckpt.storage.objectstore`) create and list these names, and the readers and the CLI
tell a checkpoint from a leftover by them. Readers consider only ``step-<digits>`` names; every
name a writer uses while it works starts with a dot (or, in an object store, sits below the
``step-N`` prefix), so no reader ever mistakes it for a checkpoint.
"""

from __future__ import annotations

import datetime
import re

__all__ = [
    "LOCK_NAME",
    "OBJECTS_PREFIX",
    "STEP_DIGITS",
    "STEP_PREFIX",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "deleted_name",
    "objects_name",
    "objects_started",
    "parse_step",
    "step_dirname",
    "temporary_name",
    "trash_name",
    "trashed_original",
]

STEP_PREFIX = "step-"
STEP_DIGITS = 8
"""Steps are zero-padded to this many digits so that listings sort by step (longer ones still parse)."""
TMP_PREFIX = ".tmp-"
"""Temporary folders being written (or left by a writer that died): ``.tmp-<final name>.<id>``."""
TRASH_PREFIX = ".trash-"
"""Folders on their way out: ``.trash-step-S.<id>`` (moved aside by an overwrite, restored if the
new folder never arrived) and ``.trash-deleted.<id>`` (pruned, only to be deleted)."""
LOCK_NAME = ".safeckpt.lock"
"""Lock file in the root folder; held only briefly, around creating and renaming folders."""
OBJECTS_PREFIX = "objects-"
"""Object stores: one save's files live under ``step-N/objects-<UTC start>-<random>/``."""

_DELETED = "deleted."
_STEP_NAME = re.compile(r"step-([0-9]{1,19})")
_STAMP = "%Y%m%dT%H%M%SZ"


def step_dirname(step: int) -> str:
    """Folder name for ``step``; zero-padded so listings sort by step."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    """The step a checkpoint folder name encodes, or None if it is not one."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def temporary_name(final: str, unique: str) -> str:
    """The hidden sibling a checkpoint named ``final`` is written in before its commit."""
    return f"{TMP_PREFIX}{final}.{unique}"


def trash_name(original: str, unique: str) -> str:
    """The hidden name a checkpoint moved aside by an overwrite waits under (restorable)."""
    return f"{TRASH_PREFIX}{original}.{unique}"


def deleted_name(unique: str) -> str:
    """The hidden name a folder is renamed to before its files are deleted (never restored)."""
    return f"{TRASH_PREFIX}{_DELETED}{unique}"


def trashed_original(name: str) -> str | None:
    """The name a trash folder had before an overwrite moved it aside; None for a folder being
    deleted (:func:`deleted_name`) or a name that is not trash at all."""
    if not name.startswith(TRASH_PREFIX) or name.startswith(TRASH_PREFIX + _DELETED):
        return None
    return name[len(TRASH_PREFIX) :].rsplit(".", 1)[0]


def objects_name(started: datetime.datetime, unique: str) -> str:
    """The prefix of one save's files in an object store, stamped with when it began (UTC)."""
    return f"{OBJECTS_PREFIX}{started.strftime(_STAMP)}-{unique}"


def objects_started(name: str) -> datetime.datetime | None:
    """When the save that wrote the prefix ``name`` began; None if ``name`` carries no stamp."""
    try:
        stamp = name[len(OBJECTS_PREFIX) :].split("-", 1)[0]
        return datetime.datetime.strptime(stamp, _STAMP).replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None

"""Pick the storage a location lives in: a local path, or an fsspec URL (``s3://bucket/run``).

The one place that tells local paths from object-store URLs. ``file://`` URLs are local paths
(the POSIX commit protocol, with its atomic rename, is stronger than any object store's); every
other ``protocol://`` goes to :class:`~safeckpt.storage.objectstore.ObjectStorage`, which
imports fsspec only when first used, so ``import safeckpt`` never does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointUsageError
from .base import CheckpointStorage, Location, ObjectPath
from .local import LocalStorage

__all__ = ["as_location", "storage_for"]

_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)


def as_location(value: str | os.PathLike[str] | ObjectPath) -> Location:
    """``value`` as a :class:`~pathlib.Path` or, for a URL other than ``file://``, an
    :class:`~safeckpt.storage.base.ObjectPath`."""
    if isinstance(value, (Path, ObjectPath)):
        return value
    text = os.fspath(value)
    match = _URL.fullmatch(text)
    if match is None:
        return Path(text)
    protocol, rest = match.group(1).lower(), match.group(2).rstrip("/")
    if protocol == "file":
        return Path(rest or "/")
    return ObjectPath(protocol, rest)


def storage_for(root: Location, storage_options: Mapping[str, Any] | None = None) -> CheckpointStorage:
    """The storage holding ``root`` (a root of checkpoints, or the parent of one checkpoint).

    ``storage_options`` go to the fsspec file system (e.g. ``{"endpoint_url": ...}`` for s3fs);
    they are refused for a local path, where they would be silently ignored.
    """
    if isinstance(root, ObjectPath):
        from .objectstore import ObjectStorage

        return ObjectStorage(root, storage_options)
    if storage_options:
        raise CheckpointUsageError(
            f"{root}: storage_options= applies to fsspec URLs (s3://..., memory://...), not to a "
            "local path; drop it or pass a URL"
        )
    return LocalStorage(root)

"""The command line's torch-free access to checkpoints, local or behind an fsspec URL: locate
one, read its manifest, verify its files with a progress bar, and list archives' tensors from
their headers alone.

Every core function the torch-free commands (``verify``, ``inspect``, ``ls``, ``prune``) use is
imported here, so that moving core modules changes this file only. ``storage_options`` are the
fsspec options of a URL (``--storage-option``); None for local paths.
"""

from __future__ import annotations

import concurrent.futures
import functools
import mmap
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointCorruptedError
from ..format.documents import load_json
from ..format.layout import OBJECTS_PREFIX
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from ..format.safetensors import TensorInfo, header_end, parse_header
from ..pipeline.read import locate_checkpoint, model_aliases
from ..storage.base import CheckpointFolder, CheckpointStorage, Location, ObjectPath
from ..storage.local import LocalFolder, LocalStorage
from ..storage.locate import as_location, storage_for
from ..storage.objectstore import ObjectFolder, ObjectStorage

__all__ = [
    "MANIFEST_NAME",
    "OBJECTS_PREFIX",
    "LocalStorage",
    "Location",
    "Manifest",
    "ObjectPath",
    "Options",
    "TensorInfo",
    "archive_headers",
    "audit",
    "decode_document",
    "files_of",
    "locate",
    "mapped_files",
    "model_aliases",
    "read_document",
    "read_manifest",
    "read_verified",
    "storage_at",
]

Options = Mapping[str, Any] | None
"""fsspec ``storage_options`` for a URL (None: none given, or a local path)."""


def files_of(part: str) -> tuple[str, ...]:
    """The files that hold ``part``: ``model``, ``config``, ``vocab`` or a state tree."""
    if part == "model":
        return ("model.safetensors",)
    if part in ("config", "vocab"):
        return (f"{part}.json",)
    return (f"{part}.msgpack", f"{part}.safetensors")


def decode_document(part: str, buffers: Mapping[str, memoryview], folder: Location) -> object | None:
    """``config`` or ``vocab`` from its verified bytes (None when the checkpoint has none)."""
    name = f"{part}.json"
    return load_json(bytes(buffers[name]), source=str(folder / name)) if name in buffers else None


def read_document(
    folder: Location, manifest: Manifest, part: str, *, done: Callable[[int], object] = lambda size: None, storage_options: Options = None
) -> object | None:
    """Read, verify and parse ``config`` or ``vocab``."""
    entries = [entry for entry in manifest.files if entry.name in files_of(part)]
    return decode_document(part, read_verified(folder, entries, done=done, storage_options=storage_options), folder)


def locate(path: str | os.PathLike[str], *, storage_options: Options = None) -> Location:
    """The checkpoint ``path`` names (a folder, its manifest, or a root: the newest).

    ``path`` may be an fsspec URL (``s3://bucket/run``; credentials and endpoint from
    ``storage_options``, else from the environment as s3fs reads them): an ``ObjectPath`` comes
    back. A local file that is not a checkpoint (a ``.pt`` file, say) is named for what it is.
    """
    return locate_checkpoint(as_location(path), storage_options=storage_options)


def storage_at(root: str | os.PathLike[str], *, storage_options: Options = None) -> tuple[Location, CheckpointStorage]:
    """A root of checkpoints (a local folder or a URL) and the storage holding it."""
    location = as_location(root)
    return location, storage_for(location, storage_options)


def _open(folder: Location, storage_options: Options) -> CheckpointFolder:
    """``folder`` opened through the storage that holds it (local folder or object store)."""
    return LocalFolder(folder) if isinstance(folder, Path) else storage_for(folder.parent, storage_options).open(folder)


def read_manifest(folder: Location, *, storage_options: Options = None) -> Manifest:
    """Parse and validate ``folder``'s manifest (nothing else is read)."""
    with _open(folder, storage_options) as opened:
        manifest = opened.read_manifest()
    if manifest.file("model.safetensors") is None:
        raise CheckpointCorruptedError(
            f"{folder / MANIFEST_NAME}: does not list model.safetensors; the checkpoint is invalid"
        )
    return manifest


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _each_file(
    folder: Location,
    entries: list[FileEntry],
    job: Callable[[CheckpointFolder, FileEntry], object],
    done: Callable[[int], object],
    storage_options: Options,
) -> list[object]:
    """Run ``job(opened_folder, entry)`` for every entry on a few threads, largest first; ``done(size)``
    after each. After an error no further file is started; the first error (in that order) is
    raised once the running ones have stopped."""
    ordered = sorted(entries, key=lambda e: -e.size)
    with _open(folder, storage_options) as opened, concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        futures = [pool.submit(job, opened, entry) for entry in ordered]
        for future, entry in zip(futures, ordered, strict=True):
            future.add_done_callback(functools.partial(_report, done, entry.size))
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in futures:  # after a failure, files not started yet are not read at all
            future.cancel()
        concurrent.futures.wait(futures)
        failed = [f for f in futures if not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        return [future.result() for future in futures]


def _report(done: Callable[[int], object], size: int, future: concurrent.futures.Future[object]) -> None:
    if not future.cancelled() and future.exception() is None:
        done(size)


def audit(
    folder: Location,
    manifest: Manifest,
    *,
    names: Collection[str] | None = None,
    done: Callable[[int], object] = lambda size: None,
    storage_options: Options = None,
) -> None:
    """Check every file's size and every digest the manifest records (as ``verify_checkpoint``),
    streaming through small buffers; ``done(size)`` is called as each file passes. ``names``
    limits it to those files (None: all)."""
    entries = [entry for entry in manifest.files if names is None or entry.name in names]
    _each_file(folder, entries, lambda opened, entry: opened.audit([entry]), done, storage_options)


def read_verified(
    folder: Location, entries: list[FileEntry], *, done: Callable[[int], object] = lambda size: None, storage_options: Options = None
) -> dict[str, memoryview]:
    """Read and verify the files ``entries`` name (size and digests); returns their bytes.

    Nothing is returned unless every one of them verified."""
    results = _each_file(
        folder, entries, lambda opened, entry: opened.read_files([entry], verify=True), done, storage_options
    )
    buffers: dict[str, memoryview] = {}
    for result in results:
        assert isinstance(result, dict)
        buffers.update(result)
    return buffers


@contextmanager
def mapped_files(folder: Location, manifest: Manifest, *, storage_options: Options = None) -> Iterator[dict[str, memoryview]]:
    """Every file as a lazy memory map (sizes checked, nothing read until touched).

    In an object store, each ``.safetensors`` object is a zero-filled anonymous map of its size
    holding only what :func:`archive_headers` reads (fetched by byte ranges); the JSON documents
    are downloaded whole. Nothing is verified.
    """
    if isinstance(folder, ObjectPath):
        maps = _remote_heads(folder, manifest, storage_options)
    else:
        with LocalFolder(folder) as opened:
            maps = opened.read_files(manifest.files, verify=False)
    try:
        yield maps
    finally:
        for view in maps.values():
            owner = view.obj
            view.release()
            close = getattr(owner, "close", None)
            if callable(close):
                try:
                    close()
                except BufferError:  # still exported elsewhere: the garbage collector unmaps it
                    pass


def _remote_heads(folder: ObjectPath, manifest: Manifest, storage_options: Options) -> dict[str, memoryview]:
    with ObjectStorage(folder.parent, storage_options).open(folder) as opened:
        opened.read_manifest()
        documents = [e for e in manifest.files if not e.name.endswith(".safetensors")]
        views = dict(opened.read_files(documents, verify=False))
        for entry in manifest.files:
            if entry.name.endswith(".safetensors"):
                views[entry.name] = _remote_head(opened, folder, entry)
    return views


def _remote_head(opened: ObjectFolder, folder: ObjectPath, entry: FileEntry) -> memoryview:
    """``entry``'s archive as a lazily allocated buffer holding its header and the bytes of its
    bool tensors (which the strict parser checks), fetched by byte ranges; zeros elsewhere."""
    view = memoryview(mmap.mmap(-1, entry.size) if entry.size else bytearray())
    if entry.size < 8:
        return view
    view[:8] = opened.read_range(entry, 0, 8)
    end = header_end(view[:8], total=entry.size, source=str(folder / entry.name))
    view[8:end] = opened.read_range(entry, 8, end)
    tensors, _ = parse_header(view, source=str(folder / entry.name))  # (the zeros pass as bools)
    for info in tensors:
        if info.dtype == "BOOL" and info.end > info.begin:
            view[info.begin : info.end] = opened.read_range(entry, info.begin, info.end)
    return view


def archive_headers(folder: Location, maps: dict[str, memoryview]) -> dict[str, tuple[list[TensorInfo], dict[str, str]]]:
    """Tensors and metadata of every ``.safetensors`` file, parsed strictly from the header only.

    Each file is a memory map, so only the pages of the 8-byte length and the header JSON (and of
    any bool tensor, whose bytes the parser checks are 0 or 1) are read from disk.
    """
    return {
        name: parse_header(view, source=str(folder / name))
        for name, view in sorted(maps.items())
        if name.endswith(".safetensors")
    }

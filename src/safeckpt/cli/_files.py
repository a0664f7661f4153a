"""The command line's torch-free access to checkpoints: locate one, read its manifest, verify
its files with a progress bar, and list archives' tensors from their headers alone.

Every core function the torch-free commands (``verify``, ``inspect``, ``ls``, ``prune``) use is
imported here, so that moving core modules changes this file only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointCorruptedError, CheckpointNotFoundError
from ..format.documents import load_json
from ..format.layout import STEP_PREFIX, TMP_PREFIX, TRASH_PREFIX, parse_step
from ..format.manifest import MANIFEST_NAME, FileEntry, Manifest
from ..format.safetensors import TensorInfo, parse_header
from ..pipeline.read import locate_checkpoint, locate_local, model_aliases
from ..storage.base import CheckpointFolder, Location
from ..storage.local import LocalFolder, LocalStorage
from ..storage.locate import storage_for

__all__ = [
    "MANIFEST_NAME",
    "STEP_PREFIX",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "LocalStorage",
    "Manifest",
    "TensorInfo",
    "archive_headers",
    "audit",
    "decode_document",
    "files_of",
    "locate",
    "mapped_files",
    "model_aliases",
    "parse_step",
    "read_document",
    "read_manifest",
    "read_verified",
]


def files_of(part: str) -> tuple[str, ...]:
    """The files that hold ``part``: ``model``, ``config``, ``vocab`` or a state tree."""
    if part == "model":
        return ("model.safetensors",)
    if part in ("config", "vocab"):
        return (f"{part}.json",)
    return (f"{part}.msgpack", f"{part}.safetensors")


def decode_document(part: str, buffers: Mapping[str, memoryview], folder: Path) -> object | None:
    """``config`` or ``vocab`` from its verified bytes (None when the checkpoint has none)."""
    name = f"{part}.json"
    return load_json(bytes(buffers[name]), source=str(folder / name)) if name in buffers else None


def read_document(folder: Path, manifest: Manifest, part: str, *, done: Callable[[int], object] = lambda size: None) -> object | None:
    """Read, verify and parse ``config`` or ``vocab``."""
    entries = [entry for entry in manifest.files if entry.name in files_of(part)]
    return decode_document(part, read_verified(folder, entries, done=done), folder)


def locate(path: str | os.PathLike[str], *, remote: bool = False) -> Path:
    """The checkpoint folder ``path`` names (a folder, its manifest, or a root: the newest).

    A file that is not a checkpoint (a ``.pt`` file, say) is named for what it is. With
    ``remote``, ``path`` may also be an fsspec URL (``s3://bucket/run``; credentials and endpoint
    from the environment, as s3fs reads them), and an ``ObjectPath`` may come back.
    """
    from ._common import describe_file

    description = describe_file(Path(path))
    if description is not None:
        raise CheckpointNotFoundError(description)
    return locate_checkpoint(path) if remote else locate_local(path)  # type: ignore[return-value]


def _open(folder: Location) -> CheckpointFolder:
    """``folder`` opened through the storage that holds it (local folder or object store)."""
    return LocalFolder(folder) if isinstance(folder, Path) else storage_for(folder.parent).open(folder)


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate ``folder``'s manifest (nothing else is read)."""
    with _open(folder) as opened:
        manifest = opened.read_manifest()
    if manifest.file("model.safetensors") is None:
        raise CheckpointCorruptedError(
            f"{folder / MANIFEST_NAME}: does not list model.safetensors; the checkpoint is invalid"
        )
    return manifest


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _each_file(
    folder: Path, entries: list[FileEntry], job: Callable[[CheckpointFolder, FileEntry], object], done: Callable[[int], object]
) -> list[object]:
    """Run ``job(opened_folder, entry)`` for every entry on a few threads, largest first; ``done(size)``
    after each. After an error no further file is started; the first error (in that order) is
    raised once the running ones have stopped."""
    ordered = sorted(entries, key=lambda e: -e.size)
    with _open(folder) as opened, concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
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


def audit(folder: Path, manifest: Manifest, *, done: Callable[[int], object] = lambda size: None) -> None:
    """Check every file's size and every digest the manifest records (as ``verify_checkpoint``),
    streaming through small buffers; ``done(size)`` is called as each file passes."""
    _each_file(folder, list(manifest.files), lambda opened, entry: opened.audit([entry]), done)


def read_verified(
    folder: Path, entries: list[FileEntry], *, done: Callable[[int], object] = lambda size: None
) -> dict[str, memoryview]:
    """Read and verify the files ``entries`` name (size and digests); returns their bytes.

    Nothing is returned unless every one of them verified."""
    results = _each_file(folder, entries, lambda opened, entry: opened.read_files([entry], verify=True), done)
    buffers: dict[str, memoryview] = {}
    for result in results:
        assert isinstance(result, dict)
        buffers.update(result)
    return buffers


@contextmanager
def mapped_files(folder: Path, manifest: Manifest) -> Iterator[dict[str, memoryview]]:
    """Every file as a lazy memory map (sizes checked, nothing read until touched)."""
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


def archive_headers(folder: Path, maps: dict[str, memoryview]) -> dict[str, tuple[list[TensorInfo], dict[str, str]]]:
    """Tensors and metadata of every ``.safetensors`` file, parsed strictly from the header only.

    Each file is a memory map, so only the pages of the 8-byte length and the header JSON (and of
    any bool tensor, whose bytes the parser checks are 0 or 1) are read from disk.
    """
    return {
        name: parse_header(view, source=str(folder / name))
        for name, view in sorted(maps.items())
        if name.endswith(".safetensors")
    }

"""``sharding.json``: DCP's metadata (which chunk of which tensor lives where) as strict JSON.

torch.distributed.checkpoint keeps this in a pickled ``.metadata`` file; safeckpt writes it as a
JSON document that names, for every entry of the flattened state dict, either the chunks of a
tensor (offsets and sizes inside the full tensor, and the shard file and tensor name holding
each chunk) or the shard file holding a non-tensor value, plus the path that rebuilds the nested
state dict. :func:`parse_sharding` validates it completely before DCP sees any of it: names of
files listed in the manifest only, chunk boxes inside their tensor, chunks that tile each tensor
exactly (no gap, no overlap), paths that spell their key. It needs no torch (the numpy reader
uses it too); the Reader turns a :class:`Sharding` into DCP's ``Metadata``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import LOAD_EARLIER, CheckpointCorruptedError, UnsupportedValueError, damaged, short
from ..format import limits
from ..format.documents import load_json
from ..format.manifest import FileEntry, check_file_name
from ..format.safetensors import DTYPE_SIZES
from ..pipeline.read import SHARDING_NAME

__all__ = [
    "MAX_CHUNKS_PER_TENSOR",
    "MAX_SHARDING_BYTES",
    "SHARDING_FORMAT",
    "SHARDING_NAME",
    "SHARDING_VERSION",
    "Chunk",
    "Location",
    "Sharding",
    "TensorEntry",
    "dump_sharding",
    "parse_sharding",
]

SHARDING_FORMAT = "safeckpt-sharding"
SHARDING_VERSION = 1
MAX_SHARDING_BYTES = 256 * 1024 * 1024
"""Largest ``sharding.json`` a reader accepts (about a million chunks)."""
MAX_CHUNKS_PER_TENSOR = 65536
"""Most chunks one tensor may be split into (bounds the overlap check)."""

_KEYS = {"format", "version", "world_size", "tensors", "values", "paths"}


@dataclass(frozen=True)
class Location:
    """Where one chunk or value is stored: a shard file and the name inside it."""

    file: str
    name: str
    shape: tuple[int, ...] | None = None
    """A chunk's shape (as read from ``sharding.json``; None for values and while writing)."""


@dataclass(frozen=True)
class Chunk:
    """One box of a tensor: ``offsets`` .. ``offsets + sizes``, stored at ``location``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    location: Location


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the flattened state dict: dtype (safetensors name), full shape, its chunks."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Sharding:
    """A parsed ``sharding.json``."""

    world_size: int
    tensors: dict[str, TensorEntry]
    values: dict[str, Location]
    """Non-tensor entries: the ``.msgpack`` shard holding each (under its key)."""
    paths: dict[str, tuple[str | int, ...]]
    """Where each key goes in the nested state dict."""

    def files(self) -> set[str]:
        """Names of every shard file the document refers to."""
        found = {location.file for location in self.values.values()}
        found.update(chunk.location.file for entry in self.tensors.values() for chunk in entry.chunks)
        return found


def dump_sharding(
    tensors: Mapping[str, TensorEntry],
    values: Mapping[str, Location],
    paths: Mapping[str, tuple[str | int, ...]],
    world_size: int,
) -> bytes:
    """Encode ``sharding.json`` (deterministic: sorted keys, compact)."""
    doc = {
        "format": SHARDING_FORMAT,
        "version": SHARDING_VERSION,
        "world_size": world_size,
        "tensors": {
            key: {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.location.file, "name": c.location.name}
                    for c in entry.chunks
                ],
            }
            for key, entry in sorted(tensors.items())
        },
        "values": {key: {"file": location.file} for key, location in sorted(values.items())},
        "paths": {key: list(path) for key, path in sorted(paths.items())},
    }
    data = (json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()
    if len(data) > MAX_SHARDING_BYTES:
        raise UnsupportedValueError(
            f"{SHARDING_NAME}: would be {len(data)} bytes, over the limit of {MAX_SHARDING_BYTES} "
            "that readers accept; save fewer, larger tensors or on fewer ranks"
        )
    return data


def _is_int(value: object, low: int = 0, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class _Parser:
    def __init__(self, source: str, files: Mapping[str, FileEntry]) -> None:
        self.source = source
        self.files = files

    def fail(self, what: str) -> CheckpointCorruptedError:
        cause = "the checkpoint is damaged or was not written by safeckpt"
        return damaged(self.source, f"invalid sharding document: {what}", cause=cause, fix=LOAD_EARLIER)

    def file(self, name: object, suffix: str, where: str) -> str:
        if not isinstance(name, str) or not name.endswith(suffix):
            raise self.fail(f"{where}: 'file' must name a {suffix} file, found {short(name)}")
        check_file_name(name, source=self.source)
        if name not in self.files:
            raise self.fail(f"{where}: file {name!r} is not listed in manifest.json")
        return name

    def ints(self, value: object, count: int, what: str) -> list[int]:
        if not isinstance(value, list) or len(value) != count or not all(_is_int(v) for v in value):
            raise self.fail(f"{what} must be a list of {count} non-negative integers, found {short(value)}")
        return value

    def tensor(self, fqn: str, entry: object) -> TensorEntry:
        where = f"tensor {short(fqn)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "chunks"}:
            raise self.fail(f"{where} must be an object with exactly dtype, shape and chunks")
        dtype = entry["dtype"]
        if dtype not in DTYPE_SIZES:
            raise self.fail(f"{where} has unsupported dtype {short(dtype)}")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > limits.MAX_TENSOR_NDIM:
            raise self.fail(f"{where} has an invalid shape {short(shape)}")
        shape = self.ints(shape, len(shape), f"{where}: shape")
        if math.prod(max(d, 1) for d in shape) >= 2**63:
            raise self.fail(f"{where} has shape {shape}, too large")
        chunks = entry["chunks"]
        if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS_PER_TENSOR:
            raise self.fail(f"{where}: 'chunks' must be a list of 1 to {MAX_CHUNKS_PER_TENSOR} chunks")
        parsed: list[Chunk] = []
        volume = 0
        for number, chunk in enumerate(chunks):
            at = f"{where}, chunk {number}"
            if not isinstance(chunk, dict) or set(chunk) != {"offsets", "sizes", "file", "name"}:
                raise self.fail(f"{at} must be an object with exactly offsets, sizes, file and name")
            offsets = self.ints(chunk["offsets"], len(shape), f"{at}: offsets")
            sizes = self.ints(chunk["sizes"], len(shape), f"{at}: sizes")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
                raise self.fail(f"{at}: box at {offsets} of size {sizes} lies outside the tensor's shape {shape}")
            if not isinstance(chunk["name"], str) or not chunk["name"]:
                raise self.fail(f"{at}: 'name' must be a non-empty string")
            location = Location(self.file(chunk["file"], ".safetensors", at), chunk["name"], tuple(sizes))
            parsed.append(Chunk(tuple(offsets), tuple(sizes), location))
            volume += math.prod(sizes)
        if volume != math.prod(shape):
            raise self.fail(f"{where}: its chunks hold {volume} elements, the tensor has {math.prod(shape)}")
        self.check_disjoint(where, parsed)
        return TensorEntry(dtype, tuple(shape), tuple(parsed))

    def check_disjoint(self, where: str, chunks: list[Chunk]) -> None:
        """No two chunks overlap (with equal volumes, they then tile the tensor exactly)."""
        boxes = sorted(
            ((list(c.offsets), list(c.sizes)) for c in chunks if math.prod(c.sizes) > 0),
            key=lambda box: box[0][0] if box[0] else 0,
        )
        active: list[tuple[list[int], list[int]]] = []
        for offsets, sizes in boxes:
            if offsets:  # keep only boxes whose first dimension still reaches this one's start
                active = [b for b in active if b[0][0] + b[1][0] > offsets[0]]
            for other in active:
                if all(o < oo + ss and oo < o + s for o, s, oo, ss in zip(offsets, sizes, *other, strict=True)):
                    raise self.fail(f"{where}: chunks at {other[0]} and {offsets} overlap")
            active.append((offsets, sizes))

    def path(self, fqn: str, path: object) -> tuple[str | int, ...]:
        if (
            not isinstance(path, list)
            or not 1 <= len(path) <= limits.MAX_NESTING_DEPTH
            or not all(isinstance(p, str) or _is_int(p) for p in path)
            or ".".join(map(str, path)) != fqn
        ):
            raise self.fail(f"path of {short(fqn)} must be a list of keys and indices joined by '.' into it, found {short(path)}")
        return tuple(path)


def parse_sharding(data: bytes | bytearray | memoryview, *, files: Mapping[str, FileEntry], source: str) -> Sharding:
    """Parse and validate verified ``sharding.json`` bytes against the manifest's ``files``."""
    parser = _Parser(source, files)
    doc = load_json(data, source=source, limit=MAX_SHARDING_BYTES)
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        raise parser.fail(f"expected an object with exactly the keys {sorted(_KEYS)}")
    if doc["format"] != SHARDING_FORMAT:
        raise parser.fail(f"'format' is {short(doc['format'])}, expected {SHARDING_FORMAT!r}")
    if doc["version"] != SHARDING_VERSION or not _is_int(doc["version"]):
        raise CheckpointCorruptedError(
            f"{source}: sharding version {short(doc['version'])} is not supported (this reader "
            f"reads version {SHARDING_VERSION}); upgrade safeckpt"
        )
    if not _is_int(doc["world_size"], 1, 2**31):
        raise parser.fail(f"'world_size' is {short(doc['world_size'])}, expected a positive integer")
    tensors, values, paths = doc["tensors"], doc["values"], doc["paths"]
    if not isinstance(tensors, dict) or not isinstance(values, dict) or not isinstance(paths, dict):
        raise parser.fail("'tensors', 'values' and 'paths' must be objects")
    parsed_tensors = {fqn: parser.tensor(fqn, entry) for fqn, entry in tensors.items()}
    parsed_values: dict[str, Location] = {}
    for fqn, entry in values.items():
        if fqn in parsed_tensors:
            raise parser.fail(f"{short(fqn)} is both a tensor and a value")
        if not isinstance(entry, dict) or set(entry) != {"file"}:
            raise parser.fail(f"value {short(fqn)} must be an object with exactly 'file'")
        parsed_values[fqn] = Location(parser.file(entry["file"], ".msgpack", f"value {short(fqn)}"), fqn)
    keys = set(parsed_tensors) | set(parsed_values)
    if set(paths) != keys:
        extra = sorted(set(paths) ^ keys)[:3]
        raise parser.fail(f"'paths' must list exactly the tensors and values (differs at {extra})")
    parsed_paths = {fqn: parser.path(fqn, path) for fqn, path in paths.items()}
    return Sharding(doc["world_size"], parsed_tensors, parsed_values, parsed_paths)

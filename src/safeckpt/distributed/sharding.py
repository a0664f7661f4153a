"""``sharding.json``: DCP's metadata (which chunk of which tensor lives where) as strict JSON.

torch.distributed.checkpoint keeps this in a pickled ``.metadata`` file; safeckpt writes it as a
JSON document that names, for every entry of the flattened state dict, either the chunks of a
tensor (offsets and sizes inside the full tensor, and the shard file and tensor name holding
each chunk) or the shard file holding a non-tensor value, plus the path that rebuilds the nested
state dict. :func:`parse_sharding` validates it completely before DCP sees any of it: names of
files listed in the manifest only, chunk boxes inside their tensor, chunks that tile each tensor
exactly (no gap, no overlap), paths that spell their key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from .. import limits
from ..errors import CheckpointCorruptedError, UnsupportedValueError
from ._core import DTYPE_NAMES, TORCH_DTYPES, FileEntry, check_file_name, load_json

__all__ = [
    "MAX_CHUNKS_PER_TENSOR",
    "MAX_SHARDING_BYTES",
    "SHARDING_FORMAT",
    "SHARDING_NAME",
    "SHARDING_VERSION",
    "Location",
    "Sharding",
    "dump_sharding",
    "parse_sharding",
]

SHARDING_NAME = "sharding.json"
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
class Sharding:
    """A parsed ``sharding.json``: DCP metadata plus the world size that wrote it."""

    metadata: Metadata
    world_size: int

    @property
    def locations(self) -> dict[MetadataIndex, Location]:
        return self.metadata.storage_data

    def files(self) -> set[str]:
        """Names of every shard file the document refers to."""
        return {location.file for location in self.locations.values()}


def dump_sharding(metadata: Metadata, locations: Mapping[MetadataIndex, Location], world_size: int) -> bytes:
    """Encode DCP's global metadata and where each item was written as ``sharding.json``."""
    tensors: dict[str, object] = {}
    values: dict[str, object] = {}
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, BytesStorageMetadata):
            values[fqn] = {"file": locations[MetadataIndex(fqn)].file}
            continue
        dtype = DTYPE_NAMES.get(md.properties.dtype)
        if dtype is None:
            raise UnsupportedValueError(f"{fqn}: tensor dtype {md.properties.dtype} is not one the format stores")
        chunks = []
        for chunk in md.chunks:
            where = locations[MetadataIndex(fqn, chunk.offsets)]
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": where.file, "name": where.name})
        tensors[fqn] = {"dtype": dtype, "shape": list(md.size), "chunks": chunks}
    paths = {fqn: list(path) for fqn, path in sorted((metadata.planner_data or {}).items())}
    doc = {
        "format": SHARDING_FORMAT,
        "version": SHARDING_VERSION,
        "world_size": world_size,
        "tensors": tensors,
        "values": values,
        "paths": paths,
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class _Parser:
    def __init__(self, source: str, files: Mapping[str, FileEntry]) -> None:
        self.source = source
        self.files = files

    def fail(self, what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(
            f"{self.source}: invalid sharding document: {what}. The checkpoint is damaged or was "
            "not written by safeckpt; load an earlier checkpoint."
        )

    def file(self, name: object, suffix: str, where: str) -> str:
        if not isinstance(name, str) or not name.endswith(suffix):
            raise self.fail(f"{where}: 'file' must name a {suffix} file, found {_short(name)}")
        check_file_name(name, source=self.source)
        if name not in self.files:
            raise self.fail(f"{where}: file {name!r} is not listed in manifest.json")
        return name

    def ints(self, value: object, count: int, what: str) -> list[int]:
        if not isinstance(value, list) or len(value) != count or not all(_is_int(v) for v in value):
            raise self.fail(f"{what} must be a list of {count} non-negative integers, found {_short(value)}")
        return value

    def tensor(self, fqn: str, entry: object) -> tuple[TensorStorageMetadata, list[tuple[MetadataIndex, Location]]]:
        where = f"tensor {_short(fqn)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "chunks"}:
            raise self.fail(f"{where} must be an object with exactly dtype, shape and chunks")
        dtype = entry["dtype"]
        if dtype not in TORCH_DTYPES:
            raise self.fail(f"{where} has unsupported dtype {_short(dtype)}")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > limits.MAX_TENSOR_NDIM:
            raise self.fail(f"{where} has an invalid shape {_short(shape)}")
        shape = self.ints(shape, len(shape), f"{where}: shape")
        if math.prod(max(d, 1) for d in shape) >= 2**63:
            raise self.fail(f"{where} has shape {shape}, too large")
        chunks = entry["chunks"]
        if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS_PER_TENSOR:
            raise self.fail(f"{where}: 'chunks' must be a list of 1 to {MAX_CHUNKS_PER_TENSOR} chunks")
        parsed: list[ChunkStorageMetadata] = []
        located: list[tuple[MetadataIndex, Location]] = []
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
            parsed.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            located.append((MetadataIndex(fqn, offsets), location))
            volume += math.prod(sizes)
        if volume != math.prod(shape):
            raise self.fail(f"{where}: its chunks hold {volume} elements, the tensor has {math.prod(shape)}")
        self.check_disjoint(where, parsed)
        md = TensorStorageMetadata(
            properties=TensorProperties(dtype=TORCH_DTYPES[dtype]), size=torch.Size(shape), chunks=parsed
        )
        return md, located

    def check_disjoint(self, where: str, chunks: list[ChunkStorageMetadata]) -> None:
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
            raise self.fail(f"path of {_short(fqn)} must be a list of keys and indices joined by '.' into it, found {_short(path)}")
        return tuple(path)


def parse_sharding(data: bytes | bytearray | memoryview, *, files: Mapping[str, FileEntry], source: str) -> Sharding:
    """Parse and validate verified ``sharding.json`` bytes against the manifest's ``files``."""
    parser = _Parser(source, files)
    doc = load_json(data, source=source, limit=MAX_SHARDING_BYTES)
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        raise parser.fail(f"expected an object with exactly the keys {sorted(_KEYS)}")
    if doc["format"] != SHARDING_FORMAT:
        raise parser.fail(f"'format' is {_short(doc['format'])}, expected {SHARDING_FORMAT!r}")
    if doc["version"] != SHARDING_VERSION or not _is_int(doc["version"]):
        raise CheckpointCorruptedError(
            f"{source}: sharding version {_short(doc['version'])} is not supported (this reader "
            f"reads version {SHARDING_VERSION}); upgrade safeckpt"
        )
    if not _is_int(doc["world_size"], 1, 2**31):
        raise parser.fail(f"'world_size' is {_short(doc['world_size'])}, expected a positive integer")
    tensors, values, paths = doc["tensors"], doc["values"], doc["paths"]
    if not isinstance(tensors, dict) or not isinstance(values, dict) or not isinstance(paths, dict):
        raise parser.fail("'tensors', 'values' and 'paths' must be objects")
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    where: dict[MetadataIndex, Location] = {}
    for fqn, entry in tensors.items():
        state[fqn], located = parser.tensor(fqn, entry)
        where.update(located)
    for fqn, entry in values.items():
        if fqn in state:
            raise parser.fail(f"{_short(fqn)} is both a tensor and a value")
        if not isinstance(entry, dict) or set(entry) != {"file"}:
            raise parser.fail(f"value {_short(fqn)} must be an object with exactly 'file'")
        state[fqn] = BytesStorageMetadata()
        where[MetadataIndex(fqn)] = Location(parser.file(entry["file"], ".msgpack", f"value {_short(fqn)}"), fqn)
    if set(paths) != set(state):
        extra = sorted(set(paths) ^ set(state))[:3]
        raise parser.fail(f"'paths' must list exactly the tensors and values (differs at {extra})")
    planner_data = {fqn: parser.path(fqn, path) for fqn, path in paths.items()}
    metadata = Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=where)
    return Sharding(metadata=metadata, world_size=doc["world_size"])

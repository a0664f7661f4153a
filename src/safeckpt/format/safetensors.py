"""The safetensors container, without torch: dtype table, header building and strict parsing.

Layout (the public safetensors format): an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON header, then the tensor bytes. The header maps each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` relative to the data section, plus an optional ``"__metadata__"``
map of strings. safeckpt pads the header with spaces so the data section starts at a multiple of
64 bytes (the alignment of torch's CPU allocations), and writes tensors whose size is a multiple
of 64 first, then the rest by element size (largest first) and name: every tensor is aligned to
its element size, most to 64 bytes, and the same state always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CheckpointCorruptedError, damaged, short
from . import limits
from .documents import load_json

__all__ = ["DTYPE_SIZES", "TensorInfo", "bools_valid", "build_header", "header_end", "parse_header"]

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""Every dtype the format stores, with its element size in bytes (little-endian)."""

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in an archive; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def build_header(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[TensorInfo]]:
    """Header bytes (length prefix included) for tensors given as (name, dtype, shape), in order.

    Returns the bytes and each tensor's absolute position in the file.
    """
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    spans = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + 8) % limits.ALIGN)
    start = 8 + len(text)
    infos = [TensorInfo(n, d, s, start + b, start + e) for n, d, s, b, e in spans]
    return struct.pack("<Q", len(text)) + text, infos


def _invalid(source: str, what: str) -> CheckpointCorruptedError:
    return damaged(source, f"invalid safetensors archive: {what}", cause="the file is damaged or truncated")


def header_end(prefix: bytes | bytearray | memoryview, *, total: int, source: str) -> int:
    """Where the header of an archive of ``total`` bytes ends, from its first 8 bytes (checked
    against the file size and the header limit, so a reader knows how much to read)."""
    if total < 8 or len(prefix) < 8:
        raise _invalid(source, f"file is {total} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > limits.MAX_SAFETENSORS_HEADER_BYTES:
        raise _invalid(source, f"header length {n} exceeds {limits.MAX_SAFETENSORS_HEADER_BYTES} bytes")
    if 8 + n > total:
        raise _invalid(source, f"header length {n} runs past the end of the {total}-byte file")
    return 8 + n


def parse_header(
    data: bytes | bytearray | memoryview, *, source: str, total: int | None = None
) -> tuple[list[TensorInfo], dict[str, str]]:
    """Validate an archive's header against its total size; returns tensors and metadata.

    Every check a hostile file could exploit happens here: header length, JSON validity,
    dtype names, shape sizes, and offsets that must tile the data section exactly. ``data`` is
    the whole file; or, with ``total`` (the file's size), only its start up to :func:`header_end`,
    and then the bytes of bool tensors (which must be 0 or 1) are the caller's to check.
    """
    if total is None:
        total = len(data)
    start = header_end(data[:8], total=total, source=source)
    if len(data) < start:
        raise _invalid(source, f"header runs past the {len(data)} bytes given")
    header = load_json(bytes(data[8:start]), source=source, limit=limits.MAX_SAFETENSORS_HEADER_BYTES)
    if not isinstance(header, dict):
        raise _invalid(source, "header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(source, "__metadata__ must map strings to strings")
    if len(header) > limits.MAX_TENSORS_PER_FILE:
        raise _invalid(source, f"{len(header)} tensors exceed the limit of {limits.MAX_TENSORS_PER_FILE}")
    infos = [_tensor_info(name, entry, start, source) for name, entry in header.items()]
    position = start
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            raise _invalid(source, f"tensor {short(info.name)} does not start where the previous one ends")
        position = info.end
    if position != total:
        raise _invalid(source, f"tensor data ends at byte {position} but the file has {total} bytes")
    if len(data) == total:
        for info in infos:
            if info.dtype == "BOOL" and not bools_valid(data[info.begin : info.end]):
                raise _invalid(source, f"bool tensor {short(info.name)} holds bytes other than 0 and 1")
    return infos, metadata


def bools_valid(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte is 0 or 1: any other byte in a torch.bool is undefined behaviour in
    torch's kernels."""
    return not bytes(data).translate(None, b"\x00\x01")


def _tensor_info(name: str, entry: object, start: int, source: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _invalid(source, f"entry {short(name)} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise _invalid(source, f"tensor {short(name)} has unsupported dtype {short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.MAX_TENSOR_NDIM
        or not all(_is_size(d) for d in shape)
    ):
        raise _invalid(source, f"tensor {short(name)} has an invalid shape {short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)):
        raise _invalid(source, f"tensor {short(name)} has invalid data_offsets {short(offsets)}")
    begin, end = offsets
    if math.prod(max(d, 1) for d in shape) * DTYPE_SIZES[dtype] >= 2**63:
        # Even an empty tensor's strides are products of its other dimensions.
        raise _invalid(source, f"tensor {short(name)} has shape {short(shape)}, too large for 64-bit strides")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _invalid(
            source,
            f"tensor {short(name)} spans {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {math.prod(shape) * DTYPE_SIZES[dtype]}",
        )
    return TensorInfo(name, dtype, tuple(shape), start + begin, start + end)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63

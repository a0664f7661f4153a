"""Strict encoders and decoders for the format's text and msgpack documents.

JSON (manifest, config, vocabulary) and msgpack (state structure) are parsed from bytes that
were already verified, with the limits in :mod:`safeckpt.limits`: duplicate keys, NaN,
non-string map keys and msgpack extension types are rejected, and every failure becomes a
:class:`~safeckpt.errors.CheckpointCorruptedError` naming the file.
"""

from __future__ import annotations

import json
import math
from typing import NoReturn

import msgpack

from . import limits
from .errors import CheckpointCorruptedError, UnsupportedValueError

__all__ = ["dump_json", "dump_msgpack", "load_json", "load_msgpack"]


def _corrupt(source: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{source}: {what}; the file is damaged or not a safeckpt file")


def _no_duplicates(source: str):  # type: ignore[no-untyped-def]
    def hook(pairs: list[tuple[object, object]]) -> dict[object, object]:
        out: dict[object, object] = {}
        for key, value in pairs:
            if key in out:
                raise _corrupt(source, f"duplicate key {key!r}")
            out[key] = value
        return out

    return hook


def _reject_constant(source: str):  # type: ignore[no-untyped-def]
    def hook(name: str) -> NoReturn:
        raise _corrupt(source, f"non-standard JSON value {name}")

    return hook


def _finite_float(source: str):  # type: ignore[no-untyped-def]
    # json.loads turns 1e400 into inf: refuse it like the NaN/Infinity literals.
    def hook(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _corrupt(source, f"number {text[:40]} is outside the float64 range")
        return value

    return hook


def _check_depth(value: object, source: str, depth: int = 0, limit: int = limits.MAX_NESTING_DEPTH) -> None:
    if depth > limit:
        raise _corrupt(source, f"nesting deeper than {limit} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, source, depth + 1, limit)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, source, depth + 1, limit)


def load_json(data: bytes, *, source: str) -> object:
    """Parse UTF-8 JSON strictly (no duplicate keys, no NaN/Infinity, bounded depth)."""
    if len(data) > limits.MAX_DOCUMENT_BYTES:
        raise _corrupt(source, f"document of {len(data)} bytes exceeds {limits.MAX_DOCUMENT_BYTES}")
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates(source),
            parse_constant=_reject_constant(source),
            parse_float=_finite_float(source),
        )
    except CheckpointCorruptedError:
        raise
    except RecursionError:
        raise _corrupt(source, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(source, f"invalid JSON ({exc})") from None
    _check_depth(value, source)
    return value


def dump_json(value: object, *, source: str) -> bytes:
    """Encode a JSON-compatible value deterministically; refuses NaN and infinities."""
    try:
        return (json.dumps(value, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"{source}: cannot be stored as JSON: {exc}") from None


def dump_msgpack(value: object) -> bytes:
    """Encode a structure document (floats always as float64, str and bin kept apart)."""
    return msgpack.packb(value, use_bin_type=True, use_single_float=False, strict_types=True)


def load_msgpack(data: bytes, *, source: str) -> object:
    """Decode one msgpack object strictly: string map keys only, no duplicates, no extensions."""

    def reject_ext(code: int, payload: bytes) -> NoReturn:
        raise _corrupt(source, f"msgpack extension type {code} is not allowed")

    if len(data) > limits.MAX_DOCUMENT_BYTES:
        raise _corrupt(source, f"document of {len(data)} bytes exceeds {limits.MAX_DOCUMENT_BYTES}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=reject_ext,
            timestamp=0,
            object_pairs_hook=_no_duplicates(source),
        )
    except CheckpointCorruptedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise _corrupt(source, f"invalid msgpack ({type(exc).__name__}: {exc})") from None
    _check_depth(value, source, limit=limits.MAX_MSGPACK_DEPTH)
    return value

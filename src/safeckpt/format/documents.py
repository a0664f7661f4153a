"""Strict encoders and decoders for the format's text and msgpack documents.

JSON (manifest, config, vocabulary, safetensors headers) and msgpack (state structure) are parsed
from bytes that were already verified, with the limits in :mod:`safeckpt.limits`: size, nesting
depth and item count are bounded (so a small hostile file cannot expand into gigabytes of Python
objects); duplicate keys, NaN and infinities, lone surrogates, non-string map keys and msgpack
extension types (timestamps included) are rejected; and every failure becomes a
:class:`~safeckpt.errors.CheckpointCorruptedError` naming the file. The writers refuse what the
readers would refuse, so whatever saves also loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import NoReturn

import msgpack

from ..errors import CheckpointCorruptedError, UnsupportedValueError, damaged, short
from . import limits

__all__ = ["dump_json", "dump_msgpack", "load_json", "load_msgpack"]

_MSGPACK_TYPES = (type(None), bool, int, float, str, bytes, list, dict)


def _corrupt(source: str, what: str) -> CheckpointCorruptedError:
    return damaged(source, what, cause="the file is damaged or not a safeckpt file")


class _Budget:
    """Counts container entries as a decoder builds them and stops it past the limit."""

    def __init__(self, source: str, *, string_keys: bool) -> None:
        self.source = source
        self.string_keys = string_keys
        self.items = 0

    def _spend(self, count: int) -> None:
        self.items += count
        if self.items > limits.MAX_DOCUMENT_ITEMS:
            raise _corrupt(
                self.source,
                f"more than {limits.MAX_DOCUMENT_ITEMS} list elements and map entries in total",
            )

    def pairs(self, pairs: list[tuple[object, object]]) -> dict[object, object]:
        self._spend(len(pairs))
        out: dict[object, object] = {}
        for key, value in pairs:
            if self.string_keys and type(key) is not str:
                raise _corrupt(self.source, f"map key {short(key)} is a {type(key).__name__}, not a string")
            if key in out:
                raise _corrupt(self.source, f"duplicate key {short(key)}")
            out[key] = value
        return out

    def array(self, items: list[object]) -> list[object]:
        self._spend(len(items))
        return items


def _reject_constant(source: str) -> Callable[[str], NoReturn]:
    def hook(name: str) -> NoReturn:
        raise _corrupt(source, f"non-standard JSON value {name}")

    return hook


def _finite_float(source: str) -> Callable[[str], float]:
    # json.loads turns 1e400 into inf: refuse it like the NaN/Infinity literals.
    def hook(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _corrupt(source, f"number {text[:40]} is outside the float64 range")
        return value

    return hook


def _check_text(text: str, source: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _corrupt(source, f"string {short(text)} holds a lone UTF-16 surrogate") from None


def _check_json(value: object, source: str, depth: int = 0) -> None:
    """Bounded depth; strings must be valid Unicode (JSON's \\ud800 escapes can smuggle halves)."""
    if depth > limits.MAX_NESTING_DEPTH:
        raise _corrupt(source, f"nesting deeper than {limits.MAX_NESTING_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, source)
            _check_json(item, source, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, source, depth + 1)
    elif isinstance(value, str):
        _check_text(value, source)


def _check_msgpack(value: object, source: str, depth: int = 0) -> None:
    """Bounded depth; only the plain types (a msgpack Timestamp bypasses ``ext_hook``)."""
    if depth > limits.MAX_MSGPACK_DEPTH:
        raise _corrupt(source, f"nesting deeper than {limits.MAX_MSGPACK_DEPTH} levels")
    if type(value) not in _MSGPACK_TYPES:
        raise _corrupt(source, f"msgpack value of type {type(value).__name__} is not allowed")
    if type(value) is dict:
        for item in value.values():
            _check_msgpack(item, source, depth + 1)
    elif type(value) is list:
        for item in value:
            _check_msgpack(item, source, depth + 1)


def load_json(data: bytes | bytearray | memoryview, *, source: str, limit: int | None = None) -> object:
    """Parse UTF-8 JSON strictly: at most ``limit`` bytes (default ``limits.MAX_JSON_BYTES``),
    bounded depth and item count, no duplicate keys, no NaN/Infinity or overflowing numbers, no
    lone surrogates."""
    limit = limits.MAX_JSON_BYTES if limit is None else limit
    data = bytes(data)  # a memoryview or bytearray of a verified buffer works too
    if len(data) > limit:
        raise _corrupt(source, f"JSON document of {len(data)} bytes exceeds the limit of {limit}")
    # json has no hook for arrays: count opening brackets instead (an upper bound, since
    # brackets inside strings count too) so that "[[],[],...]" cannot expand 20-fold in memory.
    containers = data.count(b"[") + data.count(b"{")
    if containers > limits.MAX_DOCUMENT_ITEMS:
        raise _corrupt(source, f"{containers} JSON arrays and objects exceed {limits.MAX_DOCUMENT_ITEMS}")
    budget = _Budget(source, string_keys=True)
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=budget.pairs,
            parse_constant=_reject_constant(source),
            parse_float=_finite_float(source),
        )
    except CheckpointCorruptedError:
        raise
    except RecursionError:
        raise _corrupt(source, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(source, f"invalid JSON ({str(exc)[:200]})") from None
    _check_json(value, source)
    return value


def dump_json(value: object, *, source: str) -> bytes:
    """Encode a JSON-compatible value deterministically; refuses NaN, infinities and documents
    over ``limits.MAX_JSON_BYTES``."""
    try:
        data = (json.dumps(value, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"{source}: cannot be stored as JSON: {exc}") from None
    if len(data) > limits.MAX_JSON_BYTES:
        raise UnsupportedValueError(
            f"{source}: encodes to {len(data)} bytes of JSON, over the limit of "
            f"{limits.MAX_JSON_BYTES} that readers accept; store large data as tensors in extra="
        )
    return data


def _count_items(value: object) -> int:
    if type(value) is dict:
        return len(value) + sum(_count_items(v) for v in value.values())
    if type(value) is list:
        return len(value) + sum(_count_items(v) for v in value)
    return 0


def dump_msgpack(value: object, *, source: str = "structure") -> bytes:
    """Encode a structure document (floats always as float64, str and bin kept apart).

    Refuses a document the readers would refuse (over ``limits.MAX_DOCUMENT_BYTES`` or
    ``limits.MAX_DOCUMENT_ITEMS``) with :class:`UnsupportedValueError`.
    """
    items = _count_items(value)
    if items > limits.MAX_DOCUMENT_ITEMS:
        raise UnsupportedValueError(
            f"{source}: its structure has {items} list elements and dict entries, over the limit "
            f"of {limits.MAX_DOCUMENT_ITEMS} that readers accept; store long lists of numbers as "
            "tensors"
        )
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True, use_single_float=False, strict_types=True)
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError) as exc:
        # e.g. a str holding a lone surrogate, which UTF-8 cannot encode
        raise UnsupportedValueError(f"{source}: cannot be stored as msgpack: {str(exc)[:200]}") from None
    if len(data) > limits.MAX_DOCUMENT_BYTES:
        raise UnsupportedValueError(
            f"{source}: its structure encodes to {len(data)} bytes, over the limit of "
            f"{limits.MAX_DOCUMENT_BYTES} that readers accept; store large data as tensors"
        )
    return data


def load_msgpack(data: bytes, *, source: str) -> object:
    """Decode one msgpack object strictly: string map keys only, no duplicates, no extensions
    (timestamps included), bounded size, depth and item count."""

    def reject_ext(code: int, payload: bytes) -> NoReturn:
        raise _corrupt(source, f"msgpack extension type {code} is not allowed")

    if len(data) > limits.MAX_DOCUMENT_BYTES:
        raise _corrupt(source, f"document of {len(data)} bytes exceeds {limits.MAX_DOCUMENT_BYTES}")
    budget = _Budget(source, string_keys=True)
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=reject_ext,
            timestamp=0,
            object_pairs_hook=budget.pairs,
            list_hook=budget.array,
            max_array_len=limits.MAX_DOCUMENT_ITEMS,
            max_map_len=limits.MAX_DOCUMENT_ITEMS,
        )
    except CheckpointCorruptedError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError, MemoryError) as exc:
        raise _corrupt(source, f"invalid msgpack ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_msgpack(value, source)
    return value

"""The structure encoding: nested Python state <-> a msgpack-ready document.

A *state tree* is nested ``dict`` / ``list`` / ``tuple`` whose leaves are ``None``, ``bool``,
``int`` (64-bit), ``float``, ``str``, ``bytes`` or tensors. Scalars encode as themselves;
every container and every tensor encodes as a map with exactly one *tag* key::

    {"list": [node, ...]}          {"tuple": [node, ...]}
    {"dict": [[key, node], ...]}   (key: str or int; insertion order kept)
    {"tensor": "name"}             (name of the tensor in the sibling .safetensors archive)

Tagging every container keeps the encoding unambiguous (a user dict may hold any key) and lets
dicts keep int keys, which optimizer state needs. This module knows nothing about torch: the
caller supplies how to recognise a tensor when encoding and how to materialise one when decoding,
so the numpy reader shares it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from ..errors import CheckpointCorruptedError, UnsupportedValueError, damaged, short
from . import limits

__all__ = ["TREE_NAMES", "TREE_VERSION", "decode_document", "encode_document", "key_path"]

TREE_NAMES = ("optimizer", "scheduler", "rng", "extra")
"""The state trees a checkpoint may hold besides the model, in writing order: each is stored as
``<name>.safetensors`` (its tensors) + ``<name>.msgpack`` (its structure), spec/FORMAT.md §3.
Readers look for exactly these; a writer stores no other tree."""
TREE_VERSION = 1
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
_SCALARS = (type(None), bool, int, float, str, bytes)

T = TypeVar("T")


def key_path(path: tuple[object, ...]) -> str:
    """Human-readable location of a value, e.g. ``optimizer['state'][0]['exp_avg']``."""
    return "".join(f"[{short(p)}]" for p in path) or "<root>"


def encode_document(
    root: object,
    *,
    name: str,
    is_tensor: Callable[[object], bool],
    add_tensor: Callable[[object, tuple[object, ...]], str],
) -> dict[str, object]:
    """Encode ``root`` into a structure document; ``add_tensor`` stores a tensor, returns its name.

    Raises :class:`UnsupportedValueError` naming the key path of the first value that cannot
    be stored, before the caller has written anything.
    """

    def encode(value: object, path: tuple[object, ...], depth: int) -> object:
        if depth > limits.MAX_NESTING_DEPTH:
            raise UnsupportedValueError(
                f"{name}{key_path(path)}: nested deeper than {limits.MAX_NESTING_DEPTH} levels"
            )
        if is_tensor(value):
            return {"tensor": add_tensor(value, path)}
        if isinstance(value, _SCALARS) and (type(value) in _SCALARS):
            if isinstance(value, int) and not isinstance(value, bool):
                if not _INT_MIN <= value <= _UINT_MAX:
                    raise UnsupportedValueError(
                        f"{name}{key_path(path)}: integer {value} does not fit in 64 bits; "
                        "store it as a str or a tensor"
                    )
            return value
        if type(value) is list:
            return {"list": [encode(v, (*path, i), depth + 1) for i, v in enumerate(value)]}
        if type(value) is tuple:
            return {"tuple": [encode(v, (*path, i), depth + 1) for i, v in enumerate(value)]}
        if isinstance(value, Mapping) and type(value).__module__ in ("builtins", "collections"):
            pairs = []
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise UnsupportedValueError(
                        f"{name}{key_path(path)}: dict key {key!r} of type "
                        f"{type(key).__name__} is not supported; keys must be str or int"
                    )
                pairs.append([encode(key, path, depth + 1), encode(item, (*path, key), depth + 1)])
            return {"dict": pairs}
        raise UnsupportedValueError(
            f"{name}{key_path(path)}: value of type {type(value).__module__}."
            f"{type(value).__qualname__} cannot be stored; supported are nested dict/list/tuple "
            "of tensors, None, bool, int, float, str and bytes (convert it, e.g. with "
            "state_dict(), torch.from_numpy() or str())"
        )

    return {"version": TREE_VERSION, "root": encode(root, (), 0)}


def decode_document(
    document: object, *, source: str, resolve_tensor: Callable[[str], T]
) -> object:
    """Rebuild the state tree from a parsed document, resolving tensor names via the archive.

    Any deviation from the encoding raises :class:`CheckpointCorruptedError` naming ``source``.
    """

    def fail(what: str, path: tuple[object, ...]) -> CheckpointCorruptedError:
        return damaged(source, f"invalid structure at {key_path(path)}: {what}")

    def decode(node: object, path: tuple[object, ...], depth: int) -> object:
        if depth > limits.MAX_NESTING_DEPTH:
            raise fail(f"nested deeper than {limits.MAX_NESTING_DEPTH} levels", path)
        if type(node) in _SCALARS:
            return node
        if type(node) is not dict or len(node) != 1:
            raise fail(f"expected a scalar or a one-key tag map, found {type(node).__name__}", path)
        ((tag, payload),) = node.items()
        if tag == "tensor":
            if type(payload) is not str:
                raise fail("tensor reference must be a string", path)
            return resolve_tensor(payload)
        if tag in ("list", "tuple"):
            if type(payload) is not list:
                raise fail(f"{tag} payload must be an array", path)
            items = [decode(v, (*path, i), depth + 1) for i, v in enumerate(payload)]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            if type(payload) is not list:
                raise fail("dict payload must be an array of pairs", path)
            out: dict[object, object] = {}
            for pair in payload:
                if type(pair) is not list or len(pair) != 2:
                    raise fail("dict entries must be [key, value] pairs", path)
                key = pair[0]
                if type(key) not in (str, int):
                    raise fail(f"dict key {short(key)} must be a str or int", path)
                if key in out:
                    raise fail(f"duplicate dict key {short(key)}", path)
                out[key] = decode(pair[1], (*path, key), depth + 1)
            return out
        raise fail(f"unknown tag {short(tag)}", path)

    if type(document) is not dict or set(document) != {"version", "root"}:
        raise damaged(source, "expected a map with keys 'version' and 'root'")
    if type(document["version"]) is not int or document["version"] != TREE_VERSION:
        raise CheckpointCorruptedError(
            f"{source}: structure version {short(document['version'])} is not supported "
            f"(expected {TREE_VERSION}); upgrade safeckpt"
        )
    return decode(document["root"], (), 0)

"""Training configurations as users have them -> the JSON object stored as ``config.json``.

``save_checkpoint(config=...)`` accepts a dict, a dataclass, an ``argparse.Namespace``, an
OmegaConf ``DictConfig``, a transformers ``PretrainedConfig`` or any object with ``to_dict()``.
Each becomes a plain JSON object, converted the way ``json.dumps`` would convert it, so that what
is stored is exactly what is loaded back:

* dict keys that are ``int``, ``float``, ``bool`` or ``None`` become strings (``1`` -> ``"1"``,
  ``True`` -> ``"true"``, ``None`` -> ``"null"``), as JSON has only string keys;
* tuples become lists, ``os.PathLike`` values become strings;
* NumPy scalars (``numpy.int64(3)``, ``numpy.float32(0.5)``, ``numpy.bool_``) become Python numbers.

Anything else (sets, arrays, tensors, arbitrary objects, NaN and infinities, integers beyond
64 bits) raises :class:`~safeckpt.errors.UnsupportedValueError` naming the key and what to convert
it to. :func:`json_plain` is the one JSON rule of the format: ``vocab.json`` and the manifest's
``metadata`` go through it too.

This module imports neither torch nor transformers nor omegaconf: it recognises their types
only when the caller's program has already imported them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
import sys
from collections.abc import Mapping

from .errors import UnsupportedValueError
from .format import limits

__all__ = ["config_metadata", "config_to_json", "json_plain"]

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
"""Integers every part of a checkpoint holds: signed or unsigned 64-bit, as in the state trees."""

TRANSFORMERS_CONFIG_KEY = "transformers_config"
"""Manifest metadata key recording the class and ``model_type`` of a transformers config, which
``config.json`` leaves out so that ``ConfigClass(**ckpt.config)`` rebuilds an equal config."""


def _is_transformers_config(config: object) -> bool:
    module = sys.modules.get("transformers")
    base = getattr(module, "PretrainedConfig", None) if module is not None else None
    return base is not None and isinstance(config, base)


def _omegaconf_container(config: object) -> object | None:
    module = sys.modules.get("omegaconf")
    if module is None or not isinstance(config, module.Container):
        return None
    # resolve=True: interpolations such as ${model.dim} are stored as the values they stand for.
    return module.OmegaConf.to_container(config, resolve=True)


def _as_mapping(config: object) -> object:
    """The plain mapping behind a config object (not yet checked for JSON)."""
    if isinstance(config, Mapping) and not _is_transformers_config(config):
        return config
    container = _omegaconf_container(config)
    if container is not None:
        return container
    if _is_transformers_config(config):
        as_dict = config.to_dict()  # type: ignore[attr-defined]
        # model_type is a class attribute: passed back to the class it would become an instance
        # attribute and the rebuilt config would not compare equal. It goes to the manifest
        # metadata instead (config_metadata). transformers_version is None on a config built
        # in this process and set on one read from disk; keep what the object holds.
        as_dict.pop("model_type", None)
        if getattr(config, "transformers_version", None) is None:
            as_dict.pop("transformers_version", None)
        return as_dict
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, argparse.Namespace):
        return vars(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise UnsupportedValueError(
        f"config: expected a dict, dataclass, argparse.Namespace, OmegaConf DictConfig, transformers "
        f"config or an object with to_dict(), got {type(config).__qualname__}; pass a dict of its settings"
    )


def config_to_json(config: object) -> dict[str, object]:
    """``config`` as a JSON object, converted as described in the module docstring.

    Example:
        >>> config_to_json({"id2label": {0: "neg", 1: "pos"}, "betas": (0.9, 0.95)})
        {'id2label': {'0': 'neg', '1': 'pos'}, 'betas': [0.9, 0.95]}
    """
    plain = json_plain(_as_mapping(config), "config")
    if not isinstance(plain, dict):
        raise UnsupportedValueError(
            f"config: {type(config).__qualname__} did not give a dict (got {type(plain).__name__}); "
            "pass a dict of its settings"
        )
    return plain


def config_metadata(config: object) -> dict[str, object]:
    """Manifest metadata describing ``config`` beyond its values: for a transformers config, its
    class and ``model_type`` (under :data:`TRANSFORMERS_CONFIG_KEY`); empty for anything else."""
    if not _is_transformers_config(config):
        return {}
    cls = type(config)
    return {
        TRANSFORMERS_CONFIG_KEY: {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "model_type": str(getattr(config, "model_type", "") or ""),
        }
    }


def _key(key: object, path: tuple[object, ...], label: str, seen: Mapping[str, object]) -> str:
    if isinstance(key, str):
        text = key
    elif key is None or isinstance(key, bool):
        text = {None: "null", True: "true", False: "false"}[key]
    elif isinstance(key, int):
        text = str(int(key))
    elif isinstance(key, float) and math.isfinite(key):
        text = repr(float(key))
    else:
        raise UnsupportedValueError(
            f"{label}{_where(path)}: key {key!r} is a {type(key).__qualname__}; JSON keys are strings "
            "(int, float, bool and None keys are converted): convert it to str"
        )
    if text in seen:
        raise UnsupportedValueError(
            f"{label}{_where(path)}: keys {key!r} and {text!r} both become the JSON key {text!r}; "
            "rename one of them"
        )
    return text


def _where(path: tuple[object, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _numpy_scalar(value: object) -> object | None:
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and isinstance(value, (numpy.number, numpy.bool_)):
        return value.item()
    return None


def json_plain(value: object, label: str, path: tuple[object, ...] = ()) -> object:
    """``value`` as JSON-compatible Python (dict/list/str/int/float/bool/None), or
    :class:`UnsupportedValueError` naming ``label`` and the key path of the first bad value."""
    # Readers refuse JSON nested deeper than MAX_NESTING_DEPTH.
    if len(path) > limits.MAX_NESTING_DEPTH - 1:
        raise UnsupportedValueError(
            f"{label}{_where(path)}: nested deeper than {limits.MAX_NESTING_DEPTH - 1} levels; flatten it"
        )
    scalar = _numpy_scalar(value)
    if scalar is not None:
        value = scalar
    if isinstance(value, enum.Enum) and isinstance(value.value, (str, int, float)):
        value = value.value  # e.g. transformers' str enums in TrainingArguments.to_dict()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _UINT_MAX:  # the rule of every part (msgpack's range)
            raise UnsupportedValueError(
                f"{label}{_where(path)}: integer {value} does not fit in 64 bits; store it as a str"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnsupportedValueError(
                f"{label}{_where(path)}: {value} cannot be stored in JSON; use None or a string"
            )
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [json_plain(v, label, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for k, v in value.items():
            out[_key(k, path, label, out)] = json_plain(v, label, (*path, k))
        return out
    hint = "convert it to str, int, float, bool, None, list or dict"
    if isinstance(value, (set, frozenset)):
        hint = "store it as a sorted list"
    elif hasattr(value, "tolist"):
        hint = "store it as a list (.tolist()) or save it in extra= as a tensor"
    raise UnsupportedValueError(
        f"{label}{_where(path)}: value of type {type(value).__qualname__} cannot be stored in JSON; {hint}"
    )

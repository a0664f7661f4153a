"""Migration from ``torch.save`` files: :func:`import_torch_checkpoint`.

A legacy ``.pt`` / ``.pth`` / ``.bin`` file is read with ``torch.load(..., weights_only=True)``,
torch's restricted unpickler, which builds only tensors, plain containers and the classes it is
told are safe. safeckpt tells it about a short allow-list of data-only types that training
scripts commonly save (``argparse.Namespace``; numpy scalars, dtypes and arrays). Any other
class is refused by name; ``allow_classes=["module.Name"]`` (``--allow-class`` on the command
line) lets the loader rebuild its instances as inert records of their attributes: the class's
own module is never imported and none of its code runs. Plain pickle is never used, and this
module is never on the load path of a safeckpt checkpoint.

The loaded object is then mapped onto a checkpoint: the model state dict, ``optimizer``,
``scheduler``, the step, ``args`` / ``config`` / ``hparams`` as config, ``vocab``, and every
other entry in ``extra``. Files written by :func:`safeckpt.export.export_checkpoint` (``--to
torch``) carry a marker, so every part comes back exactly where it was.

Example:
    >>> import_torch_checkpoint("legacy/model.pt", "checkpoints")  # doctest: +SKIP
    PosixPath('checkpoints/step-00001000')
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointCorruptedError, CheckpointNotFoundError, UnsupportedValueError
from .storage.base import Location
from .torch.saver import save_checkpoint

__all__ = ["EXPORT_MARKER", "Conversion", "convert_torch_file", "export_torch_checkpoint", "import_torch_checkpoint"]

EXPORT_MARKER = "safeckpt_export"
"""Top-level key of files written by ``export --to torch``; its value is the layout version."""
_MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module", "net")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict")
_CONFIG_KEYS = ("config", "args", "hparams", "hyper_parameters", "cfg")
_VOCAB_KEYS = ("vocab",)
_STEP_KEYS = ("step", "global_step", "iteration", "epoch")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Conversion:
    """What :func:`convert_torch_file` wrote and where each top-level entry of the file went."""

    path: Location
    """The checkpoint written (an ``ObjectPath`` when ``directory`` was a URL)."""
    step: int
    placed: dict[str, str] = field(default_factory=dict)
    """Top-level key of the file -> ``model``, ``optimizer``, ``scheduler``, ``config``,
    ``vocab``, ``step``, ``metadata`` or ``extra[...]``."""
    has_rng: bool = False
    """Always False: a torch.save file has no RNG state safeckpt can restore (see the README)."""


class _Record:
    """Stand-in for a class named by ``allow_classes``: keeps what the pickle gives it (the
    attributes, or the constructor's arguments) and nothing else; it has no behaviour to run."""

    origin = ""

    def __new__(cls, *args: object, **kwargs: object) -> _Record:
        record = super().__new__(cls)
        record.__dict__["_args"] = args
        return record

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})
        self.__dict__.update(slots if isinstance(slots, dict) else {})

    def plain(self) -> object:
        """Its attributes as a dict, or (without any) its constructor arguments."""
        fields = {k: v for k, v in self.__dict__.items() if k != "_args"}
        if fields:
            return fields.get("_state", fields) if set(fields) == {"_state"} else fields
        args = self.__dict__.get("_args", ())
        return args[0] if len(args) == 1 else list(args)


def _known_safe() -> list[object]:
    """Data-only globals torch's loader may build (besides its own defaults), with their names."""
    allowed: list[object] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    multiarray = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2.x, else 1.x
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x names
        allowed += [(multiarray.scalar, f"{prefix}.scalar"), (multiarray._reconstruct, f"{prefix}._reconstruct")]
    allowed += [np.dtype, np.ndarray]
    allowed += [
        (cls, f"numpy.dtypes.{name}")
        for name in dir(getattr(np, "dtypes", None))
        if name.endswith("DType") and isinstance(cls := getattr(np.dtypes, name), type)
    ]
    return allowed


def _records(names: Sequence[str]) -> list[object]:
    out: list[object] = []
    for name in names:
        if not _CLASS_NAME.fullmatch(name):
            raise ValueError(f"--allow-class {name!r}: expected a dotted name such as mypackage.config.TrainConfig")
        record = type(name.rsplit(".", 1)[1], (_Record,), {"origin": name, "__module__": __name__})
        out.append((record, name))
    return out


def _clean(message: str) -> str:
    """torch's weights_only message without colour codes and without advice a CLI user cannot
    follow (``add_safe_globals``, ``weights_only=False``)."""
    text = _ANSI.sub("", message)
    keep = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and not re.search(r"safe_globals|weights_only=False|WeightsUnpickler|Check the documentation|"
                          r"re-running `torch\.load`|trust the source|arbitrary code", line)
    ]
    return " ".join(keep)[:600]


def _refuse_classes(source: Path, names: Sequence[str]) -> UnsupportedValueError:
    flags = " ".join(f"--allow-class {name}" for name in names)
    listed = ", ".join(names)
    return UnsupportedValueError(
        f"{source}: holds objects of {listed}, which safeckpt does not build by default (allowed: "
        "tensors, plain containers, argparse.Namespace, numpy scalars, dtypes and arrays). If "
        f"{'they hold' if len(names) > 1 else 'it holds'} plain data such as a training config, "
        f"pass {flags} (Python: allow_classes=[...]): its instances become dicts of their "
        "attributes, and its code is never imported or run"
    )


@contextlib.contextmanager
def _allowed(allow_classes: Sequence[str]) -> Iterator[None]:
    with torch.serialization.safe_globals(_known_safe() + _records(allow_classes)):  # type: ignore[arg-type]
        yield


def load_torch_file(source: str | os.PathLike[str], *, allow_classes: Sequence[str] = ()) -> object:
    """Read a ``torch.save`` file with ``weights_only=True`` and the allow-list; returns its
    object with numpy values, Namespaces and allowed classes turned into plain values."""
    source = Path(source)
    if not source.is_file():
        raise CheckpointNotFoundError(f"{source}: file does not exist; check the path")
    with _allowed(allow_classes):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # not a zip file (legacy format) or unreadable: torch.load says more
            unsafe = []
        if unsafe:
            raise _refuse_classes(source, sorted(unsafe))
        try:
            # weights_only=True: torch's restricted unpickler; never plain pickle.
            doc = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            text = _ANSI.sub("", str(exc))
            found = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", text)
            if found:
                raise _refuse_classes(source, sorted(set(found))) from None
            raise CheckpointCorruptedError(
                f"{source}: cannot be read with torch.load(weights_only=True): {_clean(str(exc))}. "
                "The file is damaged or not a torch.save file"
            ) from None
    return _plain(doc)


def _plain(value: object) -> object:
    """Allowed non-tensor objects as values a checkpoint stores (recursively)."""
    if isinstance(value, torch.Tensor):
        return value.detach() if isinstance(value, torch.nn.Parameter) else value
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, _Record):
        return _plain(value.plain())
    if isinstance(value, type) and issubclass(value, _Record):  # the class itself, not an instance
        return value.origin
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Size):
        return tuple(value)
    if type(value) is list:
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, (set, frozenset)):
        items = [_plain(v) for v in value]
        with contextlib.suppress(TypeError):
            items.sort()
        return items
    if isinstance(value, Mapping):
        plain = {k: _plain(v) for k, v in value.items()}
        return type(value)(plain) if type(value).__module__ == "collections" else plain  # type: ignore[call-arg]
    return _numpy_plain(value)


def _numpy_plain(value: object) -> object:
    np = sys.modules.get("numpy")  # numpy values can only exist if numpy is imported
    if np is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.dtype):
        return str(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return [_plain(v) for v in value.tolist()]
        return torch.from_numpy(value.copy())
    return value


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _take(rest: dict[str, object], keys: tuple[str, ...]) -> tuple[str | None, object]:
    for key in keys:
        if key in rest:
            return key, rest.pop(key)
    return None, None


def convert_torch_file(
    source: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    overwrite: bool = False,
    allow_classes: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> Conversion:
    """Convert a ``torch.save`` checkpoint into a safeckpt checkpoint (see the module docstring).

    ``directory`` may be an fsspec URL (``s3://bucket/run``), opened with ``storage_options``
    as in :func:`~safeckpt.save_checkpoint`.

    Raises:
        UnsupportedValueError: the file holds a class outside the allow-list (the message names
            it), or no model state dict.
        CheckpointCorruptedError: torch cannot read the file.
    """
    source = Path(source)
    doc = load_torch_file(source, allow_classes=allow_classes)
    placed: dict[str, str] = {}
    parts: dict[str, object] = {}
    metadata: dict[str, object] = {}
    if _is_state_dict(doc):
        assert isinstance(doc, Mapping)
        parts["model"], rest = doc, {}
        placed["<whole file>"] = "model"
    elif isinstance(doc, Mapping):
        rest = dict(doc)
        exported = rest.pop(EXPORT_MARKER, None) is not None
        key, model = _take(rest, _MODEL_KEYS)
        if key is None or not _is_state_dict(model):
            raise UnsupportedValueError(
                f"{source}: found no model state dict (looked for a bare state dict of tensors or the "
                f"keys {', '.join(_MODEL_KEYS)}; found keys {sorted(map(str, doc))[:20]}); convert it "
                "with safeckpt.save_checkpoint in Python"
            )
        parts["model"], placed[key] = model, "model"
        for name, keys in (("optimizer", _OPTIMIZER_KEYS), ("scheduler", _SCHEDULER_KEYS), ("vocab", _VOCAB_KEYS)):
            key, value = _take(rest, keys)
            if key is not None:
                parts[name], placed[key] = value, name
        key, value = _take(rest, _CONFIG_KEYS)
        if isinstance(value, Mapping):
            parts["config"], placed[str(key)] = value, "config"
        elif key is not None:
            rest[key] = value  # not a config object: keep it as it was
        if exported:
            step_value = rest.pop("step", None)
            if step is None and isinstance(step_value, int):
                step, placed["step"] = step_value, "step"
            saved_meta = rest.pop("metadata", None)
            if isinstance(saved_meta, Mapping):
                metadata.update(saved_meta)
                placed["metadata"] = "metadata"
            saved_extra = rest.pop("extra", None)
            if isinstance(saved_extra, Mapping):
                placed["extra"] = "extra"
                rest = {**rest, **saved_extra}
    else:
        raise UnsupportedValueError(
            f"{source}: holds a {type(doc).__qualname__}, not a dict or state dict; convert it with "
            "safeckpt.save_checkpoint in Python"
        )
    if step is None:
        step = 0
        for key in _STEP_KEYS:
            value = rest.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                step, placed[key] = value, f"step (and extra[{key!r}])"
                break
    for key in rest:
        placed.setdefault(str(key), f"extra[{key!r}]")
    metadata["converted_from"] = source.name
    path = save_checkpoint(  # type: ignore[call-overload]
        parts["model"],
        parts.get("optimizer"),
        parts.get("config"),
        parts.get("vocab"),
        step,
        directory=directory,
        scheduler=parts.get("scheduler"),
        extra=rest or None,
        metadata=metadata,
        rng=False,
        overwrite=overwrite,
        storage_options=storage_options,
    )
    return Conversion(path=path, step=step, placed=placed)


def import_torch_checkpoint(
    source: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    overwrite: bool = False,
    allow_classes: Sequence[str] = (),
) -> Location:
    """Convert a ``torch.save`` checkpoint into a safeckpt checkpoint; returns its path.

    Understands a bare model state dict and the common layout ``{"model": ..., "optimizer":
    ..., "scheduler": ..., "args"/"config"/"hparams": ..., "vocab": ..., "step"/"epoch": ...}``;
    every other top-level entry is kept in ``extra``. ``step`` defaults to the file's own step
    (or 0). The result has no RNG state: load it with ``restore_rng=False``.

    Example:
        >>> import_torch_checkpoint("legacy/model.pt", "checkpoints")  # doctest: +SKIP
        PosixPath('checkpoints/step-00001000')
    """
    return convert_torch_file(source, directory, step=step, overwrite=overwrite, allow_classes=allow_classes).path


def export_torch_checkpoint(
    checkpoint: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a verified checkpoint as one ``torch.save`` file; ``export_checkpoint(..., to="torch")``.

    Example:
        >>> export_torch_checkpoint("checkpoints", "model.pt")  # doctest: +SKIP
    """
    from .export import export_checkpoint

    return export_checkpoint(checkpoint, target, to="torch", overwrite=overwrite)

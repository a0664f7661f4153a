"""Capture and restore of random-number-generator state, so a resumed run draws the same numbers.

Captured by default: Python's ``random``, NumPy's global generator (when NumPy is imported),
torch's CPU generator and every CUDA device's generator (when CUDA is initialised or available),
plus any ``torch.Generator`` or ``numpy.random.Generator`` the user names. Everything becomes a
plain state tree (tensors, ints, strings), stored through the same flattener as optimizer state.
"""

from __future__ import annotations

import json
import random
import sys
import types
import warnings
from collections.abc import Mapping

import torch

from ..errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    MissingRNGStateWarning,
)

__all__ = ["capture_rng", "restore_rng"]

Generator = object  # torch.Generator | numpy.random.Generator; numpy stays optional


def _numpy_state_to_json(state: object) -> str:
    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if hasattr(value, "tolist"):
            return value.tolist()
        return value

    return json.dumps(plain(state))


def _capture_generator(name: str, gen: object) -> dict[str, object]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    bit_generator = getattr(gen, "bit_generator", None)
    if bit_generator is not None and hasattr(bit_generator, "state"):
        return {"kind": "numpy", "state": _numpy_state_to_json(bit_generator.state)}
    raise TypeError(
        f"rng[{name!r}]: {type(gen).__qualname__} is not a torch.Generator or "
        "numpy.random.Generator; pass only generators in rng="
    )


def capture_rng(generators: Mapping[str, Generator] | None = None) -> dict[str, object]:
    """The state of every global generator and of ``generators``, as a state tree."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    state["generators"] = {k: _capture_generator(k, g) for k, g in (generators or {}).items()}
    return state


def restore_rng(
    state: object, generators: Mapping[str, Generator] | None = None, *, source: str
) -> None:
    """Put every generator back to the captured state; ``source`` names the checkpoint.

    All or nothing: if any part of ``state`` is malformed, every generator is rolled back and
    :class:`CheckpointCorruptedError` (or :class:`CheckpointMismatchError`) is raised.
    """
    previous = capture_rng(generators)
    try:
        _restore_unchecked(state, generators, source=source)
    except Exception as exc:
        _restore_unchecked(previous, generators, source=source)
        if isinstance(exc, (CheckpointError, Warning)):  # a warning only when turned into an error
            raise
        # torch, random and numpy validate the states themselves, each with its own exception.
        raise CheckpointCorruptedError(
            f"{source}: RNG state is malformed ({type(exc).__name__}: {str(exc)[:200]}); the "
            "checkpoint is damaged, or pass restore_rng=False to load it without the RNG state"
        ) from None
    _warn_unrestored(state, generators, source)


def _warn_unrestored(state: object, generators: Mapping[str, Generator] | None, source: str) -> None:
    """Say which saved generators this restore left alone: named ones nobody passed, and NumPy's
    global one when NumPy is not installed here (a missing package, not a damaged checkpoint)."""
    if not isinstance(state, dict):
        return
    saved = state.get("generators")
    left = sorted(set(saved) - set(generators or {})) if isinstance(saved, dict) else []
    if left:
        passing = ", ".join(f"{name!r}: gen" for name in left)
        warnings.warn(
            f"{source}: the checkpoint has RNG state for generator(s) {', '.join(map(repr, left))}, "
            f"which were not restored; pass restore_rng={{{passing}}} to restore them (or "
            "restore_rng=False to restore no RNG state), else the resumed run draws different numbers",
            MissingRNGStateWarning,
            stacklevel=4,
        )
    if "numpy" in state and _numpy() is None:
        warnings.warn(
            f"{source}: the checkpoint has NumPy's global RNG state, but the numpy package is not "
            "installed here, so it was not restored (the checkpoint is fine); install numpy if the "
            "resumed run draws from numpy.random",
            MissingRNGStateWarning,
            stacklevel=4,
        )


def _numpy() -> types.ModuleType | None:
    """numpy if it is installed (an optional dependency), else None."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _restore_unchecked(
    state: object, generators: Mapping[str, Generator] | None = None, *, source: str
) -> None:
    if not isinstance(state, dict) or "python" not in state or "torch" not in state:
        raise CheckpointCorruptedError(
            f"{source}: RNG state is malformed (no 'python' and 'torch' entries); the checkpoint is "
            "damaged, or pass restore_rng=False to load it without the RNG state"
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    np = _numpy() if "numpy" in state else None
    if np is not None:  # without numpy there is no numpy generator to restore
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda", [])
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != len(cuda):
            warnings.warn(
                f"{source}: checkpoint has RNG state for {len(cuda)} CUDA device(s), this process "
                f"has {available}; restoring {min(available, len(cuda))}, so GPU randomness will "
                "differ from the original run",
                stacklevel=4,
            )
        for index in range(min(available, len(cuda))):
            torch.cuda.set_rng_state(cuda[index], index)
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointMismatchError(
                f"{source}: no RNG state for generator {name!r} (saved: {sorted(saved)}); "
                "pass the same names to rng= when saving and restore_rng= when loading"
            )
        entry = saved[name]
        if isinstance(gen, torch.Generator):
            if entry.get("kind") != "torch":
                raise CheckpointMismatchError(f"{source}: generator {name!r} was not a torch.Generator")
            gen.set_state(entry["state"])
        else:
            if entry.get("kind") != "numpy":
                raise CheckpointMismatchError(f"{source}: generator {name!r} was not a numpy Generator")
            gen.bit_generator.state = json.loads(entry["state"])  # type: ignore[attr-defined]

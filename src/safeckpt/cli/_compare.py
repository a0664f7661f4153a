"""How ``safeckpt diff`` compares two values: state trees flattened to key paths, tensors by
their bytes first and only then numerically (max absolute and relative difference, in float64,
a slice at a time so memory stays bounded), plain values exactly or, for floats, within the
tolerance. Torch is imported only when tensors are compared. Tolerance is numpy's and torch's ``allclose`` rule: ``|a - b| <= atol + rtol * |b|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..format.tree import key_path

if TYPE_CHECKING:
    import torch

__all__ = ["TensorComparison", "close", "compare_tensors", "flatten"]

_SLICE = 1 << 22
"""Elements compared at a time (32 MiB of float64 per operand)."""
_DTYPE_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "complex64": "C64", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def dtype_name(tensor: torch.Tensor) -> str:
    """The format's name for a tensor's dtype (``F32``), as ``inspect`` shows it."""
    name = str(tensor.dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


def flatten(tree: object, *, keys_are_names: bool = False) -> dict[str, object]:
    """Leaves of a state tree by key path (``['state'][0]['exp_avg']``); a model state dict
    (``keys_are_names``) keeps its names. Empty containers are leaves, so they compare too."""
    if keys_are_names and isinstance(tree, Mapping):
        return {str(k): v for k, v in tree.items()}
    out: dict[str, object] = {}

    def walk(value: object, path: tuple[object, ...]) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, (list, tuple)) and value:
            for i, v in enumerate(value):
                walk(v, (*path, i))
        else:
            out[key_path(path)] = value

    if tree is not None:
        walk(tree, ())
    return out


def close(a: object, b: object, *, atol: float, rtol: float) -> bool:
    """Whether two plain values match: floats (and ints mixed with floats) within the tolerance,
    NaN equal to NaN; anything else equal with the same type."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if isinstance(a, float) or isinstance(b, float):
            fa, fb = float(a), float(b)
            if math.isnan(fa) or math.isnan(fb):
                return math.isnan(fa) and math.isnan(fb)
            return fa == fb or abs(fa - fb) <= atol + rtol * abs(fb)
    return type(a) is type(b) and a == b


@dataclass
class TensorComparison:
    """Two tensors of the same dtype and shape, compared."""

    equal: bool
    """Bit for bit."""
    max_abs: float
    """Largest ``|a - b|`` (0.0 when equal; inf where exactly one is NaN or infinite)."""
    max_rel: float
    """Largest ``|a - b| / |b|`` (inf where ``b`` is 0 and ``a`` is not)."""
    within: bool
    """Every element within ``atol + rtol * |b|`` (NaN matches NaN)."""


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


def compare_tensors(a: torch.Tensor, b: torch.Tensor, *, atol: float, rtol: float) -> TensorComparison:
    """Compare tensors of one dtype and shape: bytes first (equal ones cost one memcmp), then
    values in float64 (complex128 for complex tensors) one slice at a time."""
    import torch

    if torch.equal(_bits(a), _bits(b)):
        return TensorComparison(True, 0.0, 0.0, True)
    wide = torch.complex128 if a.is_complex() else torch.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    max_abs = max_rel = 0.0
    within = True
    for start in range(0, fa.numel(), _SLICE):
        x = fa[start : start + _SLICE].to(wide)
        y = fb[start : start + _SLICE].to(wide)
        both_nan = torch.isnan(x) & torch.isnan(y)
        same = (x == y) | both_nan
        diff = (x - y).abs()
        diff = torch.where(same, torch.zeros_like(diff), torch.nan_to_num(diff, nan=math.inf, posinf=math.inf))
        scale = y.abs().to(torch.float64) if wide is torch.complex128 else y.abs()
        diff = diff.to(torch.float64)
        scale = torch.nan_to_num(scale.to(torch.float64), nan=math.inf, posinf=math.inf)
        rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(torch.nan_to_num(rel, nan=math.inf, posinf=math.inf).max()))
        within = within and bool(((diff == 0) | (diff <= atol + rtol * scale)).all())
    return TensorComparison(False, max_abs, max_rel, within)

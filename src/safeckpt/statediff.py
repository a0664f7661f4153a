"""How far apart two values of training state are: one NaN-aware difference for every comparison.

Shared by :func:`safeckpt.check_resume` and the demo's report, so both read a NaN the same way:
NaN against NaN is equal (a run that produced NaN reproduced it), NaN against a number is an
infinite difference (never 0, which ``diff > worst`` on a NaN would silently report).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["difference", "max_difference"]


def difference(a: object, b: object) -> float:
    """The largest absolute difference between ``a`` and ``b``: 0.0 when equal (NaN equals NaN),
    ``inf`` when they cannot be compared (shape, dtype or type differs) or one side is NaN."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        if a.numel() == 0 or torch.equal(a, b):
            return 0.0
        a64, b64 = a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64)
        both_nan = a64.isnan() & b64.isnan()
        diff = (a64 - b64).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf)
        return float(diff.max())
    if type(a) is not type(b):
        return math.inf
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return 0.0
        return abs(a - b) if math.isfinite(a - b) else math.inf
    if isinstance(a, int) and isinstance(b, int):
        return float(abs(a - b))
    return 0.0 if a == b else math.inf


def max_difference(a: Mapping[str, object], b: Mapping[str, object]) -> tuple[float, str]:
    """The largest :func:`difference` over the names of ``a`` and ``b``, and the name where it is
    (``inf`` and a description when the names differ)."""
    if a.keys() != b.keys():
        return math.inf, f"present in only one: {sorted(a.keys() ^ b.keys())[:3]}"
    worst, where = 0.0, ""
    for name, value in a.items():
        diff = difference(value, b[name])
        if diff > worst:
            worst, where = diff, name
    return worst, where

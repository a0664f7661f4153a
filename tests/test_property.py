"""Property: any state tree the format accepts comes back bit-exact, with its container types,
key types and order, and its tensor sharing (Hypothesis, 500 examples)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeckpt
from ckpt_tools import fingerprint

STRESS = os.environ.get("SAFECKPT_STRESS") == "1"

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64, torch.uint32,
    torch.uint16, torch.uint8, torch.bool,
]  # fmt: skip
"""Every dtype the format stores."""


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))  # () is 0-dim; a 0 makes it empty
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"]))
    full = (shape[0] * 2, *shape[1:]) if layout == "strided" and shape else shape
    count = 1
    for size in full:
        count *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=(count + 1) * itemsize, max_size=(count + 1) * itemsize)))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
    if layout == "offset":
        return flat[1:].reshape(full)  # a view that does not start at its storage's beginning
    tensor = flat[:count].reshape(full)
    if layout == "strided" and shape:
        return tensor[::2]
    if layout == "transposed" and len(shape) >= 2:
        return tensor.transpose(0, -1)
    return tensor


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
keys = st.one_of(st.text(max_size=6), st.integers(-(2**63), 2**64 - 1))


def trees(leaves: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys, children, max_size=4),
        ),
        max_leaves=12,
    )


@st.composite
def states(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], object]:
    pool = draw(st.lists(tensors(), min_size=1, max_size=4))
    # Leaves drawn from the pool: the same tensor object may appear at several places (shared).
    tree = draw(trees(st.one_of(scalars, st.sampled_from(pool))))
    names = draw(st.lists(st.text("abcdefghij._", min_size=1, max_size=6), min_size=1, max_size=3, unique=True))
    model = {name: draw(st.sampled_from(pool)) for name in names}  # tied entries too
    return model, tree


def tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


@settings(
    max_examples=2000 if STRESS else 500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(state=states())
def test_any_state_tree_round_trips_bit_exact(state: tuple[dict[str, torch.Tensor], object], tmp_path: Path) -> None:
    model, tree = state
    path = safeckpt.save_checkpoint(
        model, None, None, None, 1, directory=tmp_path, extra={"tree": tree}, rng=False, overwrite=True
    )
    ckpt = safeckpt.load_checkpoint(path, restore_rng=False)
    assert fingerprint(ckpt.extra["tree"]) == fingerprint(tree)
    # Model state comes back keyed by name (archive order, not insertion order).
    assert fingerprint(dict(sorted(ckpt.model_state.items()))) == fingerprint(dict(sorted(model.items())))
    # A tensor object used at several places is one tensor after loading too.
    before, after = tensors_in(tree), tensors_in(ckpt.extra["tree"])
    for i, first in enumerate(before):
        for j in range(i + 1, len(before)):
            if before[j] is first:
                assert after[j] is after[i]
    for a, b in ((a, b) for a in model for b in model if a < b and model[a] is model[b]):
        assert ckpt.model_state[a].data_ptr() == ckpt.model_state[b].data_ptr() or model[a].numel() == 0


def test_strings_utf8_cannot_encode_are_refused_before_writing(tmp_path: Path) -> None:
    for bad in ("\ud800", {"\udc00": 1}, ["ok", ("\udfff",)]):
        try:
            safeckpt.save_checkpoint({"a": torch.ones(1)}, None, None, None, 1, directory=tmp_path, extra={"x": bad}, rng=False)
        except safeckpt.UnsupportedValueError as exc:
            assert "surrogates not allowed" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was saved")
    assert not tmp_path.exists() or [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []

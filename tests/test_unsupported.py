"""Values the format cannot store are refused before anything is written, naming where they are."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import safeckpt


class Opaque:
    pass


@pytest.mark.parametrize(
    "extra, where, what",
    [
        ({"fn": lambda x: x}, "extra['fn']", "function"),
        ({"obj": [1, Opaque()]}, "extra['obj'][1]", "Opaque"),
        ({"sparse": torch.eye(3).to_sparse()}, "extra['sparse']", "to_dense"),
        ({"q": "quantized"}, "extra['q']", "quantized"),
        ({"set": {1, 2}}, "extra['set']", "set"),
        ({"d": {(1, 2): 3}}, "extra['d']", "keys must be str or int"),
        ({"big": 2**70}, "extra['big']", "64 bits"),
        ({"meta": torch.empty(2, device="meta")}, "extra['meta']", "meta"),
    ],
    ids=["lambda", "object", "sparse", "quantized", "set", "tuple-key", "bigint", "meta"],
)
def test_unsupported_value_names_key_path_and_writes_nothing(
    tmp_path: Path, extra: dict[str, object], where: str, what: str
) -> None:
    if extra.get("q") == "quantized":  # built here: creating it warns (deprecated API)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, None, None, 1, directory=tmp_path, extra=extra)
    assert isinstance(info.value, TypeError)
    assert where in str(info.value) and what in str(info.value)
    assert not tmp_path.exists() or not any(p.name.startswith("step-") for p in tmp_path.iterdir())
    assert not tmp_path.exists() or not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_non_json_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"config\['dtype'\].*dtype"):
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, {"dtype": torch.float32}, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"config\['lr'\].*nan"):
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, {"lr": float("nan")}, None, 1, directory=tmp_path)


@pytest.mark.parametrize(
    "metadata, message",
    [([("run", "a")], "metadata: expected a mapping"), ({"run": {1, 2}}, r"metadata\['run'\]")],
    ids=["not-a-mapping", "set-value"],
)
def test_bad_metadata_is_refused_before_anything_is_written(tmp_path: Path, metadata: object, message: str) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match=message):
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, None, None, 1, directory=tmp_path, metadata=metadata)  # type: ignore[arg-type]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_bad_step_is_refused(tmp_path: Path, step: object) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match="step"):
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, None, None, step, directory=tmp_path)  # type: ignore[arg-type]


def test_non_tensor_model_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"model\['x'\].*extra="):
        safeckpt.save_checkpoint({"x": 3}, None, None, None, 1, directory=tmp_path)


@pytest.mark.parametrize("part", ["config", "vocab", "metadata", "extra"])
def test_one_integer_rule_in_every_part(tmp_path: Path, part: str) -> None:
    """Integers beyond 64 bits are refused in the JSON parts as in the state trees (README table)."""
    value = {"tree": {"big": 2**70}} if part == "extra" else {"big": 2**70}
    kwargs = {"config": None, "vocab": None, **{part: value}}
    with pytest.raises(safeckpt.UnsupportedValueError, match="does not fit in 64 bits"):
        safeckpt.save_checkpoint(
            torch.nn.Linear(2, 2), None, kwargs["config"], kwargs["vocab"], 1, directory=tmp_path,
            **{k: v for k, v in kwargs.items() if k in ("metadata", "extra")},
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("part", ["config", "vocab", "metadata"])
def test_json_parts_convert_keys_as_json_does(tmp_path: Path, part: str) -> None:
    value = {2: "a", True: "b", None: "c"}
    kwargs = {"config": None, "vocab": None, "metadata": None, part: value}
    path = safeckpt.save_checkpoint(
        torch.nn.Linear(2, 2), None, kwargs["config"], kwargs["vocab"], 1, directory=tmp_path, metadata=kwargs["metadata"]
    )
    loaded = safeckpt.load_checkpoint(path)
    assert getattr(loaded, part) == {"2": "a", "true": "b", "null": "c"}

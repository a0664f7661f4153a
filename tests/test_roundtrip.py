"""Everything saved comes back exactly: tensors of every dtype, values and their types."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import assert_same_state
from conftest import TinyLM

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
]  # fmt: skip


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_tensors_of_every_dtype_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {"weight": _sample(dtype), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4))}
    path = safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path, rng=False)
    ckpt = safeckpt.load_checkpoint(path, restore_rng=False)
    assert_same_state(state, dict(sorted(ckpt.model_state.items(), key=lambda kv: list(state).index(kv[0]))))


def test_extra_tree_round_trips_with_types(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tree = {
        "tuple": (1, 2.5, "three", None, True, b"\x00\xff"),
        "nested": {"list": [[], {}, ()], 7: "int key", -3: [float("inf"), float("-inf")]},
        "non_contiguous": base.t(),
        "zero_dim": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "big_ints": [2**63 - 1, -(2**63), 2**64 - 1],
        "nan": float("nan"),
    }
    path = safeckpt.save_checkpoint({"w": base}, None, None, None, 2, directory=tmp_path, extra=tree)
    extra = safeckpt.load_checkpoint(path).extra
    assert_same_state({k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in tree.items()}, extra)


def test_shared_tensors_in_extra_are_stored_once_and_come_back_shared(tmp_path: Path) -> None:
    t = torch.randn(64)
    path = safeckpt.save_checkpoint({"w": t}, None, None, None, 1, directory=tmp_path, extra={"a": t, "b": [t]})
    extra = safeckpt.load_checkpoint(path).extra
    assert extra["a"] is extra["b"][0]
    assert (path / "extra.safetensors").stat().st_size < 2 * 64 * 4


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path, model: TinyLM) -> None:
    path = safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path)
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert "embed.weight" in f.keys() and "head.weight" not in f.keys()
        assert "head.weight" in f.metadata()["safeckpt.aliases"]
    torch.manual_seed(5)
    fresh = TinyLM()
    ckpt = safeckpt.load_checkpoint(path, model=fresh)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert ckpt.model_state["head.weight"] is ckpt.model_state["embed.weight"]


@dataclasses.dataclass
class TrainConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    out: Path = Path("runs/a")


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"lr": 0.1, "sizes": [1, 2]}, {"lr": 0.1, "sizes": [1, 2]}),
        (TrainConfig(), {"lr": 3e-4, "betas": [0.9, 0.95], "out": "runs/a"}),
        (argparse.Namespace(lr=0.5, name="x"), {"lr": 0.5, "name": "x"}),
    ],
    ids=["dict", "dataclass", "namespace"],
)
def test_config_kinds_are_stored_as_json(tmp_path: Path, config: object, expected: dict[str, object]) -> None:
    path = safeckpt.save_checkpoint({"w": torch.ones(1)}, None, config, None, 0, directory=tmp_path)
    assert safeckpt.load_checkpoint(path).config == expected


@pytest.mark.parametrize("vocab", [["<pad>", "a", "é", "🙂"], {"<pad>": 0, "a": 1}], ids=["list", "dict"])
def test_vocab_round_trips(tmp_path: Path, vocab: object) -> None:
    path = safeckpt.save_checkpoint({"w": torch.ones(1)}, None, None, vocab, 0, directory=tmp_path)
    assert safeckpt.load_checkpoint(path).vocab == vocab


def test_optimizer_state_dict_may_be_passed_instead_of_optimizer(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    path = safeckpt.save_checkpoint(model.state_dict(), optimizer.state_dict(), None, None, 3, directory=tmp_path)
    restored = safeckpt.load_checkpoint(path).optimizer_state
    assert isinstance(restored, dict)
    assert_same_state(optimizer.state_dict(), restored)


def test_step_folders_sort_by_step(tmp_path: Path) -> None:
    for step in (100, 9, 20):
        safeckpt.save_checkpoint({"w": torch.ones(1)}, None, None, None, step, directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "step-00000009", "step-00000020", "step-00000100",
    ]  # fmt: skip
    assert safeckpt.load_checkpoint(tmp_path).step == 100


def test_saving_an_existing_step_needs_overwrite(tmp_path: Path) -> None:
    safeckpt.save_checkpoint({"w": torch.zeros(2)}, None, None, None, 5, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointExistsError, match="overwrite=True"):
        safeckpt.save_checkpoint({"w": torch.ones(2)}, None, None, None, 5, directory=tmp_path)
    assert torch.equal(safeckpt.load_checkpoint(tmp_path).model_state["w"], torch.zeros(2))
    safeckpt.save_checkpoint({"w": torch.ones(2)}, None, None, None, 5, directory=tmp_path, overwrite=True)
    assert torch.equal(safeckpt.load_checkpoint(tmp_path).model_state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-00000005"]


def test_metadata_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    path = safeckpt.save_checkpoint(
        {"w": torch.ones(1)}, None, None, None, 0, directory=tmp_path, metadata={"run": "abc", "loss": 1.5}
    )
    ckpt = safeckpt.load_checkpoint(path)
    assert ckpt.metadata == {"run": "abc", "loss": 1.5}
    assert ckpt.manifest is not None and ckpt.manifest.producer["safeckpt"] == safeckpt.__version__


def test_same_state_gives_same_bytes(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
    a = safeckpt.save_checkpoint(model, optimizer, {"x": 1}, ["a"], 1, directory=tmp_path / "a", rng=False)
    b = safeckpt.save_checkpoint(model, optimizer, {"x": 1}, ["a"], 1, directory=tmp_path / "b", rng=False)
    for f in a.iterdir():
        if f.name != "manifest.json":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name

"""``config=`` as users have it: every kind round-trips through config.json, converted as JSON does."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import safeckpt
from safeckpt.configs import TRANSFORMERS_CONFIG_KEY, config_to_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def roundtrip(config: object, tmp_path: Path) -> safeckpt.Checkpoint:
    path = safeckpt.save_checkpoint(torch.nn.Linear(2, 2), None, config, None, 1, directory=tmp_path, rng=False)
    return safeckpt.load_checkpoint(path, restore_rng=False)


@dataclasses.dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass
class TrainConfig:
    name: str = "run"
    layers: int = 2
    optim: Optim = dataclasses.field(default_factory=Optim)
    out: Path = Path("/tmp/out")


def test_dict_with_int_keys_is_stored_as_json_does(tmp_path: Path) -> None:
    config = {"id2label": {0: "neg", 1: "pos"}, "flags": {True: 1, None: 2, 1.5: 3}}
    ckpt = roundtrip(config, tmp_path)
    assert ckpt.config == {"id2label": {"0": "neg", "1": "pos"}, "flags": {"true": 1, "null": 2, "1.5": 3}}


def test_dataclass_nested_and_paths(tmp_path: Path) -> None:
    ckpt = roundtrip(TrainConfig(), tmp_path)
    assert ckpt.config == {"name": "run", "layers": 2, "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "out": "/tmp/out"}


def test_namespace(tmp_path: Path) -> None:
    ckpt = roundtrip(argparse.Namespace(lr=0.1, steps=10, tags=("a", "b")), tmp_path)
    assert ckpt.config == {"lr": 0.1, "steps": 10, "tags": ["a", "b"]}


def test_omegaconf_dictconfig_resolves_interpolations(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"model": {"dim": 64, "hidden": "${model.dim}"}, "ids": {3: "x"}})
    ckpt = roundtrip(config, tmp_path)
    assert ckpt.config == {"model": {"dim": 64, "hidden": 64}, "ids": {"3": "x"}}
    assert omegaconf.OmegaConf.create(ckpt.config).model.hidden == 64


def test_object_with_to_dict(tmp_path: Path) -> None:
    class Settings:
        def to_dict(self) -> dict[str, object]:
            return {"width": 8, "labels": {0: "a"}}

    assert roundtrip(Settings(), tmp_path).config == {"width": 8, "labels": {"0": "a"}}


def test_numpy_scalars_become_python_numbers(tmp_path: Path) -> None:
    config = {"lr": np.float32(0.5), "steps": np.int64(7), "on": np.bool_(True)}
    ckpt = roundtrip(config, tmp_path)
    assert ckpt.config == {"lr": 0.5, "steps": 7, "on": True}
    assert [type(v) for v in ckpt.config.values()] == [float, int, bool]


def test_transformers_config_rebuilds_an_equal_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)  # fmt: skip
    ckpt = roundtrip(config, tmp_path)
    assert ckpt.config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert transformers.GPT2Config(**ckpt.config) == config
    assert ckpt.metadata[TRANSFORMERS_CONFIG_KEY]["model_type"] == "gpt2"
    assert ckpt.metadata[TRANSFORMERS_CONFIG_KEY]["class"].endswith("GPT2Config")


def test_transformers_config_read_from_disk_keeps_its_version(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, bos_token_id=0,
                            eos_token_id=0).save_pretrained(tmp_path / "hf")  # fmt: skip
    config = transformers.GPT2Config.from_pretrained(tmp_path / "hf")
    ckpt = roundtrip(config, tmp_path / "run")
    assert transformers.GPT2Config(**ckpt.config) == config


@pytest.mark.parametrize(
    ("config", "where", "fix"),
    [
        ({"a": {"b": {1, 2}}}, "config['a']['b']", "sorted list"),
        ({"t": torch.zeros(2)}, "config['t']", ".tolist()"),
        ({"x": float("nan")}, "config['x']", "use None or a string"),
        ({"k": {(1, 2): 3}}, "config['k']", "convert it to str"),
        ({"k": {1: "a", "1": "b"}}, "config['k']", "rename one of them"),
        ({"o": object()}, "config['o']", "convert it to str"),
    ],
)
def test_values_json_cannot_hold_name_the_key_and_the_fix(config: object, where: str, fix: str, tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError) as info:
        safeckpt.save_checkpoint(torch.nn.Linear(2, 2), None, config, None, 1, directory=tmp_path)
    assert where in str(info.value) and fix in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing is written when the config is refused"


def test_unknown_config_type_says_what_is_accepted() -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match="dataclass, argparse.Namespace, OmegaConf"):
        config_to_json(42)

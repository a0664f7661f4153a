"""safeckpt.numpy reads what the torch writer wrote, without importing torch; and a checkpoint's
model.safetensors opens with the plain safetensors library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import safeckpt
import safeckpt.numpy
from safeckpt.numpy import NUMPY_DTYPES
from safeckpt.torch.tensors import TORCH_DTYPES

ROOT = Path(__file__).resolve().parent.parent


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """The bytes of ``t`` reinterpreted as the matching numpy dtype (works for bf16/f8 too)."""
    name = next(k for k, v in TORCH_DTYPES.items() if v == t.dtype)
    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    return raw.view(NUMPY_DTYPES[name]).reshape(tuple(t.shape))


def _same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_numpy_reader_matches_the_torch_loader(saved: Path) -> None:
    ref = safeckpt.load_checkpoint(saved, restore_rng=False)
    got = safeckpt.numpy.load_checkpoint(saved)
    assert (got.step, got.config, got.vocab, got.metadata) == (ref.step, ref.config, ref.vocab, ref.metadata)
    assert got.manifest == ref.manifest and got.path == ref.path
    assert sorted(got.model_state) == sorted(ref.model_state)
    for name, tensor in ref.model_state.items():
        _same_array(got.model_state[name], _as_numpy(tensor))
    assert got.model_state["head.weight"] is got.model_state["embed.weight"]  # tied stays tied
    assert got.extra == {"loader": {"epoch": 1, "offset": 12}}
    opt = got.optimizer_state
    assert isinstance(opt, dict) and opt["param_groups"][0]["betas"] == ref.optimizer_state["param_groups"][0]["betas"]  # type: ignore[index]
    assert type(opt["param_groups"][0]["betas"]) is tuple
    for pid, state in ref.optimizer_state["state"].items():  # type: ignore[index]
        for key, value in state.items():
            _same_array(opt["state"][pid][key], _as_numpy(value))
    assert isinstance(got.rng_state, dict) and isinstance(got.rng_state["torch"], np.ndarray)
    assert got.rng_state["torch"].dtype == np.uint8


def test_every_dtype_round_trips_through_numpy(tmp_path: Path) -> None:
    state = {name: torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype) for name, dtype in TORCH_DTYPES.items()}
    state["scalar"], state["empty"] = torch.tensor(3, dtype=torch.int16), torch.zeros(0, 5, dtype=torch.bfloat16)
    path = safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path, rng=False)
    got = safeckpt.numpy.load_checkpoint(path)
    for name, tensor in state.items():
        _same_array(got.model_state[name], _as_numpy(tensor))
    assert str(got.model_state["BF16"].dtype) == "bfloat16"
    assert got.model_state["F32"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"x" * (p / "model.safetensors").stat().st_size), safeckpt.CheckpointCorruptedError),
        (lambda p: (p / "vocab.json").unlink(), safeckpt.CheckpointNotFoundError),
        (lambda p: (p / "manifest.json").write_text("{}"), safeckpt.UnsupportedFormatError),
    ],
)
def test_same_errors_as_the_torch_loader(saved: Path, damage: object, error: type[Exception]) -> None:
    damage(saved)  # type: ignore[operator]
    with pytest.raises(error) as torch_error:
        safeckpt.load_checkpoint(saved, restore_rng=False)
    with pytest.raises(error) as numpy_error:
        safeckpt.numpy.load_checkpoint(saved)
    assert str(numpy_error.value) == str(torch_error.value)


def test_reading_never_imports_torch(saved: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        import safeckpt, safeckpt.numpy
        ckpt = safeckpt.numpy.load_checkpoint({str(saved)!r})
        manifest = safeckpt.verify_checkpoint({str(saved)!r})
        print(json.dumps({{"torch": "torch" in sys.modules, "step": ckpt.step, "files": len(manifest.files),
                          "tensors": sorted(ckpt.model_state)}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    assert result["torch"] is False, "safeckpt.numpy or verify_checkpoint imported torch"
    assert result["step"] == 3 and result["files"] >= 5 and "embed.weight" in result["tensors"]


def test_import_safeckpt_is_light_until_torch_api_is_used() -> None:
    script = (
        "import sys, safeckpt; a = 'torch' in sys.modules; safeckpt.save_checkpoint; "
        "print(a, 'torch' in sys.modules, sorted(safeckpt.__all__) == sorted(n for n in safeckpt.__all__ if hasattr(safeckpt, n)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


@pytest.mark.parametrize("framework", ["pt", "numpy"])
def test_model_archive_opens_with_plain_safetensors(tmp_path: Path, framework: str) -> None:
    embed = torch.randn(5, 3)
    state = {"embed.weight": embed, "head.weight": embed, "norm.bias": torch.zeros(3, dtype=torch.float64),
             "steps": torch.tensor(4), "mask": torch.tensor([True, False])}
    if framework == "pt":
        state["half"] = torch.randn(2, 2).to(torch.bfloat16)
    path = safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path, rng=False)
    with safe_open(str(path / "model.safetensors"), framework=framework) as archive:
        assert archive.metadata()["format"] == "pt"
        assert json.loads(archive.metadata()["safeckpt.aliases"]) == {"head.weight": "embed.weight"}
        names = set(archive.keys())
        assert names == set(state) - {"head.weight"}  # the tied tensor is stored once
        for name in names:
            value = archive.get_tensor(name)
            if framework == "pt":
                assert value.dtype == state[name].dtype and torch.equal(value, state[name])
            else:
                np.testing.assert_array_equal(value, state[name].numpy())
                assert value.dtype == state[name].numpy().dtype

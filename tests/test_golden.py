"""Golden checkpoints: every format version ever released stays loadable, forever.

tests/golden/v1 was written once by safeckpt 0.1 (tests/golden/make_v1.py) and is never
regenerated; its expected.json was recorded from the state in memory at save time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import safeckpt
import safeckpt.numpy

GOLDEN = Path(__file__).resolve().parent / "golden"
V1 = GOLDEN / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())


def _make_v1() -> ModuleType:
    spec = importlib.util.spec_from_file_location("golden_make_v1", GOLDEN / "make_v1.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _facts(t: torch.Tensor | np.ndarray) -> dict[str, object]:
    if isinstance(t, np.ndarray):
        return {"shape": list(t.shape), "sha256": hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()}
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "first": t.detach().reshape(-1)[:3].tolist()}


def test_v1_manifest_verifies() -> None:
    manifest = safeckpt.verify_checkpoint(V1 / EXPECTED["path"])
    assert manifest.format_version == (1, 0) and manifest.step == 3
    assert manifest.producer["safeckpt"] == "0.1.0"


@pytest.mark.parametrize("where", ["folder", "root", "manifest"])
def test_v1_loads_into_fresh_objects_and_training_continues(where: str) -> None:
    path = {"folder": V1 / EXPECTED["path"], "root": V1, "manifest": V1 / EXPECTED["path"] / "manifest.json"}[where]
    model = _make_v1().GoldenLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    ckpt = safeckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)

    assert ckpt.step == EXPECTED["step"] and ckpt.config == EXPECTED["config"] and ckpt.vocab == EXPECTED["vocab"]
    assert ckpt.metadata == EXPECTED["metadata"]
    assert {k: _facts(v) for k, v in model.state_dict().items()} == EXPECTED["model"]
    for alias, stored in EXPECTED["tied"]:
        assert model.get_parameter(alias) is model.get_parameter(stored)
    groups = optimizer.state_dict()["param_groups"]
    for saved, group in zip(EXPECTED["optimizer"]["param_groups"], groups, strict=True):
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k in saved} == saved
    state = optimizer.state_dict()["state"]
    assert {str(pid): {k: _facts(v) for k, v in s.items()} for pid, s in state.items()} == EXPECTED["optimizer"]["state"]
    assert {k: v for k, v in scheduler.state_dict().items() if k in EXPECTED["scheduler"]} == EXPECTED["scheduler"]
    extra = ckpt.extra
    assert extra["loader"] == {"epoch": 0, "offset": 15, "order": (2, 0, 1)}
    assert extra["ema"]["decay"] == EXPECTED["extra"]["ema_decay"]
    assert _facts(extra["ema"]["shadow"]) == EXPECTED["extra"]["ema_shadow"]
    assert extra["counters"] == {0: 3, 1: 9} and extra["tag"] == bytes.fromhex(EXPECTED["extra"]["tag_hex"])
    assert set(ckpt.rng_state) >= {"python", "torch"}  # type: ignore[arg-type]

    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(7))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 11), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and int(optimizer.state_dict()["state"][0]["step"]) == 4


def test_v1_reads_with_numpy() -> None:
    ckpt = safeckpt.numpy.load_checkpoint(V1)
    assert ckpt.step == 3 and ckpt.config == EXPECTED["config"]
    for name, facts in EXPECTED["model"].items():
        assert _facts(ckpt.model_state[name]) == {"shape": facts["shape"], "sha256": facts["sha256"]}
    assert ckpt.model_state["head.weight"] is ckpt.model_state["embed.weight"]
    assert ckpt.scheduler_state["base_lrs"] == EXPECTED["scheduler"]["base_lrs"]  # type: ignore[index]

"""Model weights load by canonical name: wrapped (DataParallel, DDP, torch.compile) or not, and a
non-strict load reports what it skipped instead of silently loading nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("wrap", ["data_parallel", "compile", "compile_of_data_parallel"])
def test_wrapped_model_saves_canonical_names_and_loads_both_ways(tmp_path: Path, model: TinyLM, wrap: str) -> None:
    def wrapped(m: torch.nn.Module) -> torch.nn.Module:
        if wrap == "data_parallel":
            return torch.nn.DataParallel(m)
        if wrap == "compile":
            return torch.compile(m)  # type: ignore[return-value]
        return torch.compile(torch.nn.DataParallel(m))  # type: ignore[return-value]

    saved = wrapped(model)
    assert any(k.startswith(("module.", "_orig_mod.")) for k in saved.state_dict())  # the premise
    path = safeckpt.save_checkpoint(saved, None, None, None, 1, directory=tmp_path / "a")
    ckpt = safeckpt.load_checkpoint(path)
    assert set(ckpt.model_state) == set(model.state_dict())  # stored without wrapper prefixes

    plain = TinyLM(dim=8)
    safeckpt.load_checkpoint(path, model=plain, strict=True)
    assert _same_weights(plain, model)
    plain.head.weight.data.add_(1)  # tied weights came back tied
    assert torch.equal(plain.embed.weight, plain.head.weight)

    # and a checkpoint of the plain model loads into a wrapped one, strictly
    plain_path = safeckpt.save_checkpoint(model, None, None, None, 2, directory=tmp_path / "b")
    target = TinyLM(dim=8)
    safeckpt.load_checkpoint(plain_path, model=wrapped(target), strict=True)
    assert _same_weights(target, model)


def test_prefixed_state_dict_from_another_tool_loads_into_the_plain_model(tmp_path: Path, model: TinyLM) -> None:
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    safeckpt.save_checkpoint(prefixed, None, None, None, 1, directory=tmp_path)
    target = TinyLM()
    safeckpt.load_checkpoint(tmp_path, model=target, strict=True)
    assert _same_weights(target, model)


def test_non_strict_load_reports_missing_and_unexpected_keys(tmp_path: Path, model: TinyLM) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}
    state["old_head.bias"] = torch.zeros(3)
    safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path)
    target = TinyLM()
    ckpt = safeckpt.load_checkpoint(tmp_path, model=target, strict=False)
    assert sorted(ckpt.missing_keys) == ["norm.bias", "norm.weight"]
    assert ckpt.unexpected_keys == ["old_head.bias"]
    assert torch.equal(target.hidden.weight, model.hidden.weight)
    assert safeckpt.load_checkpoint(tmp_path, model=TinyLM(), strict=False, restore_rng=False).missing_keys
    full = safeckpt.load_checkpoint(
        safeckpt.save_checkpoint(model, None, None, None, 2, directory=tmp_path), model=TinyLM()
    )
    assert full.missing_keys == [] and full.unexpected_keys == []


def test_a_load_that_matches_no_tensor_raises_even_when_not_strict(tmp_path: Path, model: TinyLM) -> None:
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    before = [p.clone() for p in other.parameters()]
    for strict in (True, False):
        with pytest.raises(safeckpt.CheckpointMismatchError, match="no tensor of the checkpoint matches Sequential") as info:
            safeckpt.load_checkpoint(tmp_path, model=other, strict=strict)
        assert "strict=False" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_shape_mismatch_does_not_suggest_strict_false(tmp_path: Path, model: TinyLM) -> None:
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path)
    for strict in (True, False):
        with pytest.raises(safeckpt.CheckpointMismatchError, match="differ in shape") as info:
            safeckpt.load_checkpoint(tmp_path, model=TinyLM(dim=4), strict=strict)
        assert "strict=False" not in str(info.value)


def test_missing_keys_suggest_strict_false(tmp_path: Path, model: TinyLM) -> None:
    state = {k: v for k, v in model.state_dict().items() if k != "calls"}
    safeckpt.save_checkpoint(state, None, None, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointMismatchError, match="missing keys: calls.*pass strict=False"):
        safeckpt.load_checkpoint(tmp_path, model=TinyLM())


def test_mismatch_message_of_a_big_model_stays_short(tmp_path: Path) -> None:
    def stack(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(40)))

    safeckpt.save_checkpoint(stack(4), None, None, None, 1, directory=tmp_path)
    with pytest.raises(safeckpt.CheckpointMismatchError) as info:
        safeckpt.load_checkpoint(tmp_path, model=stack(3))
    message = str(info.value)
    assert "80 tensors differ in shape, e.g. 0.weight: checkpoint has (4, 4) float32, model has (3, 3) float32" in message
    assert len(message) < 600, message

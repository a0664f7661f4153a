"""``safeckpt diff``: what it reports for each part, the tolerance gate and its exit codes, and
that equal parts are only stream-verified and equal tensors cost nothing."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import flip_bits
from cli_tools import cli, cli_process
from conftest import TinyLM, train_steps
from safeckpt.cli import _files
from safeckpt.cli._compare import close, compare_tensors


def _save(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int, **kwargs: object) -> Path:
    kwargs.setdefault("config", {"lr": 1e-2})
    kwargs.setdefault("vocab", ["a", "b"])
    return safeckpt.save_checkpoint(model, optimizer, kwargs.pop("config"), kwargs.pop("vocab"), step, directory=root, **kwargs)  # type: ignore[call-overload,no-any-return]


@pytest.fixture
def pair(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer) -> tuple[Path, Path]:
    """The same state saved twice (steps 1 and 2) with equal RNG: byte-identical trees."""
    torch.manual_seed(1)
    a = _save(tmp_path / "a", model, optimizer, 1, extra={"data": {"epoch": 1}})
    torch.manual_seed(1)
    b = _save(tmp_path / "b", model, optimizer, 2, extra={"data": {"epoch": 1}})
    return a, b


def test_identical_parts_are_not_parsed(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = _files.read_verified
    monkeypatch.setattr(_files, "read_verified", lambda folder, entries, **kw: (read.extend(e.name for e in entries), real(folder, entries, **kw))[1])
    result = cli(capsys, "diff", "--json", *pair)
    assert result.code == 0
    report = result.json("diff")
    assert report["step"] == {"a": 1, "b": 2} and report["within_tolerance"] is True
    assert all(part["identical"] for part in report["parts"].values())  # type: ignore[union-attr]
    assert read == []


def test_weights_compared_with_tolerance(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "a", model, None, 1, rng=False)
    with torch.no_grad():
        target = float(model.hidden.weight[0, 0]) + 1e-3
        model.hidden.weight[0, 0] = target
        model.norm.weight[:2] = 0.0  # was 1.0: relative to B's 0, infinitely different
    b = _save(tmp_path / "b", model, None, 1, rng=False)
    exact = cli(capsys, "diff", "--json", a, b)
    assert exact.code == 1
    report = exact.json("diff")
    tensors = {t["name"]: t for t in report["parts"]["model"]["tensors"]}  # type: ignore[index]
    assert tensors["embed.weight"]["equal"] and tensors["embed.weight"]["max_abs"] == 0.0
    hidden = tensors["hidden.weight"]
    assert not hidden["equal"] and not hidden["within_tolerance"]
    assert hidden["max_abs"] == pytest.approx(1e-3, rel=1e-3) and hidden["max_rel"] == pytest.approx(1e-3 / abs(target), rel=1e-3)
    norm = tensors["norm.weight"]
    assert norm["max_abs"] == 1.0 and norm["max_rel"] is None  # null: infinite
    assert report["parts"]["model"]["added"] == [] and report["parts"]["config"]["identical"]  # type: ignore[index]
    assert cli(capsys, "diff", a, b, "--atol", "1e-2").code == 1
    loose = cli(capsys, "diff", a, b, "--atol", "1")
    assert loose.code == 0 and "within tolerance" in loose.out and "max rel inf" in loose.out


def test_structure_changes(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "a", model.state_dict(), None, 1, rng=False, config={"lr": 1e-2, "layers": 1})
    state = dict(model.state_dict())
    del state["calls"]
    state["extra.weight"] = torch.ones(3)
    state["hidden.bias"] = state["hidden.bias"].double()
    state["norm.weight"] = torch.ones(4)
    b = _save(tmp_path / "b", state, None, 1, rng=False, config={"lr": 2e-2, "depth": 3}, vocab=["a", "c"])
    result = cli(capsys, "diff", "--json", a, b)
    assert result.code == 1
    report = result.json("diff")
    model_part = report["parts"]["model"]  # type: ignore[index]
    assert model_part["added"] == [{"name": "extra.weight", "dtype": "F32", "shape": [3]}]
    assert model_part["removed"] == [{"name": "calls", "dtype": "I64", "shape": []}]
    assert {c["name"]: (c["a"]["dtype"], c["b"]["dtype"], c["b"]["shape"]) for c in model_part["changed"]} == {
        "hidden.bias": ("F32", "F64", [8]),
        "norm.weight": ("F32", "F32", [4]),
    }
    config = report["parts"]["config"]  # type: ignore[index]
    assert {(c["path"], c["change"]) for c in config["changes"]} == {("['lr']", "changed"), ("['layers']", "removed"), ("['depth']", "added")}
    assert report["parts"]["vocab"]["count"] == 1  # type: ignore[index]
    text = cli(capsys, "diff", a, b).out
    assert "+ extra.weight" in text and "- calls" in text and "~ hidden.bias" in text and "config['lr']: 0.01 -> 0.02" in text


def test_optimizer_scheduler_extra_and_metadata(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train_steps(model, opt, 1)
    a = _save(tmp_path / "a", model, opt, 1, scheduler=sched, extra={"data": {"epoch": 1, "seen": [1, 2]}}, metadata={"run": "x"})
    train_steps(model, opt, 1)
    sched.step()
    b = _save(tmp_path / "b", model, opt, 2, scheduler=sched, extra={"data": {"epoch": 2, "seen": [1, 2]}}, metadata={"run": "y"})
    result = cli(capsys, "diff", "--json", a, b)
    assert result.code == 1
    report = result.json("diff")
    parts = report["parts"]
    optimizer_tensors = {t["name"] for t in parts["optimizer"]["tensors"] if not t["equal"]}  # type: ignore[index]
    assert "['state'][0]['exp_avg']" in optimizer_tensors and "['state'][0]['step']" in optimizer_tensors
    assert any(v["path"] == "['last_epoch']" for v in parts["scheduler"]["values"])  # type: ignore[index]
    assert parts["extra"]["values"] == [{"path": "['data']['epoch']", "change": "changed", "a": 1, "b": 2}]  # type: ignore[index]
    assert report["metadata"] == [{"path": "['run']", "change": "changed", "a": "x", "b": "y"}]
    only_model = cli(capsys, "diff", "--json", "--part", "model", a, b).json("diff")
    assert set(only_model["parts"]) == {"model"}  # type: ignore[arg-type]


def test_part_restricts_the_gate(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "a", model, None, 1, rng=False, config={"lr": 1e-2})
    b = _save(tmp_path / "b", model, None, 2, rng=False, config={"lr": 2e-2})
    only_model = cli(capsys, "diff", a, b, "--part", "model")
    assert only_model.code == 0 and "config" not in only_model.out and "model: identical" in only_model.out
    with_config = cli(capsys, "diff", "--json", a, b, "--part", "model", "--part", "config")
    assert with_config.code == 1
    assert list(with_config.json("diff")["parts"]) == ["config", "model"]  # type: ignore[arg-type]
    assert cli(capsys, "diff", a, b).code == 1  # without --part, config gates


def test_metadata_and_step_never_gate(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "a", model, None, 1, rng=False, metadata={"host": "a"})
    b = _save(tmp_path / "b", model, None, 7, rng=False, metadata={"host": "b"})
    assert cli(capsys, "diff", a, b).code == 0


def test_a_missing_tree_is_all_added(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "a", model, None, 1, rng=False)
    b = _save(tmp_path / "b", model, optimizer, 1, rng=False)
    report = cli(capsys, "diff", "--json", a, b).json("diff")
    part = report["parts"]["optimizer"]  # type: ignore[index]
    assert part["a"] is False and part["b"] is True and len(part["added"]) == 15 and report["within_tolerance"] is False


def test_damaged_file_is_an_error_not_a_difference(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], model: TinyLM) -> None:
    a, b = pair
    shutil.rmtree(b)
    with torch.no_grad():
        model.hidden.weight.add_(1)
    b = _save(b.parent, model, None, 2, rng=False)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "model.safetensors").write_bytes(bytes(data))
    result = cli(capsys, "diff", a, b)
    assert result.code == 1 and "model.safetensors" in result.err and "SHA-256" in result.err


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "optimizer.safetensors"])
def test_damaged_copy_is_an_error_not_identical(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    a, _ = pair
    copy = a.parent / "copy"
    shutil.copytree(a, copy)  # same manifest, so the same SHA-256 values: only the bytes can tell
    flip_bits(copy / name, -3)
    for args in ((a, copy), (copy, a), (copy, copy)):
        result = cli(capsys, "diff", *args)
        assert result.code == 1 and "identical" not in result.out, result.out
        assert f"{copy / name}: SHA-256 is" in result.err
    assert cli(capsys, "diff", a, copy, "--part", "model" if name != "model.safetensors" else "rng").code == 0


def test_identical_checkpoints_compare_without_torch(pair: tuple[Path, Path]) -> None:
    result = cli_process("diff", "--json", *pair, python_flags=("-X", "importtime"))
    assert result.code == 0, result.err
    assert result.json("diff")["within_tolerance"] is True
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.err.splitlines() if line.startswith("import time:")]
    assert "safeckpt.cli.diff" in imported and "torch" not in imported


def test_diff_in_a_process(tmp_path: Path, model: TinyLM) -> None:
    a = _save(tmp_path / "a", model, None, 1, rng=False)
    b = _save(tmp_path / "b", model, None, 1, rng=False, config={"lr": 2e-2})
    result = cli_process("diff", a, b)
    assert result.code == 1 and "config['lr']: 0.01 -> 0.02" in result.out and "DIFFERENT" in result.out


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.int64, torch.uint64, torch.int8, torch.complex64],
)
def test_compare_tensors_numbers(dtype: torch.dtype) -> None:
    a = torch.tensor([2.0, 4.0, 8.0, 0.0]).to(dtype)
    b = torch.tensor([2.0, 5.0, 8.0, 0.0]).to(dtype)
    same = compare_tensors(a, a.clone(), atol=0, rtol=0)
    assert same.equal and same.max_abs == 0.0 and same.within
    result = compare_tensors(a, b, atol=0, rtol=0)
    assert not result.equal and result.max_abs == 1.0 and result.max_rel == pytest.approx(0.2) and not result.within
    assert compare_tensors(a, b, atol=1.0, rtol=0).within and compare_tensors(a, b, atol=0, rtol=0.2).within
    assert not compare_tensors(a, b, atol=0.99, rtol=0).within


def test_compare_tensors_special_values() -> None:
    nan, inf = math.nan, math.inf
    a = torch.tensor([nan, inf, 1.0, 0.0])
    assert compare_tensors(a, a.clone(), atol=0, rtol=0).within  # bit-equal NaN
    b = torch.tensor([float("nan"), inf, 1.0, 0.0]) * torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert compare_tensors(a, b, atol=0, rtol=0).within  # NaN matches NaN even if bits differ
    c = torch.tensor([1.0, inf, 1.0, 0.0])
    res = compare_tensors(a, c, atol=1e9, rtol=1e9)
    assert res.max_abs == inf and not res.within  # NaN vs a number: infinitely different
    d = torch.tensor([nan, inf, 1.0, 1e-3])
    res = compare_tensors(d, a, atol=0, rtol=1.0)
    assert res.max_rel == inf and not res.within  # relative to B's 0
    assert compare_tensors(torch.tensor([True, False]), torch.tensor([True, True]), atol=0, rtol=0).max_abs == 1.0
    assert compare_tensors(torch.zeros(0), torch.zeros(0), atol=0, rtol=0).equal


def test_close_for_plain_values() -> None:
    assert close(1.0, 1.0 + 1e-9, atol=1e-6, rtol=0) and not close(1.0, 1.1, atol=1e-6, rtol=0)
    assert close(math.nan, math.nan, atol=0, rtol=0) and not close(math.nan, 1.0, atol=1, rtol=1)
    assert not close(1, True, atol=0, rtol=0) and not close("1", 1, atol=0, rtol=0) and close(2, 2.0, atol=0, rtol=0)

"""The JavaScript reader (spec/readers/js) reads a checkpoint the Python writer just saved."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import safeckpt
import safeckpt.numpy
from safeckpt.storage.tuning import TUNING

JS = Path(__file__).resolve().parent.parent / "spec" / "readers" / "js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (Node >= 18 runs the JavaScript reader)"),
    pytest.mark.skipif(
        not (JS / "node_modules" / "@msgpack" / "msgpack").is_dir(),
        reason="JavaScript reader dependencies missing: run `npm ci --prefix spec/readers/js` (make test does)",
    ),
]


def _cli(path: Path) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, str(JS / "cli.mjs"), str(path)], capture_output=True, text=True, timeout=120)


def _python_listing(path: Path) -> list[dict[str, object]]:
    """What the CLI must print for "tensors", computed by the numpy reader."""
    rows: list[dict[str, object]] = []
    for entry in safeckpt.verify_checkpoint(path).files:
        if entry.name.endswith(".safetensors"):
            arrays, _ = safeckpt.numpy.arrays_from_buffer(bytearray((path / entry.name).read_bytes()), source=entry.name)
            rows += [
                {"file": entry.name, "name": name, "dtype": next(k for k, d in safeckpt.numpy.NUMPY_DTYPES.items() if d == a.dtype),
                 "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                for name, a in arrays.items()
            ]
    return rows


def test_js_reader_reads_a_fresh_checkpoint(saved: Path) -> None:
    run = _cli(saved.parent)  # the root: the reader must pick the newest step itself
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    ckpt = safeckpt.load_checkpoint(saved, restore_rng=False)
    assert out["step"] == ckpt.step and out["config"] == ckpt.config and out["vocab"] == ckpt.vocab
    assert out["tensors"] == _python_listing(saved)
    files = {row["file"] for row in out["tensors"]}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}  # extra.safetensors holds none
    model_rows = {row["name"]: row for row in out["tensors"] if row["file"] == "model.safetensors"}
    weight = ckpt.model_state["embed.weight"]
    assert model_rows["embed.weight"]["sha256"] == hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    assert "head.weight" not in model_rows  # tied: stored once


def test_js_reader_reads_every_dtype(tmp_path: Path) -> None:
    from safeckpt.torch.tensors import TORCH_DTYPES

    state = {name: torch.arange(4, dtype=torch.float32).to(dtype) for name, dtype in TORCH_DTYPES.items()}
    path = safeckpt.save_checkpoint(state, None, {"big": 2**64 - 1, "x": 2.0}, None, 9, directory=tmp_path,
                                    extra={"t": (torch.zeros(0), b"\x00", {3: float("nan")})})
    run = _cli(path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["config"] == {"big": 2**64 - 1, "x": 2.0} and type(out["config"]["x"]) is float
    assert out["tensors"] == _python_listing(path)
    assert {row["dtype"] for row in out["tensors"] if row["file"] == "model.safetensors"} == set(TORCH_DTYPES)


def test_js_reader_reads_a_chunked_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Format 1.1: the JS reader validates the chunk digests' layout and verifies whole files."""

    monkeypatch.setattr(TUNING, "min_cores_for_chunks", 1)
    monkeypatch.setattr(TUNING, "min_chunk", 65536)
    state = {"w": torch.arange(50_000, dtype=torch.float32)}
    path = safeckpt.save_checkpoint(state, None, None, None, 4, directory=tmp_path, rng=False)
    manifest = json.loads((path / "manifest.json").read_bytes())
    assert manifest["format_version"] == "1.1" and len(manifest["files"]["model.safetensors"]["chunks"]["sha256"]) == 4
    run = _cli(path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tensors"] == _python_listing(path)

    manifest["files"]["model.safetensors"]["chunks"]["sha256"].pop()
    (path / "manifest.json").write_text(json.dumps(manifest))
    run = _cli(path)
    assert run.returncode == 1 and "manifest.json: invalid manifest: 'chunks.sha256' of \"model.safetensors\" must list 4 digests" in run.stderr


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.msgpack", "config.json"])
def test_js_reader_names_the_corrupt_file(saved: Path, name: str) -> None:
    target = saved / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    run = _cli(saved)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: CheckpointCorruptedError:") and name in run.stderr


def test_js_reader_enforces_the_python_limits() -> None:
    from safeckpt.format import limits

    assert NODE is not None
    script = (
        f"import({json.dumps((JS / 'reader.mjs').as_uri())}).then(m => console.log(JSON.stringify(m.LIMITS, "
        "(k, v) => typeof v === 'bigint' ? v.toString() : v)))"
    )
    run = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60, check=True)
    js = json.loads(run.stdout)
    assert int(js.pop("MAX_STEP")) == limits.MAX_STEP
    assert js == {name: getattr(limits, name) for name in js}

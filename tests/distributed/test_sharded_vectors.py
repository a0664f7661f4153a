"""The sharded-layout conformance vectors (spec/vectors/sharded): the valid one decodes to exactly
what its expected.json says, each invalid one fails with the named error and file, and
regenerating them gives the committed bytes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import safeckpt
import safeckpt.numpy
from safeckpt import distributed as sd
from safeckpt.distributed.layout import template

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
SHARDED = VECTORS / "sharded"


def _load_module(name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, VECTORS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _vectors(kind: str) -> list[Path]:
    return sorted(p for p in (SHARDED / kind).iterdir() if (p / "expected.json").is_file())


def _read(folder: Path) -> dict[str, object]:
    """Every entry of a sharded checkpoint, assembled, by flattened key."""
    reader = sd.Reader(folder)
    reader.read_metadata()
    assert reader.sharding is not None
    paths = reader.sharding.paths
    state = template(reader.sharding, {p[0] for p in paths.values()})
    sd.load(state, folder, reader=reader, single_process=True)
    flat = {}
    for key, path in paths.items():
        node: object = state
        for part in path:
            node = node[part]  # type: ignore[index]
        flat[key] = node
    return flat


@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
def test_valid_vector_decodes_exactly(vector: Path) -> None:
    gen = _load_module("generate")
    expected = json.loads((vector / "expected.json").read_text())
    folder = vector / expected["path"]
    manifest = safeckpt.verify_checkpoint(folder)
    assert (manifest.step, manifest.format_version) == (expected["step"], (1, 2))
    flat = _read(folder)
    assert {k: gen.tensor_facts(flat[k]) for k in expected["tensors"]} == expected["tensors"]
    values = {k: gen.canonical(flat[k]) for k in expected["values"]}
    assert json.dumps(values, sort_keys=True) == json.dumps(expected["values"], sort_keys=True)
    ckpt = safeckpt.numpy.load_checkpoint(folder)  # the torch-free reader assembles the same tensors
    for key, facts in expected["tensors"].items():
        assert key.startswith("model.") and gen.tensor_facts(ckpt.model_state[key.removeprefix("model.")]) == facts


@pytest.mark.parametrize("vector", _vectors("invalid"), ids=lambda p: p.name)
def test_invalid_vector_fails_in_the_numpy_reader(vector: Path) -> None:
    expected = json.loads((vector / "expected.json").read_text())
    with pytest.raises(getattr(safeckpt, expected["error"]), match=expected["error_file"].replace(".", r"\.")):
        safeckpt.numpy.load_checkpoint(vector / expected["path"])


@pytest.mark.parametrize("vector", _vectors("invalid"), ids=lambda p: p.name)
def test_invalid_vector_fails_naming_the_file(vector: Path) -> None:
    expected = json.loads((vector / "expected.json").read_text())
    error = getattr(safeckpt, expected["error"])
    with pytest.raises(error, match=expected["error_file"].replace(".", r"\.")):
        _read(vector / expected["path"])


def test_regenerating_gives_the_committed_bytes(tmp_path: Path) -> None:
    _load_module("generate_sharded").main(tmp_path)
    fresh = sorted(p.relative_to(tmp_path / "sharded") for p in (tmp_path / "sharded").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(SHARDED) for p in SHARDED.rglob("*") if p.is_file())
    assert fresh == committed
    for relative in committed:
        assert (tmp_path / "sharded" / relative).read_bytes() == (SHARDED / relative).read_bytes(), relative


JS = VECTORS.parent / "readers" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None or not (JS / "node_modules" / "@msgpack" / "msgpack").is_dir(),
    reason="node or the JavaScript reader's dependencies are missing (`npm ci --prefix spec/readers/js`)",
)


def _js(path: Path) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, str(JS / "cli.mjs"), str(path)], capture_output=True, text=True, timeout=120, check=False)


@needs_node
@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
def test_javascript_reader_verifies_and_lists_a_sharded_checkpoint(vector: Path) -> None:
    expected = json.loads((vector / "expected.json").read_text())
    run = _js(vector / expected["path"])
    assert run.returncode == 0, run.stderr
    listed = {t["key"]: (t["dtype"], t["shape"]) for t in json.loads(run.stdout)["sharded_tensors"]}
    assert listed == {k: (v["dtype"], v["shape"]) for k, v in expected["tensors"].items()}


@needs_node
@pytest.mark.parametrize("vector", _vectors("invalid"), ids=lambda p: p.name)
def test_javascript_reader_refuses_each_invalid_sharded_vector(vector: Path) -> None:
    expected = json.loads((vector / "expected.json").read_text())
    run = _js(vector / expected["path"])
    assert run.returncode == 1 and expected["error"] in run.stderr and expected["error_file"] in run.stderr, run.stderr


@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
def test_safeckpt_consolidate_writes_an_ordinary_checkpoint(vector: Path, tmp_path: Path) -> None:
    """`safeckpt consolidate SRC DST`: the result is a single-process checkpoint with the same
    weights, readable by the torch-free reader (no sharding.json)."""
    from safeckpt.cli import main

    gen = _load_module("generate")
    expected = json.loads((vector / "expected.json").read_text())
    assert main(["consolidate", str(vector / expected["path"]), str(tmp_path / "single")]) == 0
    assert main(["consolidate", str(vector / expected["path"]), str(tmp_path / "single")]) == 1  # exists
    ckpt = safeckpt.numpy.load_checkpoint(tmp_path / "single")
    assert ckpt.step == expected["step"] and not (ckpt.path / "sharding.json").exists()
    for key, facts in expected["tensors"].items():
        if key.startswith("model."):
            assert gen.tensor_facts(ckpt.model_state[key.removeprefix("model.")]) == facts

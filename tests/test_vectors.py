"""The conformance vectors in spec/vectors: both Python readers pass all of them, and regenerating
them gives the committed bytes (the format is deterministic and frozen)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

import safeckpt
import safeckpt.numpy
from safeckpt.format.safetensors import DTYPE_SIZES

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def _generator() -> ModuleType:
    if "generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("generate", VECTORS / "generate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["generate"] = module
        spec.loader.exec_module(module)
    return sys.modules["generate"]


def _vectors(kind: str) -> list[Path]:
    return sorted(p for p in (VECTORS / kind).iterdir() if (p / "expected.json").is_file())


def _expected(vector: Path) -> dict[str, object]:
    return json.loads((vector / "expected.json").read_bytes())


def _same(actual: object, expected: object) -> bool:
    # Compare encodings, not values: 1 == 1.0 and -0.0 == 0.0 in Python, not in the format.
    return json.dumps(actual, sort_keys=True) == json.dumps(expected, sort_keys=True)


def check_valid(ckpt: object, expected: dict[str, object]) -> None:
    """Assert a loaded checkpoint (torch or numpy) is what expected.json says a reader must produce."""
    gen = _generator()
    assert ckpt.step == expected["step"]  # type: ignore[attr-defined]
    assert _same(ckpt.config, expected["config"])  # type: ignore[attr-defined]
    assert _same(ckpt.vocab, expected["vocab"])  # type: ignore[attr-defined]
    assert _same(ckpt.metadata, expected["metadata"])  # type: ignore[attr-defined]
    state = ckpt.model_state  # type: ignore[attr-defined]
    assert _same({k: gen.tensor_facts(v) for k, v in sorted(state.items())}, expected["model"])
    for alias, target in expected["aliases"].items():  # type: ignore[attr-defined]
        assert state[alias] is state[target], f"{alias} is not restored tied to {target}"
    trees = expected["trees"]
    for name in ("optimizer", "scheduler", "rng"):
        value = getattr(ckpt, f"{name}_state")
        assert _same(None if value is None else gen.canonical(value), trees[name]), name  # type: ignore[index]
    assert _same(gen.canonical(ckpt.extra) if trees["extra"] is not None else ckpt.extra,  # type: ignore[attr-defined,index]
                 trees["extra"] if trees["extra"] is not None else {})  # type: ignore[index]


def check_error(load: object, vector: Path, expected: dict[str, object]) -> None:
    with pytest.raises(safeckpt.CheckpointError) as info:
        load(vector / str(expected["path"]))  # type: ignore[operator]
    assert type(info.value).__name__ == expected["error"], str(info.value)
    assert str(expected["error_file"]) in str(info.value)


@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
@pytest.mark.parametrize("reader", ["torch", "numpy"])
def test_valid_vector(vector: Path, reader: str) -> None:
    expected = _expected(vector)
    path = vector / str(expected["path"])
    if reader == "torch":
        ckpt = safeckpt.load_checkpoint(path, restore_rng=False)
    else:
        ckpt = safeckpt.numpy.load_checkpoint(path)
    check_valid(ckpt, expected)


@pytest.mark.parametrize("vector", _vectors("invalid"), ids=lambda p: p.name)
@pytest.mark.parametrize("reader", ["torch", "numpy"])
def test_invalid_vector(vector: Path, reader: str) -> None:
    expected = _expected(vector)
    if reader == "torch":
        check_error(lambda p: safeckpt.load_checkpoint(p, restore_rng=False), vector, expected)
    else:
        check_error(safeckpt.numpy.load_checkpoint, vector, expected)


@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
def test_archive_listing(vector: Path) -> None:
    """expected.json's "tensors" (what the JS CLI prints) matches every archive, in data order."""
    gen = _generator()
    expected = _expected(vector)
    folder = safeckpt.pipeline.read.locate_checkpoint(vector / str(expected["path"]))
    rows = []
    for entry in safeckpt.verify_checkpoint(folder).files:
        if entry.name.endswith(".safetensors"):
            arrays, _ = safeckpt.numpy.arrays_from_buffer(bytearray((folder / entry.name).read_bytes()), source=entry.name)
            rows += [{"file": entry.name, "name": n, **gen.tensor_facts(a)} for n, a in arrays.items()]
    assert _same(rows, expected["tensors"])


def test_vectors_cover_the_format() -> None:
    valid = [_expected(v) for v in _vectors("valid")]
    dtypes = {row["dtype"] for e in valid for row in e["tensors"]}  # type: ignore[attr-defined]
    assert dtypes == set(DTYPE_SIZES)
    shapes = [row["shape"] for e in valid for row in e["tensors"]]  # type: ignore[attr-defined]
    assert [] in shapes and any(0 in s for s in shapes)
    assert any(e["aliases"] for e in valid)
    assert {e["format_version"] for e in valid} >= {"1.0", "1.1"}
    chunked = [m for m in VECTORS.glob("valid/*/step-*/manifest.json")
               if any(len(e.get("chunks", {}).get("sha256", [])) >= 2 for e in json.loads(m.read_bytes())["files"].values())]
    assert chunked, "no valid vector has a file of several chunks"
    invalid = [_expected(v) for v in _vectors("invalid")]
    assert len(invalid) >= 15
    assert {e["error"] for e in invalid} == {"CheckpointCorruptedError", "CheckpointNotFoundError", "UnsupportedFormatError"}
    total = sum(len(b) for b in _generator().tree_files(VECTORS).values())
    assert total < 400_000, f"vectors grew to {total} bytes; keep them small"


def test_regenerating_gives_the_committed_bytes(tmp_path: Path) -> None:
    gen = _generator()
    gen.generate(tmp_path)
    fresh, committed = gen.tree_files(tmp_path), gen.tree_files(VECTORS)
    assert sorted(fresh) == sorted(committed), "vector files added or removed: run spec/vectors/generate.py"
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert not changed, f"regeneration changed {changed}: the on-disk format drifted (or regenerate on purpose)"


@pytest.mark.parametrize("vector", _vectors("valid"), ids=lambda p: p.name)
def test_chunk_digests_are_right(vector: Path) -> None:
    """Recomputed here without safeckpt (a second writer's view): every chunk digest of every
    valid vector covers its bytes, and the audit, which checks both kinds of digest, passes."""
    for manifest in vector.glob("step-*/manifest.json"):
        for name, entry in json.loads(manifest.read_bytes())["files"].items():
            if "chunks" not in entry:
                continue
            data, size = (manifest.parent / name).read_bytes(), entry["chunks"]["size"]
            assert size & (size - 1) == 0 and len(data) == entry["size"] > 0
            assert entry["chunks"]["sha256"] == [hashlib.sha256(data[i : i + size]).hexdigest() for i in range(0, len(data), size)]
            assert json.loads(manifest.read_bytes())["format_version"] == "1.1"
            safeckpt.verify_checkpoint(manifest.parent)

"""spec/manifest.schema.json accepts every manifest the writer produces and rejects the invalid
ones of the conformance vectors; the writer keeps to the limits spec/FORMAT.md states."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import safeckpt
from safeckpt.format import limits
from safeckpt.storage.tuning import TUNING

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "spec" / "manifest.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
VECTORS = ROOT / "spec" / "vectors"


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _committed_manifests() -> list[Path]:
    found = sorted(VECTORS.glob("valid/*/step-*/manifest.json")) + sorted((ROOT / "tests" / "golden").glob("v*/step-*/manifest.json"))
    return [p for p in found if not any(part.startswith(".") for part in p.parts)]


@pytest.mark.parametrize("manifest", _committed_manifests(), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_manifests_validate(manifest: Path) -> None:
    VALIDATOR.validate(json.loads(manifest.read_bytes()))


def test_fresh_manifest_validates(saved: Path) -> None:
    VALIDATOR.validate(json.loads((saved / "manifest.json").read_bytes()))


@pytest.mark.parametrize(
    "case",
    ["manifest-path-traversal", "manifest-absolute-path", "manifest-hidden-name", "manifest-negative-step",
     "manifest-step-too-large", "manifest-uppercase-sha", "manifest-without-model", "manifest-other-format",
     "manifest-unknown-major", "manifest-bad-version-string", "manifest-not-object", "chunks-size-not-power-of-two",
     "chunks-size-too-small", "chunks-size-too-large", "chunks-uppercase-sha", "chunks-not-object", "chunks-empty-file"],
)
def test_invalid_manifests_fail_the_schema(case: str) -> None:
    document = json.loads((VECTORS / "invalid" / case / "step-00000007" / "manifest.json").read_bytes())
    assert not VALIDATOR.is_valid(document)


def test_fresh_chunked_manifest_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(TUNING, "min_cores_for_chunks", 1)
    monkeypatch.setattr(TUNING, "min_chunk", limits.MIN_CHUNK_BYTES)
    path = safeckpt.save_checkpoint({"w": torch.zeros(40_000)}, None, None, None, 1, directory=tmp_path, rng=False)
    document = json.loads((path / "manifest.json").read_bytes())
    assert document["format_version"] == "1.1" and len(document["files"]["model.safetensors"]["chunks"]["sha256"]) == 3
    VALIDATOR.validate(document)


def test_schema_chunk_sizes_are_the_limits() -> None:
    chunk_size = SCHEMA["properties"]["files"]["additionalProperties"]["properties"]["chunks"]["properties"]["size"]
    sizes = chunk_size["enum"]
    assert sizes == [2**k for k in range(16, 41)]
    assert (sizes[0], sizes[-1]) == (chunk_size["minimum"], chunk_size["maximum"]) == (limits.MIN_CHUNK_BYTES, limits.MAX_CHUNK_BYTES)


def _nest(depth: int, kind: str, leaf: object) -> object:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value} if kind == "dict" else (value,)
    return value


@pytest.mark.parametrize("kind", ["list", "dict", "tuple"])
def test_the_deepest_tree_the_writer_accepts_loads(tmp_path: Path, kind: str) -> None:
    deepest = _nest(limits.MAX_NESTING_DEPTH - 1, kind, 1)  # the leaf 1 sits at depth 64
    path = safeckpt.save_checkpoint({"w": torch.zeros(1)}, None, None, None, 1, directory=tmp_path, extra={"x": deepest}, rng=False)
    assert safeckpt.load_checkpoint(path, restore_rng=False).extra["x"] == deepest
    with pytest.raises(safeckpt.UnsupportedValueError, match="nested deeper"):
        safeckpt.save_checkpoint({"w": torch.zeros(1)}, None, None, None, 2, directory=tmp_path,
                                 extra={"x": _nest(limits.MAX_NESTING_DEPTH, kind, 1)}, rng=False)


def test_config_too_deep_for_readers_is_refused_at_save(tmp_path: Path) -> None:
    safeckpt.save_checkpoint({"w": torch.zeros(1)}, None, {"c": _nest(limits.MAX_NESTING_DEPTH - 2, "list", 1)}, None, 1,
                             directory=tmp_path, rng=False)
    with pytest.raises(safeckpt.UnsupportedValueError, match="nested deeper"):
        safeckpt.save_checkpoint({"w": torch.zeros(1)}, None, {"c": _nest(limits.MAX_NESTING_DEPTH, "list", 1)}, None, 2,
                                 directory=tmp_path, rng=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["step-00000001"]


def test_reserved_safetensors_name(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match="__metadata__"):
        safeckpt.save_checkpoint({"__metadata__": torch.zeros(1)}, None, None, None, 1, directory=tmp_path, rng=False)
    path = safeckpt.save_checkpoint({"w": torch.zeros(1)}, None, None, None, 1, directory=tmp_path, rng=False,
                                    extra={"__metadata__": torch.arange(3)})
    assert safeckpt.load_checkpoint(path, restore_rng=False).extra["__metadata__"].tolist() == [0, 1, 2]


def test_format_md_states_the_limits() -> None:
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    assert limits.MAX_MSGPACK_DEPTH == 194 and "194" in text
    for phrase in ["16 MiB", "| 4096 |", "100 MiB", "1,000,000", "64 MiB each", "512 MiB", "10,000,000",
                   "a power of two, 65536 (64 KiB) … 2^40"]:
        assert phrase in text, phrase
    assert (limits.MAX_MANIFEST_BYTES, limits.MAX_FILES, limits.MAX_SAFETENSORS_HEADER_BYTES) == (16 * 2**20, 4096, 100 * 2**20)
    assert (limits.MAX_JSON_BYTES, limits.MAX_DOCUMENT_BYTES, limits.MAX_DOCUMENT_ITEMS) == (64 * 2**20, 512 * 2**20, 10_000_000)
    assert (limits.MAX_TENSORS_PER_FILE, limits.MAX_TENSOR_NDIM, limits.MAX_NESTING_DEPTH) == (1_000_000, 64, 64)
    assert (limits.MIN_CHUNK_BYTES, limits.MAX_CHUNK_BYTES) == (65536, 2**40)

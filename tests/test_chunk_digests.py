"""Per-chunk digests (format 1.1): written for large files on machines with cores to spare, each
chunk proven on load, and every kind of damage to them or their bytes refused by name."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import flip_bits
from conftest import TinyLM, train_steps
from safeckpt.cli import main
from safeckpt.storage import hashing
from safeckpt.storage import posix as fileio
from safeckpt.storage.local import LocalFolder
from safeckpt.storage.tuning import TUNING

CHUNK = 64 * 1024


@pytest.fixture
def chunked_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write chunk digests as a machine of many cores does, in chunks of the smallest legal size."""
    monkeypatch.setattr(TUNING, "min_cores_for_chunks", 1)
    monkeypatch.setattr(TUNING, "min_chunk", CHUNK)


def _wide() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM(dim=256)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture
def wide() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model of ~300 KB (about five chunks) and its AdamW state (about ten), after training."""
    model, optimizer = _wide()
    train_steps(model, optimizer, 2)
    return model, optimizer


@pytest.fixture
def chunked(tmp_path: Path, wide: tuple[torch.nn.Module, torch.optim.Optimizer], chunked_writes: None) -> Path:
    return safeckpt.save_checkpoint(*wide, {"lr": 0.01}, None, 2, directory=tmp_path)


def _manifest(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((path / "manifest.json").read_text())


def _edit_entry(path: Path, name: str, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    doc = _manifest(path)
    edit(doc["files"][name])
    (path / "manifest.json").write_text(json.dumps(doc, indent=1))


def test_large_files_carry_the_digest_of_each_chunk(chunked: Path) -> None:
    doc = _manifest(chunked)
    assert doc["format_version"] == "1.1"
    with_chunks = {name for name, entry in doc["files"].items() if "chunks" in entry}
    assert with_chunks == {"model.safetensors", "optimizer.safetensors"}  # documents are small
    for name in with_chunks:
        data, entry = (chunked / name).read_bytes(), doc["files"][name]
        assert entry["chunks"]["size"] == CHUNK and len(entry["chunks"]["sha256"]) > 2
        assert entry["chunks"]["sha256"] == [
            hashlib.sha256(data[start : start + CHUNK]).hexdigest() for start in range(0, len(data), CHUNK)
        ]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()  # the whole-file digest stays


def test_few_cores_write_format_1_0_without_chunks(
    tmp_path: Path, wide: tuple[torch.nn.Module, torch.optim.Optimizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TUNING, "min_chunk", CHUNK)
    monkeypatch.setattr(TUNING, "cores", TUNING.min_cores_for_chunks - 1)
    doc = _manifest(safeckpt.save_checkpoint(*wide, None, None, 2, directory=tmp_path))
    assert doc["format_version"] == "1.0"
    assert not any("chunks" in entry for entry in doc["files"].values())


def test_chunk_size_doubles_to_bound_the_digests_per_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TUNING, "cores", 64)
    assert hashing.chunk_size(TUNING.min_chunk) == 0  # one chunk: the whole-file digest does
    assert hashing.chunk_size(TUNING.min_chunk + 1) == TUNING.min_chunk
    for size in (10**9, 10**11, 10**13):
        chunk = hashing.chunk_size(size)
        assert chunk & (chunk - 1) == 0 and -(-size // chunk) <= TUNING.max_chunks


@pytest.mark.parametrize("verify", [True, False])
def test_chunked_checkpoint_restores_exactly(
    chunked: Path, wide: tuple[torch.nn.Module, torch.optim.Optimizer], verify: bool
) -> None:
    model, optimizer = _wide()
    safeckpt.load_checkpoint(chunked, model=model, optimizer=optimizer, verify=verify, restore_rng=False)
    assert all(torch.equal(a, b) for a, b in zip(wide[0].state_dict().values(), model.state_dict().values(), strict=True))
    assert str(wide[1].state_dict()) == str(optimizer.state_dict())
    assert safeckpt.verify_checkpoint(chunked).format_version == (1, 1)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_damage_is_pinned_to_its_chunk(chunked: Path, name: str) -> None:
    entry = _manifest(chunked)["files"][name]
    count = len(entry["chunks"]["sha256"])
    for index in range(count):  # the last byte of each chunk belongs to that chunk
        offset = min((index + 1) * CHUNK, entry["size"]) - 1
        flip_bits(chunked / name, offset)
        with pytest.raises(safeckpt.CheckpointCorruptedError, match=rf"{name}: SHA-256 of bytes .*\(chunk {index + 1} of {count}\)"):
            safeckpt.load_checkpoint(chunked, restore_rng=False)
        flip_bits(chunked / name, offset)
    safeckpt.verify_checkpoint(chunked)


def test_load_trusts_chunk_digests_and_an_audit_checks_both(chunked: Path) -> None:
    def wrong_whole(entry: dict) -> None:  # type: ignore[type-arg]
        entry["sha256"] = "0" * 64

    _edit_entry(chunked, "optimizer.safetensors", wrong_whole)
    safeckpt.load_checkpoint(chunked, restore_rng=False)  # the chunks prove every byte
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="optimizer.safetensors: SHA-256 is"):
        safeckpt.verify_checkpoint(chunked)


def test_the_command_line_shows_chunks_and_audits_both_digests(chunked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(chunked)]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files["optimizer.safetensors"]["chunks"]["size"] == CHUNK and "chunks" not in files["config.json"]
    assert main(["inspect", str(chunked)]) == 0
    assert "chunk digests" in capsys.readouterr().out

    def wrong_whole(entry: dict) -> None:  # type: ignore[type-arg]
        entry["sha256"] = "f" * 64

    _edit_entry(chunked, "model.safetensors", wrong_whole)
    assert main(["verify", str(chunked)]) == 1
    assert "model.safetensors: SHA-256 is" in capsys.readouterr().err


def test_a_wrong_chunk_digest_fails_load_and_audit(chunked: Path) -> None:
    def wrong_chunk(entry: dict) -> None:  # type: ignore[type-arg]
        entry["chunks"]["sha256"][1] = "0" * 64

    _edit_entry(chunked, "model.safetensors", wrong_chunk)
    for check in (lambda: safeckpt.load_checkpoint(chunked, restore_rng=False), lambda: safeckpt.verify_checkpoint(chunked)):
        with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"model.safetensors: SHA-256 of bytes 65536 to 131072 \(chunk 2 of"):
            check()


def _count(entry: dict) -> int:  # type: ignore[type-arg]
    return -(-entry["size"] // CHUNK)


BAD_CHUNKS: dict[str, tuple[Callable[[dict], object], str]] = {  # type: ignore[type-arg]
    "not an object": (lambda e: ["x"], "must be an object"),
    "null": (lambda e: None, "must be an object"),
    "size not a power of two": (lambda e: {**e["chunks"], "size": 3 * CHUNK}, "expected a power of two"),
    "size below the minimum": (lambda e: {**e["chunks"], "size": 32 * 1024}, "expected a power of two from 65536"),
    "size a boolean": (lambda e: {**e["chunks"], "size": True}, "expected a power of two"),
    "one digest too few": (lambda e: {**e["chunks"], "sha256": e["chunks"]["sha256"][:-1]}, "must list"),
    "one digest too many": (lambda e: {**e["chunks"], "sha256": [*e["chunks"]["sha256"], "0" * 64]}, "must list"),
    "an upper-case digest": (
        lambda e: {**e["chunks"], "sha256": [d.upper() for d in e["chunks"]["sha256"]]},
        "64 lower-case hex digits",
    ),
    "digests not a list": (lambda e: {**e["chunks"], "sha256": "0" * 64}, "must list"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_malformed_chunks_are_refused_before_any_file_is_read(chunked: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, message = BAD_CHUNKS[case]

    def edit(entry: dict) -> None:  # type: ignore[type-arg]
        entry["chunks"] = make(entry)

    _edit_entry(chunked, "model.safetensors", edit)
    monkeypatch.setattr(LocalFolder, "read_files", lambda *a, **k: pytest.fail("read a file of an invalid manifest"))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=rf"manifest.json: invalid manifest: .*{message}"):
        safeckpt.load_checkpoint(chunked, restore_rng=False)


def test_an_empty_file_cannot_carry_chunks(chunked: Path) -> None:
    (chunked / "vocab.json").write_bytes(b"")  # any listed file; the manifest is what is wrong
    doc = _manifest(chunked)
    doc["files"]["vocab.json"] = {
        "size": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "chunks": {"size": CHUNK, "sha256": []},
    }
    (chunked / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"'vocab.json' is empty and so cannot have 'chunks'"):
        safeckpt.verify_checkpoint(chunked)


def test_a_read_error_in_a_chunk_names_the_file(chunked: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fileio.os.preadv

    def failing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset >= 2 * CHUNK:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(fileio.os, "preadv", failing)
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"\.safetensors: cannot be read \(Input/output error\)"):
        safeckpt.load_checkpoint(chunked, restore_rng=False)

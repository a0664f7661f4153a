"""The fast paths keep every guarantee: streamed hashed writes, pipelined verified reads, tensors
aligned in place, lazy unverified loads that still check sizes and headers, buffers freed."""

from __future__ import annotations

import gc
import hashlib
import json
import struct
import weakref
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import assert_same_state, run_python
from conftest import TinyLM, train_steps
from safeckpt.format import safetensors as archive
from safeckpt.pipeline.read import read_checkpoint_files
from safeckpt.storage import posix as fileio
from safeckpt.storage import posix_write
from safeckpt.storage.base import ReadArena
from safeckpt.storage.tuning import TUNING
from safeckpt.torch import tensors


def _opt_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 64 bytes, so the tiny test files go through the pipelined code paths."""
    monkeypatch.setattr(TUNING, "piece", 64)
    monkeypatch.setattr(TUNING, "inline", 16)
    monkeypatch.setattr(TUNING, "writeback", 128)


@pytest.mark.parametrize("verify", [True, False])
def test_load_gives_equal_tensors(saved: Path, model: TinyLM, optimizer: torch.optim.Optimizer, verify: bool) -> None:
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt = safeckpt.load_checkpoint(saved, model=fresh, optimizer=fresh_opt, verify=verify)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert_same_state(optimizer, fresh_opt)
    assert ckpt.extra == {"loader": {"epoch": 1, "offset": 12}}
    # Optimizer state must live at 64-byte aligned addresses like torch's own allocations.
    assert all(t.data_ptr() % 64 == 0 for t in _opt_tensors(fresh_opt) if t.numel())


def test_pipelined_paths_round_trip(tmp_path: Path, model: TinyLM, optimizer: torch.optim.Optimizer, small_pieces: None) -> None:
    path = safeckpt.save_checkpoint(model, optimizer, None, None, 1, directory=tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == entry["sha256"], name
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    safeckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert_same_state(optimizer, fresh_opt)


def test_flipped_byte_late_in_a_pipelined_read_is_caught(saved: Path, small_pieces: None) -> None:
    target = saved / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="SHA-256"):
        safeckpt.load_checkpoint(saved)


def test_unverified_load_skips_the_hash_but_not_the_size(saved: Path) -> None:
    target = saved / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1  # a tensor byte: only the hash can see it
    target.write_bytes(bytes(data))
    ckpt = safeckpt.load_checkpoint(saved, verify=False)
    assert ckpt.step == 3
    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="truncated"):
        safeckpt.load_checkpoint(saved, verify=False)


def _rewrite_header(path: Path, edit: object) -> None:
    """Rewrite a safetensors header in place, keeping the file size, and fix the manifest."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    edit(header)  # type: ignore[operator]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    data[8 : 8 + length] = text.ljust(length)
    path.write_bytes(bytes(data))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["embed.weight"].update(data_offsets=[0, 9999]), "embed.weight"),
        (lambda h: h["embed.weight"].update(dtype="F99"), "unsupported dtype"),
        (lambda h: h["embed.weight"].update(shape=[17, 9]), "embed.weight"),
    ],
    ids=["offsets-past-end", "dtype", "shape"],
)
def test_unverified_load_still_parses_headers_strictly(saved: Path, edit: object, match: str) -> None:
    _rewrite_header(saved / "model.safetensors", edit)
    for verify in (False, True):  # the manifest was fixed up: only the strict parser can see it
        with pytest.raises(safeckpt.CheckpointCorruptedError, match=match):
            safeckpt.load_checkpoint(saved, verify=verify)


def test_unverified_load_rejects_a_header_length_past_the_end(saved: Path) -> None:
    target = saved / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[0:8] = struct.pack("<Q", len(data))
    target.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="runs past the end"):
        safeckpt.load_checkpoint(saved, verify=False)


def test_unverified_buffers_are_private_memory_maps(saved: Path) -> None:
    _, buffers = read_checkpoint_files(saved, verify=False)
    view = buffers["optimizer.safetensors"]
    assert type(view.obj).__name__ == "mmap" and not view.readonly
    view[-1] ^= 0xFF  # copy-on-write: the file itself is untouched
    assert safeckpt.verify_checkpoint(saved).step == 3


def test_verified_buffers_are_not_file_maps(saved: Path) -> None:
    _, buffers = read_checkpoint_files(saved, verify=True)
    archive = buffers["optimizer.safetensors"]
    assert isinstance(archive.obj, ReadArena) and ReadArena.spare_room(archive) > 0
    assert bytes(archive) == (saved / "optimizer.safetensors").read_bytes()
    assert bytes(buffers["config.json"]) == (saved / "config.json").read_bytes()
    # Offsets into the arena are offsets into the buffer only at its start: a slice has no room.
    assert ReadArena.spare_room(archive[64:]) == 0 and ReadArena.spare_room(memoryview(bytearray(8))) == 0


def _archive(named: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(p) for p in tensors.archive_parts(named, None))


def test_aligned_tensors_equal_views_with_and_without_room() -> None:
    named = {
        "a": torch.arange(5, dtype=torch.float32),
        "b": torch.tensor(3.5),
        "c": torch.arange(7, dtype=torch.int8),
        "d": torch.randn(3, 5, dtype=torch.float64),
        "e": torch.zeros(0, 4),
        "f": torch.tensor([True, False, True]),
    }
    data = _archive(named)
    plain, _ = tensors.tensors_from_buffer(bytearray(data), source="x")
    roomy = ReadArena.allocate(len(data), room=ReadArena.room_for_archive(data[:8], len(data)))
    roomy[:] = data
    for buffer in (bytearray(data), roomy):
        aligned, _ = tensors.tensors_from_buffer(buffer, source="x", aligned=True)
        for name, tensor in named.items():
            assert torch.equal(aligned[name], tensor) and torch.equal(plain[name], tensor), name
            assert aligned[name].numel() == 0 or aligned[name].data_ptr() % 64 == 0, name


def test_aligned_tensors_are_moved_not_copied_when_there_is_room() -> None:
    named = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(6)}
    data = _archive(named)
    buffer = ReadArena.allocate(len(data), room=ReadArena.room_for_archive(data[:8], len(data)))
    buffer[:] = data
    aligned, _ = tensors.tensors_from_buffer(buffer, source="x", aligned=True)
    base = torch.frombuffer(buffer.obj, dtype=torch.uint8).data_ptr()  # type: ignore[arg-type]
    for name, tensor in named.items():
        assert torch.equal(aligned[name], tensor)
        assert base <= aligned[name].data_ptr() < base + len(buffer.obj), name  # type: ignore[arg-type]


def test_saving_non_contiguous_tensors_stages_bounded_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensors, "_STAGE", 256)
    big = torch.arange(64 * 40, dtype=torch.float32).reshape(64, 40).t()  # non-contiguous, 10 KiB
    pieces = list(tensors._tensor_bytes(big))
    assert len(pieces) > 1 and all(len(p) <= 256 for p in pieces)
    assert b"".join(bytes(p) for p in pieces) == big.contiguous().numpy().tobytes()
    assert _archive({"x": big}) == _archive({"x": big.contiguous()})
    contiguous = torch.ones(1000)
    (only,) = tensors._tensor_bytes(contiguous)
    assert torch.frombuffer(only, dtype=torch.uint8).data_ptr() == contiguous.data_ptr()  # no copy


def test_streamed_write_hashes_what_it_writes(tmp_path: Path, small_pieces: None) -> None:
    parts = [b"head", bytes(range(200)), memoryview(bytes(1000)), b""]
    dir_fd = fileio.os.open(tmp_path, fileio.os.O_RDONLY)
    try:
        entry = posix_write.write_file(dir_fd, "f.bin", iter(parts))
        (written,) = posix_write.write_files(dir_fd, [("g.bin", iter(parts), 0)], folder=tmp_path)
        with pytest.raises(FileExistsError) as info:
            posix_write.write_files(dir_fd, [("h.bin", [b"x"], 1), ("f.bin", [b"y"], 1)], folder=tmp_path)
    finally:
        fileio.os.close(dir_fd)
    data = b"".join(bytes(p) for p in parts)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert entry.size == written.size == len(data)
    assert entry.sha256 == written.sha256 == hashlib.sha256(data).hexdigest()
    assert info.value.filename == str(tmp_path / "f.bin")  # the failing file, by its path


def test_buffers_are_freed_with_the_objects_that_use_them(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arenas: list[weakref.ref[ReadArena]] = []

    class Tracked(ReadArena):
        def __init__(self, *args: object, **kwargs: object) -> None:
            arenas.append(weakref.ref(self))

    monkeypatch.setattr(fileio, "ReadArena", Tracked)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = safeckpt.load_checkpoint(saved, model=model, optimizer=opt)
    gc.collect()
    alive = [r for r in arenas if r() is not None]
    assert arenas and len(alive) < len(arenas)  # documents and unused archives are gone already
    train_steps(model, opt, 1)
    del ckpt
    gc.collect()
    still = [r() for r in arenas if r() is not None]
    assert len(still) == 1  # only the optimizer state's buffer: the optimizer uses it
    del opt, still
    gc.collect()
    assert all(r() is None for r in arenas)


def test_unverified_model_only_load_leaves_optimizer_state_lazy(saved: Path) -> None:
    ckpt = safeckpt.load_checkpoint(saved, verify=False, restore_rng=False)
    state = ckpt.optimizer_state
    assert isinstance(state, dict)
    moments = [v for s in state["state"].values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    # views of the mapped file (no copy was made), unlike a load that restores an optimizer
    assert moments and all(m.untyped_storage().nbytes() == m.numel() * m.element_size() for m in moments)
    assert sum(m.data_ptr() % 64 != 0 for m in moments) > 0


def test_a_read_holds_a_bounded_number_of_files_open(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TUNING, "open_at_once", 2)
    real_open, real_close = fileio.os.open, fileio.os.close
    held: set[int] = set()
    most = 0

    def spy_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        nonlocal most
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("dir_fd") is not None:  # a checkpoint file (the folder is opened by path)
            held.add(fd)
            most = max(most, len(held))
        return fd

    def spy_close(fd: int) -> None:
        held.discard(fd)
        real_close(fd)

    monkeypatch.setattr(fileio.os, "open", spy_open)
    monkeypatch.setattr(fileio.os, "close", spy_close)
    manifest, buffers = read_checkpoint_files(saved, verify=True)
    assert len(manifest.files) > 4 and set(buffers) == {e.name for e in manifest.files}
    assert most == 2 and not held


def test_written_archives_load_in_place_with_only_odd_sized_tensors_moved() -> None:
    named = {f"w{i}": torch.randn(16, 4 + i) for i in range(5)}  # 64-byte multiples: 256 + 64 i
    named |= {"step": torch.tensor(3.0), "odd": torch.arange(5, dtype=torch.int16)}
    data = _archive(named)
    buffer = ReadArena.allocate(len(data), room=ReadArena.room_for_archive(data[:8], len(data)))
    buffer[:] = data
    infos, _ = archive.parse_header(buffer, source="x")
    aligned, _ = tensors.tensors_from_buffer(buffer, source="x", aligned=True)
    base = torch.frombuffer(buffer.obj, dtype=torch.uint8).data_ptr()  # type: ignore[arg-type]
    for info in infos:
        assert torch.equal(aligned[info.name], named[info.name]) and aligned[info.name].data_ptr() % 64 == 0
        if info.name.startswith("w"):  # no memmove of the big ones
            assert aligned[info.name].data_ptr() == base + info.begin, info.name
    assert aligned["odd"].data_ptr() != base + infos[-1].begin  # after a 4-byte tensor: moved


def test_unverified_resume_does_not_leave_the_optimizer_backed_by_the_files(saved: Path) -> None:
    # Mapped state would fault (SIGBUS) on the next step once the file is truncated: run apart.
    done = run_python(
        f"""
        import os, torch, safeckpt
        from conftest import TinyLM, train_steps
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        safeckpt.load_checkpoint({str(saved)!r}, model=model, optimizer=opt, verify=False, restore_rng=False)
        for name in os.listdir({str(saved)!r}):
            os.truncate(os.path.join({str(saved)!r}, name), 0)
        train_steps(model, opt, 2)
        print("trained")
        """,
        saved.parent,
    )
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr

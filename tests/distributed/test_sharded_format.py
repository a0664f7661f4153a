"""The sharded layout in one process: values round-trip exactly, ``sharding.json`` is validated
strictly, damaged files are caught, DCP's pickling planners are refused, nothing unpickles."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import safeckpt
import safeckpt.numpy
from safeckpt import distributed as sd
from safeckpt.format.safetensors import parse_header


def state() -> dict[str, object]:
    return {
        "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
        "meta": {"lr": 0.1, "betas": (0.9, 0.99), "names": ["a", "b"], 3: "three", "raw": b"\x00\x01"},
    }


def empty() -> dict[str, object]:
    return {
        "model": {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "meta": {"lr": None, "betas": None, "names": None, 3: None, "raw": None},
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return sd.save(state(), tmp_path / "run", step=5)


def test_tensors_and_values_round_trip_exactly(saved: Path) -> None:
    target = empty()
    sd.load(target, saved)
    original = state()
    assert target["meta"] == original["meta"]  # tuples stay tuples, int keys stay ints
    for key, tensor in original["model"].items():  # type: ignore[union-attr]
        assert torch.equal(target["model"][key], tensor)  # type: ignore[index]
    assert sorted(p.name for p in saved.iterdir()) == [
        "manifest.json", "shard-00000.msgpack", "shard-00000.safetensors", "sharding.json",
    ]  # fmt: skip
    assert safeckpt.verify_checkpoint(saved).format_version == (1, 2)


def test_load_holding_one_file_open_at_a_time(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank may need the shards of thousands of ranks: files are reopened rather than all held."""
    from safeckpt.storage.tuning import TUNING

    monkeypatch.setattr(TUNING, "open_at_once", 1)
    target = empty()
    sd.load(target, saved)
    assert target["meta"] == state()["meta"] and torch.equal(target["model"]["w"], state()["model"]["w"])  # type: ignore[index]


def test_a_load_failing_after_verification_leaves_no_file_open(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another rank's failure between DCP's planning and its reads: the files this rank verified
    are closed at once, not when the garbage collector finds the reader."""

    def fail(self: sd.Reader, plans: list) -> list:
        raise RuntimeError("another rank failed")

    monkeypatch.setattr(sd.Reader, "prepare_global_plan", fail)
    gc.disable()
    try:
        with pytest.raises(safeckpt.CheckpointError, match="another rank failed"):
            sd.load(empty(), saved)
        held = open_paths()
    finally:
        gc.enable()
    assert not [path for path in held if path.startswith(str(saved))]


def open_paths() -> list[str]:
    """What this process's file descriptors point at."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed since
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


def test_existing_step_is_refused_unless_overwrite(saved: Path) -> None:
    with pytest.raises(safeckpt.CheckpointExistsError, match="step 5 already exists"):
        sd.save(state(), saved.parent, step=5)
    changed = state()
    changed["model"]["w"] += 1  # type: ignore[index]
    sd.save(changed, saved.parent, step=5, overwrite=True)
    target = empty()
    sd.load(target, saved)
    assert target["model"]["w"][0, 0] == 1  # type: ignore[index]


def test_unsupported_value_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(safeckpt.UnsupportedValueError, match=r"meta\.bad"):
        sd.save({"meta": {"bad": {1, 2}}}, tmp_path / "run", step=1)
    assert not (tmp_path / "run").exists()


def flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["shard-00000.safetensors", "shard-00000.msgpack", "sharding.json"])
def test_damaged_file_is_named_and_nothing_is_restored(saved: Path, name: str) -> None:
    flip(saved / name)
    target = empty()
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=f"{name}: SHA-256"):
        sd.load(target, saved)
    assert not target["model"]["w"].any()  # type: ignore[index]


def test_truncated_shard_is_caught(saved: Path) -> None:
    path = saved / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="shard-00000.safetensors"):
        sd.load(empty(), saved)


def rehash(folder: Path, name: str) -> None:
    """Record ``name``'s current size and SHA-256 in the manifest, so only a parser can object."""
    data = (folder / name).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path: Path) -> None:
    saved = sd.save({"model": {"mask": torch.tensor([True, False, True])}}, tmp_path / "run", step=1)
    path = saved / "shard-00000.safetensors"
    (info,) = parse_header(path.read_bytes(), source=str(path))[0]
    with open(path, "r+b") as file:
        file.seek(info.begin + 1)
        file.write(b"\x02")
    rehash(saved, path.name)
    target = {"model": {"mask": torch.zeros(3, dtype=torch.bool)}}
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=r"shard-00000.safetensors: bool tensor .* other than 0 and 1"):
        sd.load(target, saved)
    assert not target["model"]["mask"].any()


def test_shard_modified_between_verification_and_reading_is_refused(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed checkpoint is never written in place, but a foreign writer that does so
    after the files were verified is reported, not loaded silently."""
    path = saved / "shard-00000.safetensors"
    read_data = sd.Reader.read_data

    def write_in_place_first(self: sd.Reader, *args: object) -> object:
        stamp = path.stat().st_mtime_ns
        with open(path, "r+b") as file:  # same inode, same size: only the time tells
            file.seek(-3, 2)
            file.write(b"\xff\xff\xff")
        os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a later clock tick, whatever the resolution
        return read_data(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sd.Reader, "read_data", write_in_place_first)
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="shard-00000.safetensors: was modified or replaced while the checkpoint was being loaded"):
        sd.load(empty(), saved)


def rewrite_sharding(folder: Path, change: Callable[[dict], None]) -> None:
    """Edit sharding.json and re-hash it in the manifest, so only the parser can object."""
    doc = json.loads((folder / "sharding.json").read_text())
    change(doc)
    (folder / "sharding.json").write_bytes(json.dumps(doc).encode())
    rehash(folder, "sharding.json")


def chunk(doc: dict) -> dict:
    return doc["tensors"]["model.w"]["chunks"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: chunk(d).update(file="../shard-00000.safetensors"), "is not allowed"),
        (lambda d: chunk(d).update(file="shard-00009.safetensors"), "not listed in manifest.json"),
        (lambda d: chunk(d).update(offsets=[1, 0]), "lies outside the tensor"),
        (lambda d: chunk(d).update(sizes=[2, 4]), "its chunks hold 8 elements, the tensor has 12"),
        (lambda d: d["tensors"]["model.w"]["chunks"].append(dict(chunk(d), sizes=[0, 4])), r"declares torch.float32 of shape \(0, 4\)"),
        (
            lambda d: d["tensors"]["model.w"].update(
                shape=[6, 4], chunks=[chunk(d), dict(chunk(d), offsets=[2, 0], name="x")]
            ),
            "overlap",
        ),
        (lambda d: d["tensors"]["model.w"].update(dtype="F128"), "unsupported dtype"),
        (lambda d: d["paths"].update({"model.w": ["model", "v"]}), "path of 'model.w'"),
        (lambda d: d.update(version=2), "sharding version 2 is not supported"),
        (lambda d: d.update(extra=1), "exactly the keys"),
        (lambda d: d["values"].update({"meta.lr": {"file": "shard-00000.safetensors"}}), "must name a .msgpack"),
        (lambda d: chunk(d).update(name="nope"), "has no tensor 'nope'"),
    ],
    ids=[
        "path-escape", "unlisted-file", "box-outside", "gap", "chunk-shape", "overlap", "dtype", "path",
        "version", "unknown-key", "value-file", "missing-tensor",
    ],
)  # fmt: skip
def test_sharding_document_is_validated_strictly(saved: Path, change: Callable[[dict], None], message: str) -> None:
    rewrite_sharding(saved, change)
    target = empty()
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=message):
        sd.load(target, saved)
    assert not target["model"]["w"].any()  # type: ignore[index]


def test_dcp_default_planners_and_no_collectives_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointException, match=r"planner=safeckpt\.distributed\.LoadPlanner\(\)"):
        dcp.load(empty(), storage_reader=sd.Reader(saved), no_dist=True)
    with pytest.raises(CheckpointException, match=r"planner=safeckpt\.distributed\.LoadPlanner\(\)"):
        _load_state_dict_from_keys(storage_reader=sd.Reader(saved))
    with pytest.raises(CheckpointException, match=r"planner=safeckpt\.distributed\.SavePlanner\(\)"):
        dcp.save(state(), storage_writer=sd.Writer(tmp_path / "other", step=1), no_dist=True)
    with pytest.raises(sd.UsageError, match="use_collectives=True"):
        dcp.save(state(), storage_writer=sd.Writer(tmp_path / "other", step=1), planner=sd.SavePlanner(),
                 no_dist=True, use_collectives=False)  # fmt: skip
    assert not list((tmp_path / "other").glob("step-*"))


def test_numpy_reader_assembles_a_sharded_checkpoint_without_torch(saved: Path) -> None:
    import subprocess
    import sys

    ckpt = safeckpt.numpy.load_checkpoint(saved)
    original = state()
    assert ckpt.step == 5 and ckpt.optimizer_state is None
    for key, tensor in original["model"].items():  # type: ignore[union-attr]
        assert ckpt.model_state[key].tolist() == tensor.float().tolist(), key
    code = (
        "import sys, safeckpt.numpy as n; c = n.load_checkpoint(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(c.model_state))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['b', 'w']"
    flip(saved / "shard-00000.safetensors")
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="shard-00000.safetensors: SHA-256"):
        safeckpt.numpy.load_checkpoint(saved)


def test_load_never_unpickles(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.serialization

    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unpickler was called during load")

    class Trapped:
        def __init__(self, *args: object, **kwargs: object) -> None:
            trap()

    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "Unpickler", Trapped)
    monkeypatch.setattr(torch, "load", trap)
    monkeypatch.setattr(torch.serialization, "load", trap)
    target = empty()
    sd.load(target, saved)
    assert target["meta"]["betas"] == (0.9, 0.99)  # type: ignore[index]


def test_written_documents_satisfy_the_json_schemas(saved: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = Path(__file__).resolve().parents[2] / "spec"
    for schema_name, file in (("sharding.schema.json", "sharding.json"), ("manifest.schema.json", "manifest.json")):
        schema = json.loads((spec / schema_name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.Draft202012Validator(schema).validate(json.loads((saved / file).read_text()))
    broken = json.loads((saved / "sharding.json").read_text())
    broken["tensors"]["model.w"]["chunks"][0]["file"] = "../x.safetensors"
    sharding = json.loads((spec / "sharding.schema.json").read_text())
    assert not jsonschema.Draft202012Validator(sharding).is_valid(broken)


def test_manager_falls_back_from_a_damaged_sharded_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        sd.save({"model": {k: v.clone() for k, v in model.state_dict().items()}}, tmp_path, step=step)
    flip(tmp_path / "step-00000002" / "shard-00000.safetensors")
    manager = safeckpt.CheckpointManager(tmp_path)
    fresh = torch.nn.Linear(3, 2)
    with pytest.warns(safeckpt.CheckpointFallbackWarning, match="step-00000002"):
        ckpt = manager.restore(model=fresh, restore_rng=False)
    assert ckpt is not None and ckpt.step == 1
    assert torch.equal(fresh.weight, torch.ones(2, 3))
    with pytest.warns(safeckpt.CheckpointFallbackWarning):
        assert manager.latest() == tmp_path / "step-00000001"


def test_object_store_round_trip_and_consolidate(tmp_path: Path) -> None:
    """Through the storage seam: memory:// gets the manifest-last layout, loads verified, refuses a
    damaged object, and consolidates into an ordinary checkpoint."""
    import uuid

    import fsspec

    url = f"memory://sharded-{uuid.uuid4().hex[:8]}"
    committed = sd.save(state(), url, step=5)
    assert str(committed) == f"{url}/step-00000005"
    target = empty()
    sd.load(target, url)
    assert target["meta"] == state()["meta"]
    fs = fsspec.filesystem("memory")
    names = sorted(key.rsplit("/", 1)[-1] for key in fs.find(str(committed)))
    assert names == ["manifest.json", "shard-00000.msgpack", "shard-00000.safetensors", "sharding.json"]
    single = sd.consolidate(url, f"{url}-single")
    assert safeckpt.load_checkpoint(single, restore_rng=False).model_state["w"].equal(state()["model"]["w"])  # type: ignore[index]
    (shard,) = [key for key in fs.find(str(committed)) if key.endswith(".safetensors")]
    data = bytearray(fs.cat_file(shard))
    data[-3] ^= 1
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(safeckpt.CheckpointCorruptedError, match="shard-00000.safetensors"):
        sd.load(empty(), url)


def test_writer_name_commits_to_that_folder(tmp_path: Path) -> None:
    writer = sd.Writer(tmp_path / "exports", step=3, name="final")
    dcp.save(state(), storage_writer=writer, planner=sd.SavePlanner(), no_dist=True)
    assert writer.committed == tmp_path / "exports" / "final"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir() if p.name != ".safeckpt.lock") == ["final"]
    target = empty()
    sd.load(target, tmp_path / "exports" / "final")
    assert target["meta"]["betas"] == (0.9, 0.99)  # type: ignore[index]
    with pytest.raises(sd.UsageError, match="plain folder name"):
        sd.Writer(tmp_path, step=1, name="../elsewhere")

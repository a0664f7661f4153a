"""The command line on object storage: ``inspect``, ``ls`` and ``prune`` of an ``s3://`` root
against a real S3 API (moto on loopback), in-process and as real subprocesses, with the endpoint
and credentials from the environment (as s3fs reads them) or from ``--storage-option``.
``--json`` output is checked against spec/cli/*.schema.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3fs import S3FileSystem

import safeckpt
from cli_tools import cli, cli_process
from conftest import TinyLM
from s3_server import S3Server, options
from safeckpt.cli import build_parser
from safeckpt.storage.base import ObjectPath
from safeckpt.storage.objectstore import ObjectStorage

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def endpoint(server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The server as the environment's S3 endpoint, for this process and the ones it starts.

    s3fs caches file systems by their options; clearing the cache makes the command line build
    one that reads this test's environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    S3FileSystem.clear_instance_cache()
    yield server.url
    S3FileSystem.clear_instance_cache()


@pytest.fixture()
def fs(server: S3Server) -> S3FileSystem:
    return S3FileSystem(**options(server.url))  # type: ignore[arg-type]


@pytest.fixture()
def run(server: S3Server, bucket: str, model: TinyLM, optimizer: torch.optim.Optimizer) -> str:
    """``s3://bucket/run`` holding committed steps 1, 2 and 3, and the upload of an interrupted
    save of step 9 (objects, no manifest)."""
    root = f"s3://{bucket}/run"
    for step in (1, 2, 3):
        with torch.no_grad():
            model.hidden.bias.fill_(float(step))
        safeckpt.save_checkpoint(
            model, optimizer, {"layers": 1}, None, step, directory=root, storage_options=options(server.url)
        )
    storage = ObjectStorage(ObjectPath("s3", f"{bucket}/run"), options(server.url))
    with storage.begin(9) as pending:
        pending.write_files([("model.safetensors", [b"partial"], 7)])
        pending._discard = lambda: None  # type: ignore[method-assign]  # a writer killed before its commit
    return root


def _objects(fs: S3FileSystem, root: str) -> list[str]:
    return sorted(fs.find(root.removeprefix("s3://")))


# -- ls ----------------------------------------------------------------------------------------


def test_ls_lists_committed_checkpoints_and_uncommitted_uploads(
    run: str, endpoint: str, fs: S3FileSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, "ls", "--json", run)
    assert result.code == 0, result.err
    report = result.json("ls")
    rows = {row["step"]: row for row in report["checkpoints"]}  # type: ignore[union-attr]
    assert sorted(rows) == [1, 2, 3, 9]
    assert [rows[s]["committed"] for s in (1, 2, 3, 9)] == [True, True, True, False]
    assert all(rows[s]["error"] is None and rows[s]["files"] for s in (1, 2, 3))
    manifest = json.loads(fs.cat_file(f"{run.removeprefix('s3://')}/step-00000002/manifest.json"))
    stored = fs.size(f"{run.removeprefix('s3://')}/step-00000002/manifest.json")
    assert rows[2]["size"] == sum(f["size"] for f in manifest["files"].values()) + stored
    assert rows[2]["created"] == manifest["created"]
    assert "never committed" in rows[9]["error"]
    (upload,) = report["leftovers"]  # type: ignore[misc]
    assert upload["kind"] == "upload" and upload["size"] == len(b"partial")
    assert upload["path"].startswith(f"{run}/step-00000009/objects-") and upload["modified"]
    text = cli(capsys, "ls", run)
    assert text.code == 0 and "UNCOMMITTED" in text.out and "step-00000009/objects-" in text.out


def test_ls_names_an_upload_an_overwrite_left_behind(run: str, endpoint: str, server: S3Server, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    """Overwriting step 3 leaves the old objects for readers still on the old manifest: they are
    a leftover, while the checkpoint itself stays committed."""
    safeckpt.save_checkpoint(model, None, None, None, 3, directory=run, overwrite=True, storage_options=options(server.url))
    report = cli(capsys, "ls", "--json", run).json("ls")
    current = safeckpt.verify_checkpoint(f"{run}/step-00000003", storage_options=options(server.url)).objects
    step3 = [row["path"] for row in report["leftovers"] if "/step-00000003/" in row["path"]]  # type: ignore[union-attr, index]
    assert len(step3) == 1 and not step3[0].endswith(str(current))


def test_ls_verify_marks_a_damaged_object_and_exits_1(
    run: str, endpoint: str, fs: S3FileSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = next(k for k in _objects(fs, run) if "/step-00000002/" in k and k.endswith("/model.safetensors"))
    data = bytearray(fs.cat_file(damaged))
    data[-1] ^= 0x01
    fs.pipe_file(damaged, bytes(data))
    result = cli(capsys, "ls", "--verify", "--json", run)
    assert result.code == 1
    rows = {row["step"]: row for row in result.json("ls")["checkpoints"]}  # type: ignore[union-attr]
    assert rows[1]["verified"] and rows[3]["verified"]
    assert rows[2]["verified"] is False and "model.safetensors" in rows[2]["error"]


def test_ls_errors_on_urls(run: str, endpoint: str, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    empty = cli(capsys, "ls", f"s3://{bucket}/no-such-run")
    assert empty.code == 1 and f"s3://{bucket}/no-such-run: nothing is stored" in empty.err
    checkpoint = cli(capsys, "ls", f"{run}/step-00000002")
    assert checkpoint.code == 1 and "is a checkpoint, not a root of checkpoints" in checkpoint.err


def test_ls_in_a_process(run: str, endpoint: str) -> None:
    result = cli_process("ls", "--json", run)
    assert result.code == 0, result.err
    assert [row["step"] for row in result.json("ls")["checkpoints"]] == [1, 2, 3, 9]  # type: ignore[union-attr, index]


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_a_url_lists_what_the_manifest_and_headers_say(
    run: str, endpoint: str, fs: S3FileSystem, model: TinyLM, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, "inspect", "--json", run)
    assert result.code == 0, result.err
    report = result.json("inspect")
    assert report["path"] == f"{run}/step-00000003" and report["step"] == 3 and report["verified"] is True
    assert report["config"] == {"layers": 1}
    tensors = report["files"]["model.safetensors"]["tensors"]  # type: ignore[index]
    stored = {n for n in model.state_dict() if n != "head.weight"}
    assert set(tensors) == stored and tensors["embed.weight"] == {"dtype": "F32", "shape": [17, 8]}
    assert report["files"]["model.safetensors"]["aliases"] == {"head.weight": "embed.weight"}  # type: ignore[index]
    manifest = json.loads(fs.cat_file(f"{run.removeprefix('s3://')}/step-00000003/manifest.json"))
    assert {n: f["sha256"] for n, f in report["files"].items()} == {n: f["sha256"] for n, f in manifest["files"].items()}  # type: ignore[union-attr]


def test_inspect_a_url_fetches_headers_only_and_checks_bool_tensors(
    server: S3Server, bucket: str, endpoint: str, fs: S3FileSystem, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --no-verify, listing a 1 MiB archive reads its header and its bool tensor only, and
    a bool byte other than 0 or 1 is still refused (the strict parser sees the real bytes)."""
    layer = torch.nn.Linear(512, 512)
    layer.register_buffer("mask", torch.tensor([True, False, True]))
    root = f"s3://{bucket}/bools"
    safeckpt.save_checkpoint(layer, None, None, None, 1, directory=root, storage_options=options(server.url))
    from safeckpt.storage import objectstore

    fetched: list[int] = []
    real_fetch = objectstore.fetch_range

    def counting(fs_: object, url: str, start: int, end: int, into: memoryview) -> None:
        if url.endswith("model.safetensors"):
            fetched.append(end - start)
        real_fetch(fs_, url, start, end, into)

    monkeypatch.setattr(objectstore, "fetch_range", counting)
    report = cli(capsys, "inspect", "--json", "--no-verify", root).json("inspect")
    assert report["files"]["model.safetensors"]["tensors"]["mask"] == {"dtype": "BOOL", "shape": [3]}  # type: ignore[index]
    size = report["files"]["model.safetensors"]["size"]  # type: ignore[index]
    assert size > 1024 * 1024 and 0 < sum(fetched) < 4096
    key = next(k for k in _objects(fs, root) if k.endswith("/model.safetensors"))
    data = bytearray(fs.cat_file(key))
    header_end = 8 + int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:header_end])["mask"]["data_offsets"][0]
    data[header_end + begin] = 2
    fs.pipe_file(key, bytes(data))
    refused = cli(capsys, "inspect", "--no-verify", root)
    assert refused.code == 1 and "bool tensor 'mask' holds bytes other than 0 and 1" in refused.err


def test_inspect_a_url_in_a_process_imports_no_torch(run: str, endpoint: str) -> None:
    code = (
        "import sys\n"
        "from safeckpt.cli import main\n"
        f"status = main(['inspect', {run!r}])\n"
        "assert 'torch' not in sys.modules, 'inspect imported torch'\n"
        "assert 's3fs' in sys.modules\n"
        "sys.exit(status)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # AWS_ENDPOINT_URL and credentials included
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "step 3" in done.stdout and "embed.weight" in done.stdout and "tied to embed.weight" in done.stdout


# -- prune -------------------------------------------------------------------------------------


def test_prune_dry_run_removes_nothing(run: str, endpoint: str, fs: S3FileSystem, capsys: pytest.CaptureFixture[str]) -> None:
    before = _objects(fs, run)
    result = cli(capsys, "prune", "--json", "--dry-run", run, "--keep-last", "1")
    assert result.code == 0, result.err
    report = result.json("prune")
    assert report["dry_run"] is True and report["removed"] == [1, 2] and report["kept"] == [3]
    assert _objects(fs, run) == before


def test_prune_uncommits_through_the_storage_and_leaves_the_newest_loadable(
    run: str, endpoint: str, fs: S3FileSystem, model: TinyLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    removals: list[tuple[str, bool]] = []
    real_remove = ObjectStorage.remove

    def remove(self: ObjectStorage, location: ObjectPath) -> None:  # type: ignore[override]
        removals.append((location.name, fs.exists(f"{location.path}/manifest.json")))
        real_remove(self, location)

    monkeypatch.setattr(ObjectStorage, "remove", remove)
    result = cli(capsys, "prune", run, "--keep-last", "1")
    assert result.code == 0, result.err
    assert "removed step 1" in result.out and "removed step 2" in result.out
    assert removals == [("step-00000001", True), ("step-00000002", True)]
    left = _objects(fs, run)
    assert not any("/step-00000001/" in k or "/step-00000002/" in k for k in left)
    assert any("/step-00000009/objects-" in k for k in left)  # uncommitted uploads are not prune's
    fresh = TinyLM()
    loaded = safeckpt.load_checkpoint(run, fresh, storage_options=options(endpoint))
    assert loaded.step == 3 and torch.equal(fresh.hidden.bias, torch.full_like(fresh.hidden.bias, 3.0))


def test_prune_in_a_process(run: str, endpoint: str, fs: S3FileSystem) -> None:
    result = cli_process("prune", "--json", run, "--keep-last", "2")
    assert result.code == 0, result.err
    report = result.json("prune")
    assert report["removed"] == [1] and report["kept"] == [2, 3]
    assert safeckpt.CheckpointManager(run, storage_options=options(endpoint)).steps() == [2, 3]


# -- --storage-option ----------------------------------------------------------------------------


def test_storage_options_carry_the_endpoint_and_credentials(run: str, server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS_* variables at all: the endpoint and credentials come from --storage-option."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    flags = [
        "--storage-option", f"endpoint_url={server.url}",
        "--storage-option", "key=testing",
        "--storage-option", "secret=testing",
        "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',
    ]  # fmt: skip
    listed = cli_process("ls", "--json", *flags, run)
    assert listed.code == 0, listed.err
    assert [row["step"] for row in listed.json("ls")["checkpoints"]] == [1, 2, 3, 9]  # type: ignore[union-attr, index]
    inspected = cli_process("inspect", "--json", run, *flags)
    assert inspected.code == 0, inspected.err
    assert inspected.json("inspect")["step"] == 3


def test_storage_option_values_are_json_when_they_parse() -> None:
    args = build_parser().parse_args([
        "ls", "memory://x",
        "--storage-option", "anon=true",
        "--storage-option", "retries=3",
        "--storage-option", "endpoint_url=http://127.0.0.1:9000",
        "--storage-option", 'client_kwargs={"region_name": "eu-west-1"}',
        "--storage-option", "token=a=b",
        "--storage-option", "retries=5",
    ])  # fmt: skip
    from safeckpt.cli._common import storage_options

    assert storage_options(args) == {
        "anon": True,
        "retries": 5,
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "token": "a=b",
    }
    assert storage_options(build_parser().parse_args(["ls", "root"])) is None


def test_storage_option_misuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = cli(capsys, "ls", tmp_path, "--storage-option", "anon")
    assert bad.code == 2 and "expected KEY=VALUE" in bad.err
    local = cli(capsys, "prune", tmp_path, "--keep-last", "1", "--storage-option", "anon=true")
    assert local.code == 2 and "storage_options= applies to fsspec URLs" in local.err  # bad usage


# -- convert and consolidate ---------------------------------------------------------------------


def test_convert_writes_into_a_url(tmp_path: Path, model: TinyLM, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": model.state_dict(), "step": 7}, tmp_path / "legacy.pt")
    root = f"memory://{uuid.uuid4().hex}"
    result = cli(capsys, "convert", tmp_path / "legacy.pt", root)
    assert result.code == 0, result.err
    assert f"wrote {root}/step-00000007" in result.out
    fresh = TinyLM()
    assert safeckpt.load_checkpoint(root, fresh, restore_rng=False).step == 7
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_consolidate_from_and_to_urls(endpoint: str, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    from safeckpt import distributed as sd

    weights = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    sharded = sd.save({"model": weights}, f"s3://{bucket}/sharded", step=4)
    result = cli(capsys, "consolidate", f"s3://{bucket}/sharded", f"s3://{bucket}/single")
    assert result.code == 0, result.err
    assert f"wrote s3://{bucket}/single/step-00000004 (consolidated from" in result.out
    single = safeckpt.load_checkpoint(f"s3://{bucket}/single", restore_rng=False)
    assert single.step == 4 and single.model_state["w"].equal(weights["w"])
    again = cli(capsys, "consolidate", str(sharded), f"s3://{bucket}/single")
    assert again.code == 1 and "already exists" in again.err and "--overwrite" in again.err

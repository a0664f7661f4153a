"""Checkpoints in object storage: s3:// against a real S3 API server (moto) on loopback, and
memory://. What a user relies on: a round trip, retention, the manifest-last create-only commit
(an interrupted upload or a losing writer leaves no checkpoint), retries of transient errors
with a clear error when they persist, verification before parsing, safe overwrites, and the
cleanup of stale uploads."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from s3fs import S3FileSystem

import safeckpt
from s3_server import FaultProxy, Faults, S3Server, options
from safeckpt.errors import CheckpointCorruptedError, CheckpointExistsError, CheckpointWriteError
from safeckpt.format.manifest import build
from safeckpt.storage import objectio
from safeckpt.storage.base import ObjectPath
from safeckpt.storage.locate import as_location, storage_for
from safeckpt.storage.objectstore import ObjectPendingWrite, ObjectStorage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small parts (5 MiB, S3's minimum) so a few MiB make a multipart upload; short backoff."""
    monkeypatch.setattr(objectio.REMOTE, "part", 5 * 1024 * 1024)
    monkeypatch.setattr(objectio.REMOTE, "backoff_s", 0.01)
    monkeypatch.setattr(objectio.REMOTE, "attempts", 3)


def _model(seed: int, size: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(size, size), torch.nn.Linear(size, 4))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _keys(fs: fsspec.AbstractFileSystem, url: str) -> list[str]:
    return [k.split("/", 1)[1] for k in fs.find(url)]


# -- round trips -----------------------------------------------------------------------------


def test_s3_round_trip_restores_model_optimizer_and_config(server: S3Server, bucket: str) -> None:
    opts = options(server.url)
    model = _model(0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    opt.step()
    path = safeckpt.save_checkpoint(model, opt, {"lr": 0.1}, ["a"], 7, directory=f"s3://{bucket}/run", storage_options=opts)
    assert str(path) == f"s3://{bucket}/run/step-00000007"

    fresh = _model(1)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    ckpt = safeckpt.load_checkpoint(f"s3://{bucket}/run", fresh, fresh_opt, storage_options=opts)
    assert ckpt.step == 7 and ckpt.config == {"lr": 0.1} and ckpt.vocab == ["a"]
    assert _same(model, fresh)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    manifest = safeckpt.verify_checkpoint(path, storage_options=opts)
    keys = _keys(fsspec.filesystem("s3", **opts), f"{bucket}/run")
    assert f"run/step-00000007/{manifest.objects}/model.safetensors" in keys
    assert "run/step-00000007/manifest.json" in keys


def test_memory_url_round_trip_and_file_url_is_a_local_path(tmp_path: object) -> None:
    model = _model(2)
    root = f"memory://{uuid.uuid4().hex}"
    safeckpt.save_checkpoint(model, None, None, None, 3, directory=root)
    fresh = _model(3)
    assert safeckpt.load_checkpoint(root, fresh).step == 3 and _same(model, fresh)
    assert as_location(f"file://{tmp_path}") == tmp_path


def test_import_safeckpt_does_not_import_fsspec() -> None:
    code = "import sys, safeckpt; print(sorted(m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_manager_keeps_the_newest_and_deletes_older_checkpoints_entirely(server: S3Server, bucket: str) -> None:
    opts = options(server.url)
    root = f"s3://{bucket}/managed"
    manager = safeckpt.CheckpointManager(root, keep_last=2, storage_options=opts)
    model = _model(4)
    for step in range(1, 5):
        with torch.no_grad():
            model[0].bias.fill_(step)
        manager.save(step, model=model)
    assert manager.steps() == [3, 4]
    keys = _keys(fsspec.filesystem("s3", **opts), f"{bucket}/managed")
    assert not [k for k in keys if "step-00000001" in k or "step-00000002" in k]
    fresh = _model(5)
    assert manager.restore(model=fresh).step == 4
    assert torch.all(fresh[0].bias == 4)


# -- failures --------------------------------------------------------------------------------


def test_server_stopped_during_an_upload_commits_nothing_and_the_previous_loads(
    server: S3Server, bucket: str, fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(server.url, attempts=1)
    root = f"s3://{bucket}/run"
    first = _model(6, size=1200)  # ~5.8 MB of weights: a multipart upload of two parts
    safeckpt.save_checkpoint(first, None, None, None, 1, directory=root, storage_options=opts)
    real = S3FileSystem.call_s3

    def stop_after_first_part(self, method, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(self, method, *args, **kwargs)
        if method == "upload_part" and kwargs["Key"].endswith("model.safetensors"):
            server.stop()  # one part is in, the multipart upload is under way
        return out

    monkeypatch.setattr(S3FileSystem, "call_s3", stop_after_first_part)
    try:  # any file of the save may be the first to fail: they are uploaded in parallel
        with pytest.raises(CheckpointWriteError, match=r"step-00000002/objects-\S+\.(safetensors|msgpack): upload failed"):
            safeckpt.save_checkpoint(_model(7, size=1200), None, None, None, 2, directory=root, storage_options=opts)
    finally:
        server.start()  # same port, same buckets
    fs = fsspec.filesystem("s3", **opts)
    assert not fs.exists(f"{bucket}/run/step-00000002/manifest.json")
    fresh = _model(8, size=1200)
    assert safeckpt.load_checkpoint(root, fresh, storage_options=opts).step == 1
    assert _same(first, fresh)


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
def test_transient_errors_are_retried_until_the_save_succeeds(
    server: S3Server, bucket: str, fast_retries: None, status: int, code: str
) -> None:
    faults = Faults(count=3, status=status, code=code)
    proxy = FaultProxy(server.port, faults)
    try:
        opts = options(proxy.url, attempts=2)
        model = _model(9, size=1200)
        path = safeckpt.save_checkpoint(model, None, None, None, 1, directory=f"s3://{bucket}/run", storage_options=opts)
        assert faults.injected == 3 and faults.count == 0
        fresh = _model(10, size=1200)
        safeckpt.load_checkpoint(path, fresh, storage_options=opts)
        assert _same(model, fresh)
    finally:
        proxy.close()


def test_errors_that_persist_raise_a_write_error_naming_the_object(
    server: S3Server, bucket: str, fast_retries: None
) -> None:
    proxy = FaultProxy(server.port, Faults(count=10**6, path_part="model.safetensors"))
    try:
        opts = options(proxy.url, attempts=1)
        root = f"s3://{bucket}/run"
        with pytest.raises(CheckpointWriteError, match=r"model\.safetensors: upload failed after retries"):
            safeckpt.save_checkpoint(_model(11), None, None, None, 1, directory=root, storage_options=opts)
        assert safeckpt.CheckpointManager(root, storage_options=opts).steps() == []
    finally:
        proxy.close()


def test_two_writers_of_one_step_exactly_one_commits(server: S3Server, bucket: str) -> None:
    opts = options(server.url)
    storage = storage_for(ObjectPath("s3", f"{bucket}/run"), opts)
    payload = [("config.json", [b'{"writer": "a"}'], 15)], [("config.json", [b'{"writer": "b"}'], 15)]
    with storage.begin(5) as first, storage.begin(5) as second:
        entries_a = first.write_files(payload[0])
        entries_b = second.write_files(payload[1])
        second.commit(build(5, entries_b))
        with pytest.raises(CheckpointExistsError):
            first.commit(build(5, entries_a))
    assert isinstance(storage, ObjectStorage)
    fs, place = storage.fs, f"{bucket}/run/step-00000005"
    manifest = json.loads(fs.cat_file(f"{place}/manifest.json"))
    assert [n for n in fs.ls(place, detail=False) if "/objects-" in n] == [f"{place}/{manifest['objects']}"]
    assert fs.cat_file(f"{place}/{manifest['objects']}/config.json") == b'{"writer": "b"}'


def test_a_manager_saving_beside_another_writers_upload_stays_create_only(
    server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer's objects of the same step, not yet committed, are not a damaged
    checkpoint to replace: when that writer commits first, the manager's save is refused
    instead of silently replacing it."""
    opts = options(server.url)
    root = f"s3://{bucket}/run"
    storage = storage_for(as_location(root), opts)
    real = ObjectPendingWrite.commit
    with storage.begin(100) as other:
        entries = other.write_files([("config.json", [b'{"writer": "other"}'], 19)])

        def other_commits_first(self: ObjectPendingWrite, manifest: object, *, overwrite: bool = False) -> object:
            if self is not other:
                real(other, build(100, entries))
            return real(self, manifest, overwrite=overwrite)  # type: ignore[arg-type]

        monkeypatch.setattr(ObjectPendingWrite, "commit", other_commits_first)
        with pytest.raises(CheckpointExistsError):
            safeckpt.CheckpointManager(root, storage_options=opts).save(100, model=_model(20))
    fs = fsspec.filesystem("s3", **opts)
    manifest = json.loads(fs.cat_file(f"{bucket}/run/step-00000100/manifest.json"))
    assert fs.cat_file(f"{bucket}/run/step-00000100/{manifest['objects']}/config.json") == b'{"writer": "other"}'


def test_a_missing_bucket_is_an_error_not_an_empty_run(server: S3Server, bucket: str) -> None:
    """A typo in the bucket name must not look like a run with no checkpoint yet (which would
    restart training from step 0)."""
    opts = options(server.url)
    manager = safeckpt.CheckpointManager(f"s3://{bucket}-typo/run", storage_options=opts)
    for call in (manager.steps, lambda: manager.restore(model=_model(21))):
        with pytest.raises(safeckpt.CheckpointNotFoundError, match=rf"s3://{bucket}-typo: bucket does not exist"):
            call()
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="bucket does not exist"):
        safeckpt.load_checkpoint(f"s3://{bucket}-typo/run", storage_options=opts)
    assert safeckpt.CheckpointManager(f"s3://{bucket}/new-run", storage_options=opts).steps() == []  # empty: fine


def test_a_torch_save_object_is_named_for_what_it_is(server: S3Server, bucket: str, tmp_path: Path) -> None:
    """A .pt uploaded beside the checkpoints is named as a torch.save file, with how to convert it
    (not "no checkpoint here"), by the library and the command line alike."""
    opts = options(server.url)
    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    S3FileSystem(**opts).put_file(str(tmp_path / "model.pt"), f"{bucket}/run/model.pt")
    with pytest.raises(safeckpt.CheckpointNotFoundError) as caught:
        safeckpt.load_checkpoint(f"s3://{bucket}/run/model.pt", storage_options=opts)
    message = str(caught.value)
    assert f"s3://{bucket}/run/model.pt: is a torch.save file" in message, message
    assert f"safeckpt convert LOCAL_FILE s3://{bucket}/run" in message, message
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="no checkpoint here"):
        safeckpt.load_checkpoint(f"s3://{bucket}/run/absent.pt", storage_options=opts)
    env = {**os.environ, "AWS_ENDPOINT_URL": server.url, "AWS_DEFAULT_REGION": "us-east-1"}
    verify = [sys.executable, "-m", "safeckpt.cli", "verify", f"s3://{bucket}/run/model.pt"]
    shown = subprocess.run(verify, capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode != 0 and "is a torch.save file" in shown.stdout + shown.stderr, (shown.stdout, shown.stderr)


def test_an_unreachable_endpoint_or_denied_access_is_a_clear_checkpoint_error(
    server: S3Server, bucket: str, fast_retries: None
) -> None:
    """No traceback from botocore: a CheckpointError naming the location and what to check."""
    root = f"s3://{bucket}/run"
    down = FaultProxy(server.port, Faults())
    opts = options(down.url, attempts=1)
    down.close()  # nothing listens there any more
    manager = safeckpt.CheckpointManager(root, storage_options=opts)
    with pytest.raises(safeckpt.CheckpointError, match=rf"{root}: cannot reach the object store: check endpoint_url"):
        manager.steps()
    denied = FaultProxy(server.port, Faults(count=10**6, status=403, code="AccessDenied", methods=("GET", "HEAD"), path_part="/"))
    try:
        opts = options(denied.url, attempts=1)
        with pytest.raises(safeckpt.CheckpointError, match=r"access denied: check the credentials") as info:
            safeckpt.load_checkpoint(root, storage_options=opts)
        assert not isinstance(info.value, CheckpointCorruptedError)  # a manager must not fall back over it
    finally:
        denied.close()


def test_a_corrupted_object_is_refused_before_parsing(server: S3Server, bucket: str) -> None:
    opts = options(server.url)
    path = safeckpt.save_checkpoint(_model(12), None, None, None, 1, directory=f"s3://{bucket}/run", storage_options=opts)
    fs = fsspec.filesystem("s3", **opts)
    objects = safeckpt.verify_checkpoint(path, storage_options=opts).objects
    key = f"{bucket}/run/step-00000001/{objects}/model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[8] ^= 0xFF  # the safetensors header's first byte: a parser would fail differently
    fs.pipe_file(key, bytes(data))
    for action in (
        lambda: safeckpt.load_checkpoint(path, _model(13), storage_options=opts),
        lambda: safeckpt.verify_checkpoint(path, storage_options=opts),
    ):
        with pytest.raises(CheckpointCorruptedError, match=rf"s3://{key}: SHA-256 is [0-9a-f]+, manifest.json says"):
            action()
    fs.pipe_file(key, bytes(data[:-1]))
    with pytest.raises(CheckpointCorruptedError, match=r"model\.safetensors: size is \d+ bytes, manifest.json says"):
        safeckpt.load_checkpoint(path, _model(13), storage_options=opts)


# -- overwrite and cleanup -------------------------------------------------------------------


def test_overwrite_keeps_the_old_objects_for_readers_until_they_are_stale() -> None:
    root = ObjectPath("memory", uuid.uuid4().hex)
    old, new = _model(14), _model(15)
    safeckpt.save_checkpoint(old, None, None, None, 1, directory=root)
    storage = ObjectStorage(root)
    with storage.open(root / "step-00000001") as reader:  # a reader that got the old manifest
        old_manifest = reader.read_manifest()
        with pytest.raises(CheckpointExistsError):
            safeckpt.save_checkpoint(new, None, None, None, 1, directory=root)
        safeckpt.save_checkpoint(new, None, None, None, 1, directory=root, overwrite=True)
        buffers = reader.read_files(old_manifest.files)  # still the old, complete checkpoint
    assert buffers["model.safetensors"].nbytes == old_manifest.file("model.safetensors").size  # type: ignore[union-attr]
    fresh = _model(16)
    safeckpt.load_checkpoint(root, fresh)
    assert _same(new, fresh)
    step = f"{root.path}/step-00000001"
    prefixes = lambda: sorted(n.rsplit("/", 1)[1] for n in storage.fs.ls(step, detail=False) if "/objects-" in n)  # noqa: E731
    assert len(prefixes()) == 2
    now = datetime.datetime.now(datetime.timezone.utc)
    storage.clean_stale(now + datetime.timedelta(hours=1))  # younger than the documented age: kept
    assert len(prefixes()) == 2
    storage.clean_stale(now + datetime.timedelta(seconds=objectio.REMOTE.stale_after_s + 60))
    current = safeckpt.verify_checkpoint(root / "step-00000001").objects
    assert prefixes() == [current]


def test_an_interrupted_save_leaves_nothing_a_reader_sees_and_is_cleaned_once_stale() -> None:
    root = ObjectPath("memory", uuid.uuid4().hex)
    storage = ObjectStorage(root)
    with storage.begin(9) as pending:
        pending.write_files([("config.json", [b"{}"], 2)])
        pending._discard = lambda: None  # type: ignore[method-assign]  # a writer killed before commit
    assert storage.list_checkpoints() == []
    with pytest.raises(safeckpt.CheckpointNotFoundError, match="never committed"):
        safeckpt.load_checkpoint(root / "step-00000009")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=objectio.REMOTE.stale_after_s + 60)
    storage.clean_stale(later)
    assert storage.exists(root / "step-00000009") is False


def test_an_object_store_checkpoint_copied_to_disk_loads_locally(tmp_path: object) -> None:
    root = ObjectPath("memory", uuid.uuid4().hex)
    model = _model(17)
    safeckpt.save_checkpoint(model, None, None, None, 4, directory=root)
    storage = ObjectStorage(root)
    storage.fs.get(f"{root.path}/step-00000004", f"{tmp_path}/step-00000004", recursive=True)
    fresh = _model(18)
    assert safeckpt.load_checkpoint(tmp_path, fresh).step == 4 and _same(model, fresh)
    assert safeckpt.verify_checkpoint(tmp_path).objects


def test_the_command_line_reads_s3_urls(server: S3Server, bucket: str, tmp_path: Path) -> None:
    """`safeckpt verify`, `diff` and `export` take URLs (endpoint and credentials from the
    environment, as s3fs reads them); `inspect`, `ls` and `prune`: see test_cli_remote.py."""
    opts = options(server.url)
    model = _model(19)
    safeckpt.save_checkpoint(model, None, None, None, 2, directory=f"s3://{bucket}/run", storage_options=opts)
    safeckpt.save_checkpoint(_model(20), None, None, None, 3, directory=f"s3://{bucket}/run", storage_options=opts)
    env = {**os.environ, "AWS_ENDPOINT_URL": server.url, "AWS_DEFAULT_REGION": "us-east-1"}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeckpt.cli", *argv], capture_output=True, text=True, env=env, timeout=120)

    verified = cli("verify", f"s3://{bucket}/run", f"s3://{bucket}/run/step-00000002")
    assert verified.returncode == 0, verified.stderr
    assert f"OK s3://{bucket}/run: step 3" in verified.stdout
    same = cli("diff", f"s3://{bucket}/run/step-00000002", f"s3://{bucket}/run/step-00000002")
    assert same.returncode == 0, same.stderr
    differ = cli("diff", f"s3://{bucket}/run/step-00000002", f"s3://{bucket}/run/step-00000003")
    assert differ.returncode == 1, differ.stderr
    exported = cli("export", f"s3://{bucket}/run/step-00000002", str(tmp_path / "model.safetensors"), "--to", "safetensors")
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    assert all(torch.equal(t, model.state_dict()[k]) for k, t in load_file(tmp_path / "model.safetensors").items())
    import s3fs

    fs = s3fs.S3FileSystem(**opts)  # type: ignore[arg-type]
    damaged = next(key for key in fs.find(f"{bucket}/run/step-00000002") if key.endswith("model.safetensors"))
    data = bytearray(fs.cat_file(damaged))
    data[-1] ^= 0x01
    fs.pipe_file(damaged, bytes(data))
    failed = cli("verify", f"s3://{bucket}/run/step-00000002")
    assert failed.returncode == 1 and "FAILED" in failed.stdout


def test_transient_errors_while_loading_are_retried(server: S3Server, bucket: str, fast_retries: None) -> None:
    faults = Faults(count=3, status=503, code="SlowDown", methods=("GET",))
    proxy = FaultProxy(server.port, faults)
    try:
        opts = options(proxy.url, attempts=1)
        model = _model(20)
        path = safeckpt.save_checkpoint(model, None, None, None, 1, directory=f"s3://{bucket}/run", storage_options=opts)
        fresh = _model(21)
        safeckpt.load_checkpoint(path, fresh, storage_options=opts)
        assert faults.injected == 3 and _same(model, fresh)
    finally:
        proxy.close()


def test_retention_uncommits_before_deleting_and_works_with_async_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"memory://{uuid.uuid4().hex}"
    manager = safeckpt.CheckpointManager(root, keep_last=1, async_save=True)
    fs = manager._storage.fs  # type: ignore[attr-defined]
    events: list[tuple[str, bool]] = []
    real_rm, real_rm_file = fs.rm, fs.rm_file

    def rm_file(path: str, *args: object, **kwargs: object) -> None:
        if path.endswith("manifest.json"):  # (fs.rm also removes the data objects one by one)
            events.append(("rm_file " + path.rsplit("/", 1)[-1], fs.exists(path)))
        real_rm_file(path, *args, **kwargs)

    def rm(path: str, *args: object, **kwargs: object) -> None:
        manifest = f"{path.rstrip('/')}/manifest.json"
        events.append(("rm " + path.rsplit("/", 1)[-1], fs.exists(manifest)))
        real_rm(path, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", rm)
    monkeypatch.setattr(fs, "rm_file", rm_file)
    model = _model(22)
    manager.save(1, model=model)
    manager.save(2, model=model)
    manager.wait()
    assert manager.steps() == [2]
    assert events == [("rm_file manifest.json", True), ("rm step-00000001", False)]

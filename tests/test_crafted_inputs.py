"""Hostile checkpoints, one named test per threat: each fails fast with a ``CheckpointError`` that
names the file, before it can allocate, hang, follow a link or leave the checkpoint folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

import safeckpt
from ckpt_tools import edit_manifest, replace_file, safetensors_bytes
from conftest import TinyLM, train_steps
from safeckpt.format import limits

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 2)
    return safeckpt.save_checkpoint(
        model, optimizer, {"lr": 0.01}, list("abcdefghijklmnopq"), 3,
        directory=tmp_path_factory.mktemp("pristine"), extra={"loader": {"epoch": 1}},
    )  # fmt: skip


@pytest.fixture
def saved(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of one checkpoint per test (building one costs more than copying it)."""
    return Path(shutil.copytree(pristine, tmp_path / "checkpoints" / pristine.name, symlinks=True))


def expect_corrupt(folder: Path, name: str, match: str | None = None) -> str:
    with pytest.raises(safeckpt.CheckpointCorruptedError, match=match) as info:
        safeckpt.load_checkpoint(folder)
    message = str(info.value)
    assert str(folder / name) in message, message
    return message


def put(folder: Path, name: str, data: bytes) -> None:
    replace_file(folder, name, data)


# -- safetensors archives ---------------------------------------------------------------------


def test_huge_header_length(saved: Path) -> None:
    put(saved, "model.safetensors", struct.pack("<Q", 2**64 - 1) + b"{}")
    expect_corrupt(saved, "model.safetensors", "header length 18446744073709551615 exceeds")


def test_header_length_just_over_the_limit(saved: Path) -> None:
    put(saved, "model.safetensors", struct.pack("<Q", limits.MAX_SAFETENSORS_HEADER_BYTES + 1) + b"{}")
    expect_corrupt(saved, "model.safetensors", "exceeds")


def test_header_length_past_end_of_file(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes({}, length=1000))
    expect_corrupt(saved, "model.safetensors", "runs past the end")


def test_file_shorter_than_length_prefix(saved: Path) -> None:
    put(saved, "model.safetensors", b"\x02\x00\x00")
    expect_corrupt(saved, "model.safetensors", "shorter than the 8-byte header length")


def test_overlapping_offsets(saved: Path) -> None:
    header = {"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    put(saved, "model.safetensors", safetensors_bytes(header, bytes(12)))
    expect_corrupt(saved, "model.safetensors", "does not start where the previous one ends")


def test_same_offsets_for_two_tensors(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes({"a": F32, "b": F32}, bytes(8)))
    expect_corrupt(saved, "model.safetensors", "does not start where the previous one ends")


def test_gap_between_tensors(saved: Path) -> None:
    header = {"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    put(saved, "model.safetensors", safetensors_bytes(header, bytes(20)))
    expect_corrupt(saved, "model.safetensors", "does not start where the previous one ends")


def test_offsets_past_end_of_file(saved: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    put(saved, "model.safetensors", safetensors_bytes(header, bytes(8)))
    expect_corrupt(saved, "model.safetensors", "tensor data ends at byte")


def test_trailing_bytes_after_last_tensor(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes({"a": F32}, bytes(9)))
    expect_corrupt(saved, "model.safetensors", "the file has")


def test_shape_whose_element_count_overflows(saved: Path) -> None:
    header = {"a": {"dtype": "F64", "shape": [2**62, 2**62, 2**62], "data_offsets": [0, 0]}}
    put(saved, "model.safetensors", safetensors_bytes(header))
    expect_corrupt(saved, "model.safetensors", "too large for 64-bit strides")


def test_empty_tensor_whose_strides_overflow(saved: Path) -> None:
    # Zero elements and zero bytes, but torch would compute strides of 2**80.
    header = {"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}
    put(saved, "model.safetensors", safetensors_bytes(header))
    expect_corrupt(saved, "model.safetensors", "too large for 64-bit strides")


def test_too_many_dimensions(saved: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [1] * (limits.MAX_TENSOR_NDIM + 1), "data_offsets": [0, 1]}}
    put(saved, "model.safetensors", safetensors_bytes(header, b"\x00"))
    expect_corrupt(saved, "model.safetensors", "invalid shape")


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]},
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**64]},
        {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1},
        [0, 8],
    ],
    ids=["negative", "float", "bool", "three-offsets", "negative-dim", "string-dim", "scalar-shape",
         "offset-2^64", "unknown-dtype", "missing-offsets", "extra-key", "not-an-object"],
)
def test_malformed_tensor_entry(saved: Path, entry: object) -> None:
    put(saved, "model.safetensors", safetensors_bytes({"a": entry}, bytes(8)))
    expect_corrupt(saved, "model.safetensors", "invalid safetensors archive")


def test_header_is_not_an_object(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes(b"[1, 2, 3]"))
    expect_corrupt(saved, "model.safetensors", "not a JSON object")


def test_header_with_duplicate_tensor_names(saved: Path) -> None:
    text = json.dumps({"a": F32}).encode()[:-1] + b', "a": ' + json.dumps(F32).encode() + b"}"
    put(saved, "model.safetensors", safetensors_bytes(text, bytes(8)))
    expect_corrupt(saved, "model.safetensors", "duplicate key")


def test_header_with_invalid_utf8(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes(b'{"\xff\xfe": 1}'))
    expect_corrupt(saved, "model.safetensors", "invalid JSON")


def test_metadata_values_must_be_strings(saved: Path) -> None:
    put(saved, "model.safetensors", safetensors_bytes({"__metadata__": {"format": 1}}))
    expect_corrupt(saved, "model.safetensors", "__metadata__ must map strings to strings")


def test_aliases_with_a_lone_surrogate(saved: Path) -> None:
    header = b'{"__metadata__": {"safeckpt.aliases": "{\\"\\\\ud800\\": \\"a\\"}"}, "a": ' + json.dumps(F32).encode() + b"}"
    put(saved, "model.safetensors", safetensors_bytes(header, bytes(8)))
    expect_corrupt(saved, "model.safetensors")


def test_aliases_pointing_to_a_missing_tensor(saved: Path) -> None:
    header = {"__metadata__": {"safeckpt.aliases": json.dumps({"b": "nope"})}, "a": F32}
    put(saved, "model.safetensors", safetensors_bytes(header, bytes(8)))
    expect_corrupt(saved, "model.safetensors", "aliases")


def test_bool_tensor_with_a_byte_other_than_0_or_1(saved: Path) -> None:
    header = {"a": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    put(saved, "model.safetensors", safetensors_bytes(header, b"\x00\x01\x02"))
    expect_corrupt(saved, "model.safetensors", "bool tensor 'a' holds bytes other than 0 and 1")


# -- msgpack structure documents ----------------------------------------------------------------


def test_msgpack_array_claiming_four_billion_elements(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16)
    expect_corrupt(saved, "optimizer.msgpack", "invalid msgpack")


def test_msgpack_map_claiming_four_billion_entries(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0" * 16)
    expect_corrupt(saved, "optimizer.msgpack", "invalid msgpack")


def test_msgpack_string_claiming_four_gigabytes(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\xdb\xff\xff\xff\xff" + b"x" * 16)
    expect_corrupt(saved, "optimizer.msgpack", "invalid msgpack")


def test_msgpack_deep_nesting(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\x91" * 100_000 + b"\xc0")
    expect_corrupt(saved, "optimizer.msgpack")


def test_msgpack_nesting_just_past_the_depth_limit(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\x91" * (limits.MAX_MSGPACK_DEPTH + 1) + b"\xc0")
    expect_corrupt(saved, "optimizer.msgpack", "nesting deeper than")


def test_msgpack_bomb_of_empty_maps_in_one_array(saved: Path) -> None:
    # 1 byte of file per 64-byte Python dict: refused before the array is built.
    count = limits.MAX_DOCUMENT_ITEMS + 1
    put(saved, "optimizer.msgpack", b"\xdd" + struct.pack(">I", count) + b"\x80" * count)
    expect_corrupt(saved, "optimizer.msgpack", "exceeds max_array_len")


def test_msgpack_bomb_of_empty_maps_across_arrays(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each array is under the per-container bound; the running total is not.
    monkeypatch.setattr(limits, "MAX_DOCUMENT_ITEMS", 5000)
    put(saved, "optimizer.msgpack", msgpack.packb([[{}] * 3000, [{}] * 3000]))
    expect_corrupt(saved, "optimizer.msgpack", "more than 5000 list elements and map entries")


@pytest.mark.parametrize("code", [1, 42, 127])
def test_msgpack_extension_type(saved: Path, code: int) -> None:
    put(saved, "optimizer.msgpack", msgpack.packb({"version": 1, "root": msgpack.ExtType(code, b"os.system")}))
    expect_corrupt(saved, "optimizer.msgpack", f"extension type {code}")


def test_msgpack_timestamp_extension(saved: Path) -> None:
    # Ext type -1 is decoded by msgpack itself and never reaches ext_hook.
    put(saved, "optimizer.msgpack", msgpack.packb({"version": 1, "root": msgpack.Timestamp(1)}))
    expect_corrupt(saved, "optimizer.msgpack", "Timestamp")


@pytest.mark.parametrize("document", [{1: None}, {b"version": 1}], ids=["int-key", "bytes-key"])
def test_msgpack_non_string_map_key(saved: Path, document: object) -> None:
    put(saved, "optimizer.msgpack", msgpack.packb(document, use_bin_type=True))
    expect_corrupt(saved, "optimizer.msgpack")


def test_msgpack_duplicate_keys(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\x82\xa7version\x01\xa7version\x01")
    expect_corrupt(saved, "optimizer.msgpack", "duplicate key")


def test_msgpack_trailing_bytes(saved: Path) -> None:
    put(saved, "optimizer.msgpack", msgpack.packb({"version": 1, "root": None}) + b"\xc0")
    expect_corrupt(saved, "optimizer.msgpack", "invalid msgpack")


def test_msgpack_invalid_utf8_string(saved: Path) -> None:
    put(saved, "optimizer.msgpack", b"\x81\xa2\xff\xfe\x01")
    expect_corrupt(saved, "optimizer.msgpack", "invalid msgpack")


# -- structure trees (valid msgpack, wrong shape) -------------------------------------------------


def structure(saved: Path, root: object, *, version: object = 1) -> None:
    put(saved, "optimizer.msgpack", msgpack.packb({"version": version, "root": root}, use_bin_type=True))


def test_tensor_reference_inside_a_dict_key(saved: Path) -> None:
    structure(saved, {"dict": [[{"tensor": "state.0.exp_avg"}, 1]]})
    expect_corrupt(saved, "optimizer.msgpack", "must be a str or int")


def test_container_inside_a_dict_key(saved: Path) -> None:
    structure(saved, {"dict": [[{"list": []}, 1]]})
    expect_corrupt(saved, "optimizer.msgpack", "must be a str or int")


def test_reference_to_a_missing_tensor(saved: Path) -> None:
    structure(saved, {"tensor": "../../etc/passwd"})
    expect_corrupt(saved, "optimizer.msgpack", "absent from optimizer.safetensors")


@pytest.mark.parametrize(
    "root",
    [
        {"pickle": "cos\nsystem\n"},
        {"list": [], "tuple": []},
        {"list": "abc"},
        {"dict": {"a": 1}},
        {"dict": [["a"]]},
        {"dict": [["a", 1], ["a", 2]]},
        {"tensor": 5},
        {},
    ],
    ids=["unknown-tag", "two-tags", "list-of-str", "dict-as-map", "short-pair", "duplicate-key",
         "tensor-not-str", "empty-map"],
)
def test_malformed_tree(saved: Path, root: object) -> None:
    structure(saved, root)
    expect_corrupt(saved, "optimizer.msgpack", "invalid structure")


def test_tree_nested_past_the_limit(saved: Path) -> None:
    root: object = None
    for _ in range(limits.MAX_NESTING_DEPTH + 1):
        root = {"tuple": [root]}
    structure(saved, root)
    expect_corrupt(saved, "optimizer.msgpack", "nested deeper than")


@pytest.mark.parametrize("version", [True, 2, "1", 1.0, None])
def test_structure_version(saved: Path, version: object) -> None:
    structure(saved, None, version=version)
    expect_corrupt(saved, "optimizer.msgpack", "structure version")


# -- JSON documents ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [b'{"lr": NaN}', b'{"lr": -Infinity}', b'{"lr": 1e400}'], ids=["nan", "inf", "overflow"])
def test_json_non_finite_numbers(saved: Path, text: bytes) -> None:
    put(saved, "config.json", text)
    expect_corrupt(saved, "config.json")


def test_json_duplicate_keys(saved: Path) -> None:
    put(saved, "config.json", b'{"lr": 1, "lr": 2}')
    expect_corrupt(saved, "config.json", "duplicate key 'lr'")


def test_json_deep_nesting(saved: Path) -> None:
    put(saved, "vocab.json", b"[" * 100_000 + b"]" * 100_000)
    expect_corrupt(saved, "vocab.json")


def test_json_lone_surrogate(saved: Path) -> None:
    put(saved, "vocab.json", b'["\\udc80"]')
    expect_corrupt(saved, "vocab.json", "surrogate")


def test_json_bomb_of_empty_arrays(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_DOCUMENT_ITEMS", 5000)
    put(saved, "vocab.json", b"[" + b"[]," * 5000 + b"[]]")
    expect_corrupt(saved, "vocab.json", "arrays and objects exceed")


def test_json_over_the_size_limit(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 100)
    put(saved, "vocab.json", json.dumps(["token"] * 50).encode())
    expect_corrupt(saved, "vocab.json", "exceeds the limit of 100")


@pytest.mark.parametrize("text", [b"\xef\xbb\xbf[]", b"[\xff]", b"", b"[1,]"], ids=["bom", "bad-utf8", "empty", "trailing-comma"])
def test_json_malformed(saved: Path, text: bytes) -> None:
    put(saved, "vocab.json", text)
    expect_corrupt(saved, "vocab.json")


# -- manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../escape.bin", "/etc/passwd", "sub/model.safetensors", "a\\b", "a\x00b", ".hidden", "..", ".",
     "x" * 200, "manifest.json", "", "ｍodel.safetensors", "model.safetensors\n", "-rf"],
    ids=["parent", "absolute", "separator", "backslash", "nul", "dot-file", "dotdot", "dot", "long",
         "manifest", "empty", "fullwidth", "newline", "dash"],
)
def test_path_traversal_and_bad_names_are_refused_before_any_file_is_opened(
    saved: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (saved.parent / "escape.bin").write_bytes(b"secret")
    manifest = json.loads((saved / "manifest.json").read_bytes())
    manifest["files"][name] = {"size": 6, "sha256": "0" * 64}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    opened: list[object] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    expect_corrupt(saved, "manifest.json", "is not allowed")
    assert all(str(p).endswith(("manifest.json", saved.name)) or p == "manifest.json" for p in opened), opened


def test_manifest_over_the_size_limit_is_not_read(saved: Path) -> None:
    with open(saved / "manifest.json", "r+b") as handle:
        handle.truncate(limits.MAX_MANIFEST_BYTES + 1)  # sparse: no memory or disk used
    expect_corrupt(saved, "manifest.json", "over the limit")


def test_manifest_with_too_many_files(saved: Path) -> None:
    files = {f"f{i}": {"size": 0, "sha256": "0" * 64} for i in range(limits.MAX_FILES + 1)}
    edit_manifest(saved, files=files)
    expect_corrupt(saved, "manifest.json", "more than the limit")


@pytest.mark.parametrize("step", [-1, 2**63, 10**100, "3", 3.0, True])
def test_manifest_bad_step(saved: Path, step: object) -> None:
    edit_manifest(saved, step=step)
    expect_corrupt(saved, "manifest.json", "'step'")


def test_manifest_size_larger_than_the_file(saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_bytes())
    manifest["files"]["model.safetensors"]["size"] = 2**62
    (saved / "manifest.json").write_text(json.dumps(manifest))
    expect_corrupt(saved, "model.safetensors", "manifest.json says 4611686018427387904")


@pytest.mark.parametrize("sha", ["A" * 64, "0" * 63, 0, None])
def test_manifest_bad_digest(saved: Path, sha: object) -> None:
    manifest = json.loads((saved / "manifest.json").read_bytes())
    manifest["files"]["model.safetensors"]["sha256"] = sha
    (saved / "manifest.json").write_text(json.dumps(manifest))
    expect_corrupt(saved, "manifest.json", "sha256")


def test_manifest_from_a_future_major_version(saved: Path) -> None:
    edit_manifest(saved, format_version="2.0")
    with pytest.raises(safeckpt.UnsupportedFormatError, match="upgrade safeckpt"):
        safeckpt.load_checkpoint(saved)


def test_manifest_that_is_not_json(saved: Path) -> None:
    (saved / "manifest.json").write_bytes(b"\x80\x04\x95pickle")
    expect_corrupt(saved, "manifest.json", "invalid JSON")


# -- the file system -------------------------------------------------------------------------


def test_symlink_to_a_file_with_the_right_bytes_is_refused(saved: Path) -> None:
    real = saved.parent / "elsewhere.safetensors"
    (saved / "model.safetensors").rename(real)
    (saved / "model.safetensors").symlink_to(real)
    expect_corrupt(saved, "model.safetensors", "symbolic link")


def test_symlinked_manifest_is_refused(saved: Path) -> None:
    real = saved.parent / "manifest-elsewhere.json"
    (saved / "manifest.json").rename(real)
    (saved / "manifest.json").symlink_to(real)
    expect_corrupt(saved, "manifest.json", "symbolic link")


def test_symlink_to_a_device_is_refused(saved: Path) -> None:
    (saved / "vocab.json").unlink()
    (saved / "vocab.json").symlink_to("/dev/zero")
    expect_corrupt(saved, "vocab.json", "symbolic link")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["model.safetensors", "manifest.json"])
def test_fifo_does_not_hang(saved: Path, name: str) -> None:
    (saved / name).unlink()
    os.mkfifo(saved / name)  # nobody ever writes: a blocking open or read would hang forever
    expect_corrupt(saved, name, "not a regular file")


def test_character_device_like_dev_zero_is_refused(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    try:
        os.mknod(saved / "model.safetensors", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD (root outside a restricted container)")
    expect_corrupt(saved, "model.safetensors", "not a regular file")


def test_folder_in_place_of_a_file(saved: Path) -> None:
    (saved / "config.json").unlink()
    (saved / "config.json").mkdir()
    expect_corrupt(saved, "config.json", "not a regular file")


def test_symlinked_step_folder_is_not_listed(saved: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    saved.rename(elsewhere)
    (saved.parent / "step-00000099").symlink_to(elsewhere)
    with pytest.raises(safeckpt.CheckpointNotFoundError):
        safeckpt.load_checkpoint(saved.parent)


SPARSE_PROBE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # whatever the machine's overcommit policy
import safeckpt
try:
    getattr(safeckpt, sys.argv[2])(sys.argv[1])
except safeckpt.CheckpointError as exc:
    print(type(exc).__name__, exc)
"""


def _sparse_model(saved: Path, size: int) -> None:
    try:
        with open(saved / "model.safetensors", "r+b") as handle:
            handle.truncate(size)
    except OSError as exc:
        pytest.skip(f"this file system cannot hold a {size >> 30} GiB sparse file ({exc.strerror})")
    manifest = json.loads((saved / "manifest.json").read_bytes())
    manifest["files"]["model.safetensors"]["size"] = size
    (saved / "manifest.json").write_text(json.dumps(manifest))


def _probe(saved: Path, function: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SPARSE_PROBE, str(saved), function], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sparse_file_larger_than_memory_with_matching_manifest(saved: Path) -> None:
    _sparse_model(saved, 2**40)  # 1 TiB, taking no disk space
    out = _probe(saved, "load_checkpoint")
    assert out.startswith("CheckpointCorruptedError"), out
    assert str(saved / "model.safetensors") in out and "cannot be read" in out


def test_verify_streams_a_file_larger_than_its_memory_limit(saved: Path) -> None:
    _sparse_model(saved, 6 << 30)  # more than the probe's 4 GiB address space
    out = _probe(saved, "verify_checkpoint")  # hashed piece by piece: the zeros do not match
    assert out.startswith("CheckpointCorruptedError"), out
    assert f"{saved / 'model.safetensors'}: SHA-256 is" in out

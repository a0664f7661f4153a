"""The invalid conformance vectors: one fault each, applied to a copy of a small valid checkpoint.

Used by generate.py; see its docstring. Each case names the error class a reader must raise and
the file its message must name.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import msgpack
from generate import put_file, read_manifest, safetensors_bytes, write_expected, write_manifest

CORRUPTED, NOT_FOUND, UNSUPPORTED = "CheckpointCorruptedError", "CheckpointNotFoundError", "UnsupportedFormatError"
Mutation = Callable[[Path], None]
CASES: list[tuple[str, str, str, str, str, Mutation]] = []
"""(name, description, error class, file the message names, base checkpoint, mutation of its folder).

Bases: "plain" (format 1.0, every kind of file, all small) and "chunks" (format 1.1, a model
archive of two 64 KiB chunks with per-chunk digests; larger, so used only where a case needs it).
"""
CHUNK = 65536


def case(name: str, description: str, error: str, file: str, *, base: str = "plain") -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        CASES.append((name, description, error, file, base, fn))
        return fn

    return register


def _edit_manifest(folder: Path, edit: Callable[[dict[str, object]], None]) -> None:
    manifest = read_manifest(folder)
    edit(manifest)
    write_manifest(folder, manifest)


def _model_data(folder: Path) -> bytes:
    """The data section of the base model archive: embed.weight (32 bytes), head.bias (16 bytes)."""
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    return blob[8 + n :]


def _model_with(folder: Path, entries: dict[str, object], data: bytes | None = None, *, meta: object = None) -> None:
    header: dict[str, object] = {"__metadata__": meta if meta is not None else {"format": "pt"}}
    header.update(entries)
    put_file(folder, "model.safetensors", safetensors_bytes(header, _model_data(folder) if data is None else data))


def _doc(root: bytes) -> bytes:
    """A structure document whose root node is given as raw msgpack."""
    return b"\x82" + msgpack.packb("version") + msgpack.packb(1) + msgpack.packb("root") + root


# --- integrity: the manifest's sizes and hashes --------------------------------------------------


@case("bad-hash", "one byte of tensor data flipped; size unchanged", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(blob))


@case("truncated-file", "last byte of an archive cut off", CORRUPTED, "optimizer.safetensors")
def _(folder: Path) -> None:
    path = folder / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:-1])


@case("extended-file", "a byte appended to a document", CORRUPTED, "config.json")
def _(folder: Path) -> None:
    path = folder / "config.json"
    path.write_bytes(path.read_bytes() + b" ")


@case("missing-file", "a file the manifest lists is absent", NOT_FOUND, "vocab.json")
def _(folder: Path) -> None:
    (folder / "vocab.json").unlink()


@case("missing-manifest", "a step folder without manifest.json (an interrupted save)", NOT_FOUND, "manifest.json")
def _(folder: Path) -> None:
    (folder / "manifest.json").unlink()


@case("symlinked-file", "a listed file is a symbolic link (to a file with the right bytes)", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    os.rename(folder / "model.safetensors", folder / "model.bin")
    os.symlink("model.bin", folder / "model.safetensors")


# --- the manifest ----------------------------------------------------------------------------------


@case("manifest-not-json", "manifest.json is not JSON", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    (folder / "manifest.json").write_bytes(b"format = safeckpt\n")


@case("manifest-not-object", "manifest.json is a JSON array", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    (folder / "manifest.json").write_bytes(b"[]\n")


@case("manifest-duplicate-key", "manifest.json has the key 'step' twice", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    text = (folder / "manifest.json").read_text(encoding="utf-8")
    (folder / "manifest.json").write_text(text.replace('"step": 7,', '"step": 7,\n "step": 8,', 1), encoding="utf-8")


@case("manifest-path-traversal", "a file name climbs out of the folder", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].update({"../outside.bin": m["files"]["config.json"]}))  # type: ignore[attr-defined,index]


@case("manifest-absolute-path", "a file name is an absolute path", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].update({"/etc/passwd": m["files"]["config.json"]}))  # type: ignore[attr-defined,index]


@case("manifest-hidden-name", "a file name starts with a dot", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].update({".hidden": m["files"]["config.json"]}))  # type: ignore[attr-defined,index]


@case("manifest-unknown-major", "format_version 2.0", UNSUPPORTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(format_version="2.0"))


@case("manifest-other-format", "'format' is not 'safeckpt'", UNSUPPORTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(format="torch.save"))


@case("manifest-bad-version-string", "format_version is the number 1.0, not a string", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(format_version=1.0))


@case("manifest-negative-step", "step is -1", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(step=-1))


@case("manifest-step-too-large", "step is 2^63, beyond a signed 64-bit integer", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m.update(step=2**63))


@case("manifest-uppercase-sha", "a sha256 in upper-case hex", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"]["config.json"].update(sha256=m["files"]["config.json"]["sha256"].upper()))  # type: ignore[index]


@case("manifest-without-model", "model.safetensors is not listed", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].pop("model.safetensors"))  # type: ignore[attr-defined]


@case("tree-without-archive", "optimizer.msgpack is listed without optimizer.safetensors", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_manifest(folder, lambda m: m["files"].pop("optimizer.safetensors"))  # type: ignore[attr-defined]


# --- per-chunk digests (format 1.1) ---------------------------------------------------------------


def _edit_chunks(folder: Path, name: str, edit: Callable[[dict[str, object]], object]) -> None:
    """Give ``name`` right chunk digests (one 64 KiB chunk: the files of the plain base are small),
    mark the manifest 1.1, then let ``edit`` break them; ``edit`` may return a replacement."""
    def apply(m: dict[str, object]) -> None:
        entry = m["files"][name]  # type: ignore[index]
        chunks = {"size": CHUNK, "sha256": [entry["sha256"]] if entry["size"] else []}
        m["format_version"] = "1.1"
        entry["chunks"] = edit(chunks) or chunks

    _edit_manifest(folder, apply)


@case("chunks-bad-hash", "one byte of the second chunk flipped: its chunk digest and the whole-file digest "
      "are both wrong", CORRUPTED, "model.safetensors", base="chunks")
def _(folder: Path) -> None:
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(blob))


@case("chunks-size-not-power-of-two", "chunks.size is 98304, within bounds but not a power of two",
      CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(size=3 * 32768))


@case("chunks-size-too-small", "chunks.size is 32768, below the minimum of 65536", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(size=32768))


@case("chunks-size-too-large", "chunks.size is 2^41, above the maximum of 2^40", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(size=2**41))


@case("chunks-size-float", "chunks.size is the float 65536.0, not an integer", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(size=float(CHUNK)))


@case("chunks-wrong-count", "two chunk digests for a file of one chunk", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(sha256=c["sha256"] * 2))  # type: ignore[operator]


@case("chunks-uppercase-sha", "a chunk digest in upper-case hex", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: c.update(sha256=[d.upper() for d in c["sha256"]]))  # type: ignore[attr-defined]


@case("chunks-not-object", "chunks is an array [size, digests], not an object", CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    _edit_chunks(folder, "model.safetensors", lambda c: [c["size"], c["sha256"]])


@case("chunks-empty-file", "an empty file with chunks (no digests): a file with chunks must not be empty",
      CORRUPTED, "manifest.json")
def _(folder: Path) -> None:
    put_file(folder, "empty.bin", b"")
    _edit_chunks(folder, "empty.bin", lambda c: None)


# --- safetensors archives --------------------------------------------------------------------------


@case("safetensors-header-overflow", "header length 2^64-1", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    blob = (folder / "model.safetensors").read_bytes()
    put_file(folder, "model.safetensors", b"\xff" * 8 + blob[8:])


@case("safetensors-header-past-end", "header length runs past the end of the file", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    blob = (folder / "model.safetensors").read_bytes()
    put_file(folder, "model.safetensors", struct.pack("<Q", len(blob)) + blob[8:])


@case("safetensors-header-not-object", "the header is a JSON array", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    put_file(folder, "model.safetensors", safetensors_bytes(b"[]", b""))


@case("safetensors-duplicate-name", "a tensor name appears twice in the header", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    entry = '"head.bias":{"dtype":"F32","shape":[4],"data_offsets":[32,48]}'
    text = '{"embed.weight":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]},' + entry + "," + entry + "}"
    put_file(folder, "model.safetensors", safetensors_bytes(text.encode(), _model_data(folder)))


@case("safetensors-overlap", "two tensors' data overlap", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
                         "tail": {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}})


@case("safetensors-gap", "unused bytes between two tensors", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}})


@case("safetensors-trailing-bytes", "bytes after the last tensor", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}},
                _model_data(folder) + b"\x00" * 8)


@case("safetensors-span-mismatch", "data_offsets span differs from shape x dtype size", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [3], "data_offsets": [32, 48]}})


@case("safetensors-unknown-dtype", "a dtype outside the format's table", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F128", "shape": [1], "data_offsets": [32, 48]}})


@case("safetensors-bool-byte", "a BOOL tensor holds a byte other than 0 and 1", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "BOOL", "shape": [16], "data_offsets": [32, 48]}},
                _model_data(folder)[:32] + bytes([0, 1, 2, 0] * 4))


@case("safetensors-stride-overflow", "an empty tensor whose shape overflows 64-bit strides", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]},
                         "huge": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [48, 48]}})


@case("safetensors-bad-metadata", "a __metadata__ value is not a string", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}},
                meta={"format": "pt", "safeckpt.aliases": {"head.weight": "embed.weight"}})


@case("model-bad-alias", "an alias points at a tensor that is not stored", CORRUPTED, "model.safetensors")
def _(folder: Path) -> None:
    _model_with(folder, {"embed.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
                         "head.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}},
                meta={"format": "pt", "safeckpt.aliases": '{"head.weight":"missing.weight"}'})


# --- structure documents (msgpack) -----------------------------------------------------------------


@case("msgpack-invalid", "the document is cut short mid-value", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", (folder / "optimizer.msgpack").read_bytes()[:-3])


@case("msgpack-trailing-bytes", "a second object after the document", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", (folder / "optimizer.msgpack").read_bytes() + b"\xc0")


@case("msgpack-ext-type", "a msgpack extension value (type 5)", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", _doc(msgpack.packb(msgpack.ExtType(5, b"\x01\x02"))))


@case("msgpack-timestamp", "a msgpack timestamp (extension type -1)", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", _doc(b"\xd6\xff\x00\x00\x00\x00"))


@case("msgpack-duplicate-key", "the document map has 'root' twice", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    data = b"\x83" + b"".join(msgpack.packb(x) for x in ("version", 1, "root", None, "root", None))
    put_file(folder, "optimizer.msgpack", data)


@case("msgpack-invalid-utf8", "a str value that is not UTF-8", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", _doc(b"\xa2\xff\xfe"))


@case("msgpack-non-string-key", "an integer key in a tag map", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", _doc(b"\x81\x01\x90"))


@case("msgpack-too-deep", "arrays nested 300 deep (over the raw depth limit)", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", _doc(b"\x91" * 300 + b"\xc0"))


@case("tree-too-deep", "lists nested 65 deep (over the tree depth limit)", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    node: object = None
    for _ in range(66):
        node = {"list": [node]}
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": node}))


@case("tree-unknown-tag", "a container tag the format does not define", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"set": [1, 2]}}))


@case("tree-two-key-tag", "a tag map with two keys", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"list": [], "tuple": []}}))


@case("tree-version-2", "structure document version 2", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 2, "root": None}))


@case("tree-bad-dict-pair", "a dict entry that is not a [key, value] pair", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"dict": [["a", 1, 2]]}}))


@case("tree-float-key", "a dict key that is a float", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"dict": [[1.5, 1]]}}))


@case("tree-duplicate-dict-key", "a dict with the key 2 twice", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"dict": [[2, 1], [2, 3]]}}))


@case("tree-missing-tensor", "a tensor reference to a name absent from the archive", CORRUPTED, "optimizer.msgpack")
def _(folder: Path) -> None:
    put_file(folder, "optimizer.msgpack", msgpack.packb({"version": 1, "root": {"tensor": "no.such.tensor"}}))


# --- JSON documents --------------------------------------------------------------------------------


@case("json-duplicate-key", "config.json has the key 'dim' twice", CORRUPTED, "config.json")
def _(folder: Path) -> None:
    put_file(folder, "config.json", b'{"dim": 2, "dim": 3}\n')


@case("json-nan", "config.json holds NaN", CORRUPTED, "config.json")
def _(folder: Path) -> None:
    put_file(folder, "config.json", b'{"dim": NaN}\n')


@case("json-float-overflow", "config.json holds 1e400 (beyond float64)", CORRUPTED, "config.json")
def _(folder: Path) -> None:
    put_file(folder, "config.json", b'{"dim": 1e400}\n')


@case("json-invalid-utf8", "vocab.json is not UTF-8", CORRUPTED, "vocab.json")
def _(folder: Path) -> None:
    put_file(folder, "vocab.json", b'["a", "\xff"]\n')


@case("json-trailing-garbage", "vocab.json has a second value", CORRUPTED, "vocab.json")
def _(folder: Path) -> None:
    put_file(folder, "vocab.json", b'["a"] ["b"]\n')


def invalid_vectors(out: Path, scratch: Path, *, save: Callable[..., Path]) -> None:
    """Write every case under ``out``; ``save`` is generate.save (pinned created/producer)."""
    import torch
    from generate import small_chunks

    embed = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    bases = {
        "plain": save(scratch / "plain", step=7, model={"embed.weight": embed, "head.weight": embed, "head.bias": torch.zeros(4)},
                      optimizer={"state": {0: {"momentum_buffer": torch.ones(4, 2)}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                      config={"dim": 2}, vocab=["a", "b", "c", "d"]),
    }
    with small_chunks():
        bases["chunks"] = save(scratch / "chunks", step=8, model={"w": torch.arange(16400, dtype=torch.float32)})
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case name"
    for name, description, error, file, base_name, mutate in CASES:
        base = bases[base_name]
        vector = out / name
        vector.mkdir(parents=True)
        folder = vector / base.name
        shutil.copytree(base, folder)
        mutate(folder)
        write_expected(vector, {"description": description, "path": base.name, "error": error, "error_file": file})


__all__ = ["CASES", "invalid_vectors"]

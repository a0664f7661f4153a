"""Regenerate the conformance vectors of safeckpt format version 1.

    python spec/vectors/generate.py [OUT]      (default: the folder holding this script)

Valid vectors are written by the real ``safeckpt.save_checkpoint`` from fixed state, with the
two fields documented to vary (``created``, ``producer``) pinned, so regenerating gives the same
bytes; a test fails if it does not. Invalid vectors are derived from a valid one by the
mutations in ``invalid.py``; each keeps the manifest's hashes right unless the fault *is* a
hash, so a reader is caught by the check that case is about. Every vector folder holds an
``expected.json`` (format: spec/FORMAT.md, "Conformance vectors"). Only ``valid/`` and
``invalid/`` under OUT are replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
CREATED = "2000-01-01T00:00:00+00:00"
PRODUCER = {"safeckpt": "conformance-vectors"}
JSONValue = object


# --- the expected-JSON encoding of decoded values (spec/FORMAT.md, "Conformance vectors") -------


def tensor_facts(value: object) -> dict[str, object] | None:
    """dtype, shape and SHA-256 of the raw little-endian bytes of a torch tensor or numpy array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        from safeckpt.torch.tensors import DTYPE_NAMES

        flat = value.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return {"dtype": DTYPE_NAMES[value.dtype], "shape": list(value.shape), "sha256": _sha(raw)}
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        from safeckpt.numpy import NUMPY_DTYPES

        name = next(k for k, d in NUMPY_DTYPES.items() if d == value.dtype)
        raw = np.ascontiguousarray(value).tobytes()
        return {"dtype": name, "shape": list(value.shape), "sha256": _sha(raw)}
    return None


def canonical(value: object) -> JSONValue:
    """A decoded state tree in the expected-JSON encoding (tagged floats, bytes, containers)."""
    facts = tensor_facts(value)
    if facts is not None:
        return {"tensor": facts}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return {"float": "nan"}
        if math.isinf(value):
            return {"float": "inf" if value > 0 else "-inf"}
        return {"float": value}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return {"list": [canonical(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [canonical(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[k, canonical(v)] for k, v in value.items()]}
    raise TypeError(f"no expected-JSON encoding for {type(value).__qualname__}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- file helpers shared with invalid.py -----------------------------------------------------------


def dump_json(value: object) -> bytes:
    """The writer's JSON style: one-space indent, UTF-8, trailing newline."""
    return (json.dumps(value, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def read_manifest(folder: Path) -> dict[str, object]:
    return json.loads((folder / "manifest.json").read_bytes())


def write_manifest(folder: Path, manifest: dict[str, object]) -> None:
    (folder / "manifest.json").write_bytes(dump_json(manifest))


def put_file(folder: Path, name: str, data: bytes, *, rehash: bool = True) -> None:
    """Replace a file; with ``rehash`` its manifest entry follows, so only parsing can catch it."""
    (folder / name).write_bytes(data)
    if rehash:
        manifest = read_manifest(folder)
        manifest["files"][name] = {"size": len(data), "sha256": _sha(data)}  # type: ignore[index]
        manifest["files"] = dict(sorted(manifest["files"].items()))  # type: ignore[attr-defined]
        write_manifest(folder, manifest)


def safetensors_bytes(header: dict[str, object] | bytes, data: bytes, *, pad: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def archive_tensors(path: Path) -> list[dict[str, object]]:
    """Every tensor of an archive in data order, parsed here without safeckpt (a second reader)."""
    blob = path.read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    rows = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    out = []
    for name, info in rows:
        begin, end = info["data_offsets"]
        raw = blob[8 + n + begin : 8 + n + end]
        out.append({"file": path.name, "name": name, "dtype": info["dtype"], "shape": info["shape"], "sha256": _sha(raw)})
    return out


# --- writing vectors -------------------------------------------------------------------------------


def save(root: Path, *, step: int, model: object, rng_tree: object | None = None, **kwargs: object) -> Path:
    """save_checkpoint with pinned created/producer; ``rng_tree`` replaces the live RNG capture."""
    import safeckpt
    import safeckpt.torch.plan

    capture = mock.patch.object(safeckpt.torch.plan, "capture_rng", lambda generators=None: rng_tree)
    with capture:
        folder = safeckpt.save_checkpoint(model, kwargs.pop("optimizer", None), kwargs.pop("config", None),
                                          kwargs.pop("vocab", None), step, directory=root,
                                          rng=rng_tree is not None, **kwargs)  # type: ignore[arg-type]
    (Path(root) / ".safeckpt.lock").unlink()  # the writers' lock file; only the root vector keeps one
    manifest = read_manifest(folder)
    manifest["created"], manifest["producer"] = CREATED, PRODUCER
    write_manifest(folder, manifest)
    return folder


@contextmanager
def small_chunks() -> Iterator[None]:
    """Make the writer add chunk digests (format 1.1) to files over 64 KiB, on any machine.

    By default it adds them only to files of two or more 16 MiB chunks, and only where the
    process may use four cores; vectors must not depend on either.
    """
    from safeckpt.storage.tuning import TUNING

    with mock.patch.object(TUNING, "min_cores_for_chunks", 1), mock.patch.object(TUNING, "min_chunk", 65536):
        yield


def expected_valid(
    folder: Path, *, description: str, path: str, model: dict[str, object], trees: dict[str, object],
    config: object = None, vocab: object = None,
) -> dict[str, object]:
    """What a reader must produce, from the state that was saved (not from reading it back)."""
    manifest = read_manifest(folder)
    firsts: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.items():
        if id(tensor) in firsts:
            aliases[name] = firsts[id(tensor)]
        firsts.setdefault(id(tensor), name)
    tensors = [row for name in sorted(manifest["files"]) if name.endswith(".safetensors")  # type: ignore[arg-type]
               for row in archive_tensors(folder / name)]
    return {
        "description": description,
        "path": path,
        "error": None,
        "step": manifest["step"],
        "format_version": manifest["format_version"],
        "metadata": manifest.get("metadata", {}),
        "config": config,
        "vocab": vocab,
        "model": {name: tensor_facts(t) for name, t in sorted(model.items())},
        "aliases": aliases,
        "trees": {name: None if trees.get(name) is None else canonical(trees[name])
                  for name in ("optimizer", "scheduler", "rng", "extra")},
        "tensors": tensors,
    }


def write_expected(vector: Path, expected: dict[str, object]) -> None:
    (vector / "expected.json").write_bytes(dump_json(expected))


def valid_vectors(out: Path) -> None:
    import torch

    def vector(name: str) -> Path:
        path = out / "valid" / name
        path.mkdir(parents=True)
        return path

    # every dtype, special values, empty and 0-dim tensors
    u64 = torch.tensor([-1, 0, 1, 2**62], dtype=torch.int64).view(torch.uint64)
    model = {
        "f64": torch.tensor([[0.1, -2.5, 1e300], [5e-324, -0.0, 3.0]], dtype=torch.float64),
        "f32": torch.tensor([1.5, float("nan"), float("inf"), float("-inf"), -0.0], dtype=torch.float32),
        "f16": torch.tensor([[0.5, -1.0], [65504.0, 6e-8]], dtype=torch.float16),
        "bf16": torch.arange(-2, 3, dtype=torch.float32).mul(1.5).to(torch.bfloat16),
        "f8_e4m3": torch.tensor([0.0, 1.0, -2.0, 448.0], dtype=torch.float32).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.tensor([0.0, 1.0, -2.0, 57344.0], dtype=torch.float32).to(torch.float8_e5m2),
        "c64": torch.tensor([1 + 2j, -0.5 - 1j], dtype=torch.complex64),
        "i64": torch.tensor([-(2**63), -1, 0, 2**63 - 1], dtype=torch.int64),
        "i32": torch.tensor([-(2**31), 7, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([[-(2**15), 2**15 - 1]], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u64": u64,
        "u32": torch.tensor([0, 2**31 + 5], dtype=torch.int64).to(torch.uint32),
        "u16": torch.tensor([0, 65535], dtype=torch.int32).to(torch.uint16),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar.f32": torch.tensor(2.25),
        "scalar.i64": torch.tensor(-7, dtype=torch.int64),
        "empty.f32": torch.zeros(0, 4),
        "empty.bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "empty.u8": torch.zeros(0, dtype=torch.uint8),
    }
    v = vector("all-dtypes")
    folder = save(v, step=1, model=model)
    write_expected(v, expected_valid(folder, description="every dtype, special float values, empty and 0-dim tensors; "
                                     "model only", path=folder.name, model=model, trees={}))

    # tied weights and a non-contiguous tensor
    embed = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 8
    model = {"embed.weight": embed, "block.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
             "head.weight": embed, "lm.out.weight": embed, "norm.bias": torch.zeros(3)}
    config = {"dim": 3, "tie_embeddings": True, "name": "tied \u00e9\u6f22\U0001f600", "dropout": 0.1, "layers": [1, 2]}
    vocab = {"<pad>": 0, "a": 1, "\u00e9": 2, "\U0001f600": 3}
    v = vector("tied")
    folder = save(v, step=12, model=model, config=config, vocab=vocab, metadata={"run": "vectors", "n": [1, 2.5, None, True]})
    write_expected(v, expected_valid(folder, description="tied weights stored once with aliases; a transposed "
                                     "(non-contiguous) tensor; unicode config and vocab; metadata",
                                     path=folder.name, model=model, trees={}, config=config, vocab=vocab))

    # every value type of the structure encoding
    shared = torch.tensor([1.0, 2.0])
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 2), 0.5), "exp_avg_sq": torch.zeros(2, 2)},
                  1: {"step": torch.tensor(3.0), "exp_avg": shared, "exp_avg_sq": shared}},
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
                          "foreach": None, "maximize": False, "params": [0, 1]}],
    }
    scheduler = {"base_lrs": [0.001], "last_epoch": 3, "_step_count": 4, "_last_lr": [0.00075], "lr_lambdas": [None]}
    extra = {
        "b-first": "insertion order is kept, not sorted",
        "ints": [0, -1, 127, 128, -33, 2**32, 2**63 - 1, -(2**63), 2**64 - 1],
        "floats": (0.0, -0.0, 1.0, 0.1, 1e-300, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf")),
        "int_keys": {0: "zero", -5: "minus five", 2**64 - 1: "max", "1": "the string one", 1: "the int one"},
        "bytes": [b"", b"\x00\xff\x80", "\u00e9 is text, not bytes"],
        "strings": ["", "tensor", "\U0001f600 astral", "nul\x00inside"],
        "nested": ((1, (2, (3, ()))), [[], {}], {"list": "a user key that looks like a tag"}),
        "tensors": {"scalar": torch.tensor(7, dtype=torch.int32), "empty": torch.zeros(0, 2),
                    "bf16": torch.tensor([1.0, -0.5], dtype=torch.bfloat16), "again": shared},
        "none_and_bools": [None, True, False],
    }
    v = vector("trees")
    folder = save(v, step=3, model={"w": torch.ones(2, 2)}, optimizer=optimizer, scheduler=scheduler, extra=extra)
    write_expected(v, expected_valid(folder, description="optimizer, scheduler and extra trees: tuples, int keys, "
                                     "bytes vs str, non-finite floats, 64-bit int range, shared and empty tensors",
                                     path=folder.name, model={"w": torch.ones(2, 2)},
                                     trees={"optimizer": optimizer, "scheduler": scheduler, "extra": extra}))

    # the RNG tree as the torch writer lays it out
    rng = {"python": random.Random(0).getstate(), "torch": torch.Generator().manual_seed(0).get_state(),
           "generators": {"data": {"kind": "torch", "device": "cpu", "state": torch.Generator().manual_seed(1).get_state()}}}
    v = vector("rng")
    folder = save(v, step=5, model={"w": torch.ones(1)}, rng_tree=rng)
    write_expected(v, expected_valid(folder, description="RNG state tree (python, torch CPU, a named generator)",
                                     path=folder.name, model={"w": torch.ones(1)}, trees={"rng": rng}))

    # empty model, addressed by its manifest
    v = vector("empty-model")
    folder = save(v, step=0, model={})
    write_expected(v, expected_valid(folder, description="a model with no tensors; path is the manifest itself",
                                     path=f"{folder.name}/manifest.json", model={}, trees={}))

    _root_vector(vector("root"))
    _future_minor_vector(vector("future-minor"))
    _foreign_archive_vector(vector("foreign-archive"))
    _chunks_vector(vector("chunks"))


def _root_vector(v: Path) -> None:
    import torch

    one = {"w": torch.ones(2)}
    save(v, step=1, model=one)
    newest = {"w": torch.full((2,), 2.0)}
    folder = save(v, step=2, model=newest)
    crashed = save(v, step=3, model={"w": torch.full((2,), 3.0)})
    (crashed / "manifest.json").unlink()  # a save that died before its commit marker
    for hidden in (".tmp-step-00000004.0123456789abcdef", ".trash-step-00000001.fedcba9876543210"):
        shutil.copytree(folder, v / hidden)  # complete-looking, but hidden: never loaded
    (v / "step-00000009").write_bytes(b"a file, not a checkpoint folder\n")
    (v / ".safeckpt.lock").write_bytes(b"")
    write_expected(v, expected_valid(folder, description="a root of checkpoints: the newest committed step-* "
                                     "folder is read; uncommitted, .tmp-/.trash- and non-folder entries are ignored",
                                     path=".", model=newest, trees={}))


def _future_minor_vector(v: Path) -> None:
    import torch

    model = {"w": torch.arange(3, dtype=torch.int16)}
    folder = save(v, step=4, model=model, config={"k": 1})
    put_file(folder, "future.bin", b"a file a later minor version added\n")
    (folder / "unlisted.txt").write_bytes(b"not in the manifest: ignored\n")
    manifest = read_manifest(folder)
    manifest["format_version"] = "1.9"
    manifest["future_field"] = {"readers": "must ignore unknown fields"}
    write_manifest(folder, manifest)
    write_expected(v, expected_valid(folder, description="a later minor version: unknown manifest field and an "
                                     "unknown listed file (verified, otherwise ignored); an unlisted file",
                                     path=folder.name, model=model, trees={}, config={"k": 1}))


def _foreign_archive_vector(v: Path) -> None:
    import torch

    model = {"u8": torch.tensor([1, 2, 3], dtype=torch.uint8), "f32": torch.tensor([0.5, -1.0]),
             "i64": torch.tensor(9, dtype=torch.int64)}
    folder = save(v, step=6, model=model)
    # Another writer's valid archive: no __metadata__, header unpadded, keys unsorted, data not
    # aligned to the element size. Readers accept it; safeckpt itself never writes one.
    data = bytes([1, 2, 3]) + struct.pack("<2f", 0.5, -1.0) + struct.pack("<q", 9)
    header = {"i64": {"dtype": "I64", "shape": [], "data_offsets": [11, 19]},
              "u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "f32": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    put_file(folder, "model.safetensors", safetensors_bytes(header, data, pad=False))
    write_expected(v, expected_valid(folder, description="a model archive from another writer: no __metadata__, "
                                     "unpadded header, misaligned tensor data", path=folder.name, model=model, trees={}))


def _chunks_vector(v: Path) -> None:
    import torch

    model: dict[str, object] = {"embed.weight": torch.arange(128 * 130, dtype=torch.float32).reshape(128, 130) / 64,
                                "norm.bias": torch.full((130,), -0.5)}
    with small_chunks():
        folder = save(v, step=8, model=model, config={"dim": 130})
    entry = read_manifest(folder)["files"]["model.safetensors"]  # type: ignore[index]
    assert entry["size"] > 65536 and len(entry["chunks"]["sha256"]) == 2, entry
    write_expected(v, expected_valid(folder, description="format 1.1: model.safetensors carries per-chunk digests "
                                     "(two chunks of 65536 bytes, the last one short)", path=folder.name,
                                     model=model, trees={}, config={"dim": 130}))


def generate(out: Path = HERE) -> None:
    """Write valid/ and invalid/ under ``out`` (replacing them)."""
    sys.path.insert(0, str(HERE))
    try:
        import invalid
    finally:
        sys.path.remove(str(HERE))
    for part in ("valid", "invalid"):
        shutil.rmtree(out / part, ignore_errors=True)
    valid_vectors(out)
    with tempfile.TemporaryDirectory() as scratch:
        invalid.invalid_vectors(out / "invalid", Path(scratch), save=save)


def tree_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes (or the target of a symlink) of every vector file under ``root``."""
    out = {}
    for part in ("valid", "invalid"):
        for dirpath, _, names in os.walk(root / part):
            for name in names:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                out[rel] = b"symlink:" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    generate(target)
    files = tree_files(target)
    print(f"wrote {len(files)} files, {sum(map(len, files.values()))} bytes under {target}")


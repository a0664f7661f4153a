"""Regenerate the conformance vectors of the sharded layout (format 1.2, spec/FORMAT.md §18).

    python spec/vectors/generate_sharded.py [OUT]      (default: the folder holding this script)

Writes ``OUT/sharded/valid/<name>/`` and ``OUT/sharded/invalid/<name>/``, each a root holding one
checkpoint folder plus ``expected.json``: ``{"description", "path", "error", "error_file",
"step", "format_version", "world_size", "tensors": {key: TENSOR}, "values": {key: NODE}}``
(TENSOR and NODE as in §16; ``tensors`` are the assembled full tensors). The valid vector is
written by ``safeckpt.distributed.save`` in one process with ``created``/``producer`` pinned, so
regenerating gives the same bytes. Invalid vectors change one thing in ``sharding.json`` (and
re-hash it in the manifest, so only the sharding checks can catch it) or damage a shard.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEP = 7


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("generate", HERE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate", module)
    spec.loader.exec_module(module)
    return module


def state() -> dict[str, object]:
    """Tensors of several dtypes and shapes (an empty one too) and values of every node type."""
    return {
        "model": {
            "embed.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7,
            "norm.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 3, dtype=torch.int64),
        },
        "optimizer": {"param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": ["embed.weight"]}]},
        "meta": {"epoch": 3, "raw": b"\x00\xff", "name": "päd", "none": None, "big": 2**63},
    }


def write_valid(out: Path) -> Path:
    from safeckpt import distributed as sd

    gen = _generator()
    root = out / "valid" / "basic"
    folder = sd.save(state(), root, step=STEP)
    (root / ".safeckpt.lock").unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["created"], manifest["producer"] = gen.CREATED, gen.PRODUCER  # type: ignore[attr-defined]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    sharding = json.loads((folder / "sharding.json").read_text())
    flat: dict[str, object] = {}
    for key, path in sharding["paths"].items():
        node: object = state()
        for part in path:
            node = node[part]  # type: ignore[index]
        flat[key] = node
    expected = {
        "description": "one rank: tensors of four dtypes (an empty one), values of every node type",
        "path": folder.name, "error": None, "error_file": None, "step": STEP, "format_version": "1.2",
        "world_size": 1,
        "tensors": {k: gen.tensor_facts(v) for k, v in sorted(flat.items()) if k in sharding["tensors"]},  # type: ignore[attr-defined]
        "values": {k: gen.canonical(v) for k, v in sorted(flat.items()) if k in sharding["values"]},  # type: ignore[attr-defined]
    }  # fmt: skip
    (root / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    return root


def _rehash(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def _sharding(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        doc = json.loads((folder / "sharding.json").read_text())
        change(doc)
        (folder / "sharding.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        _rehash(folder, "sharding.json")

    return mutate


def _chunk(doc: dict) -> dict:
    return doc["tensors"]["model.embed.weight"]["chunks"][0]  # type: ignore[no-any-return]


def _flip_shard(folder: Path) -> None:
    path = folder / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


INVALID: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "shard-bad-hash": ("a shard's last byte flipped", _flip_shard, "shard-00000.safetensors"),
    "path-escape": ("a chunk's file is '../shard-00000.safetensors'",
                    _sharding(lambda d: _chunk(d).update(file="../shard-00000.safetensors")), "sharding.json"),
    "unlisted-file": ("a chunk names a shard the manifest does not list",
                      _sharding(lambda d: _chunk(d).update(file="shard-00001.safetensors")), "sharding.json"),
    "box-outside": ("a chunk's box runs past the tensor's shape",
                    _sharding(lambda d: _chunk(d).update(offsets=[2, 0])), "sharding.json"),
    "gap": ("a tensor's chunks cover fewer elements than its shape",
            _sharding(lambda d: d["tensors"]["model.embed.weight"].update(shape=[7, 4])), "sharding.json"),
    "overlap": ("two chunks of a tensor overlap",
                _sharding(lambda d: d["tensors"]["model.embed.weight"].update(
                    shape=[9, 4], chunks=[_chunk(d), dict(_chunk(d), offsets=[3, 0], sizes=[3, 4], name="x")])),
                "sharding.json"),
    "bad-path": ("a path does not spell its key",
                 _sharding(lambda d: d["paths"].update({"meta.epoch": ["meta", "epochs"]})), "sharding.json"),
    "chunk-dtype": ("a tensor's dtype differs from its chunk's in the shard",
                    _sharding(lambda d: d["tensors"]["model.embed.weight"].update(dtype="F64")),
                    "shard-00000.safetensors"),
}  # fmt: skip


def main(out: Path) -> None:
    target = out / "sharded"
    shutil.rmtree(target, ignore_errors=True)
    valid = write_valid(target)
    for name, (description, mutate, error_file) in INVALID.items():
        root = target / "invalid" / name
        shutil.copytree(valid, root)
        expected = json.loads((root / "expected.json").read_text())
        mutate(root / expected["path"])
        expected.update(description=description, error="CheckpointCorruptedError", error_file=error_file)
        (root / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)

"""Helpers shared by the fault, corruption and hostile-input tests (not fixtures: plain functions)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from safeckpt.format.layout import LOCK_NAME


def replace_file(folder: Path, name: str, data: bytes, *, fix_hash: bool = True) -> None:
    """Write ``data`` as ``folder/name``; with ``fix_hash`` record its size and SHA-256 in the
    manifest so verification passes and the parsers see the bytes."""
    (folder / name).write_bytes(data)
    if fix_hash and name != "manifest.json":
        manifest = json.loads((folder / "manifest.json").read_bytes())
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def flip_bits(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` (negative: from the end) of the file with ``mask``, in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def edit_manifest(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / "manifest.json").read_bytes())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def safetensors_bytes(header: dict[str, object] | bytes, body: bytes = b"", *, length: int | None = None) -> bytes:
    """An archive from a header (dict or raw JSON bytes) and data; ``length`` overrides the prefix."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def leftovers(root: Path) -> list[str]:
    """Hidden entries a save may leave behind (temporary and trash folders), lock file excepted."""
    return sorted(n for n in os.listdir(root) if n.startswith(".") and n != LOCK_NAME)


def fingerprint(value: object) -> object:
    """A comparable, bit-exact rendering of a state tree (tensor bytes, dtypes, container types)."""
    if isinstance(value, torch.Tensor):
        # A fresh tensor has standard strides (contiguous() keeps odd strides of size-1 dims).
        flat = torch.empty(value.shape, dtype=value.dtype).copy_(value.detach()).reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(data).hexdigest())
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return ("dict", [(fingerprint(k), fingerprint(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [fingerprint(v) for v in value])
    return (type(value).__name__, value)


def state_fingerprint(model_state: object, optimizer_state: object = None, extra: object = None) -> object:
    """Fingerprint of what a save stored (or a load returned), keyed so dict order does not matter
    for the model state dict."""
    model = dict(sorted(model_state.items())) if isinstance(model_state, dict) else model_state
    return fingerprint({"model": model, "optimizer": optimizer_state, "extra": extra})


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a dedented snippet in a new interpreter in ``cwd`` that can import the test helpers
    (for what may kill the process: signals, SIGBUS, os._exit)."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def state_difference(a: object, b: object, where: str = "state") -> str | None:
    """Where two state trees first differ (None if bit-identical): types, dict keys in order,
    lengths, tensor dtype/shape/bytes, scalars (NaN equals NaN). Modules and optimizers are
    compared by their full ``state_dict()`` (an optimizer's ``param_groups`` included)."""
    if hasattr(a, "state_dict") and hasattr(b, "state_dict"):
        return state_difference(a.state_dict(), b.state_dict(), where)  # type: ignore[attr-defined]
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        bits_a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8) if a.numel() else a
        bits_b = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8) if b.numel() else b
        return None if torch.equal(bits_a, bits_b) else f"{where}: tensor values differ"
    if isinstance(a, dict):
        assert isinstance(b, dict)
        if list(a) != list(b):
            return f"{where}: keys {list(a)} != {list(b)}"
        return next((d for k in a if (d := state_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True)) if (d := state_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b or (a != a and b != b) else f"{where}: {a!r} != {b!r}"


def assert_same_state(a: object, b: object) -> None:
    """Fail with the first difference unless ``a`` and ``b`` are bit-identical state (see
    :func:`state_difference`)."""
    difference = state_difference(a, b)
    assert difference is None, difference


def same_state(a: object, b: object) -> bool:
    """True if ``a`` and ``b`` are bit-identical state (see :func:`state_difference`)."""
    return state_difference(a, b) is None

"""Coverage-guided fuzzing of the checkpoint loader with atheris (libFuzzer for Python).

Each input replaces one file of a small valid checkpoint: the first byte picks the file, the rest
is its new content. For every file but ``manifest.json`` the manifest is rewritten with the new
size and SHA-256, so verification passes and the parsers (safetensors header, msgpack, JSON,
structure trees, RNG and optimizer restore) see the bytes. The loader must either succeed or
raise a ``CheckpointError``; any other exception, a crash, a hang (``-timeout``) or a memory
blow-up (``-rss_limit_mb``) is a finding. See ``fuzz/README.md``.

Usage::

    python fuzz/fuzz_loader.py --make-corpus fuzz/corpus      # seed inputs from a real checkpoint
    python fuzz/fuzz_loader.py fuzz/corpus -atheris_runs=1000000 -rss_limit_mb=2048 -timeout=10
    python fuzz/fuzz_loader.py --replay DIR_OR_FILE...        # rerun saved inputs, no atheris needed
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

try:
    import atheris
except ImportError:  # --make-corpus and --replay work without it
    atheris = None

if atheris is not None:
    # Everything a load runs must be imported here to be instrumented (safeckpt loads lazily).
    with atheris.instrument_imports(include=["safeckpt", "msgpack"]):
        import safeckpt
        import safeckpt.pipeline.read
        import safeckpt.torch.loader
else:
    import safeckpt
    import safeckpt.torch.loader
import torch

FILES = (
    "model.safetensors", "optimizer.safetensors", "optimizer.msgpack", "scheduler.safetensors",
    "scheduler.msgpack", "extra.safetensors", "extra.msgpack", "rng.safetensors", "rng.msgpack",
    "config.json", "vocab.json", "manifest.json",
)  # fmt: skip


class _Target:
    """A small checkpoint on a RAM-backed folder and the objects it is loaded into."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = Path(tempfile.mkdtemp(prefix="safeckpt-fuzz-", dir=base))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)
        self.model(torch.tensor([1, 2])).sum().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.folder = safeckpt.save_checkpoint(
            self.model, self.optimizer, {"lr": 0.01, "name": "fuzz"}, [chr(97 + i) for i in range(11)], 1,
            directory=self.root, scheduler=self.scheduler,
            extra={"loader": {"epoch": 1, "order": (3, 1, 2)}, "mask": torch.tensor([True, False])},
        )  # fmt: skip
        self.pristine = {name: (self.folder / name).read_bytes() for name in FILES}
        self.manifest = json.loads(self.pristine["manifest.json"])

    def run(self, data: bytes) -> None:
        if not data:
            return
        name = FILES[data[0] % len(FILES)]
        content = data[1:]
        for other, pristine in self.pristine.items():  # undo the previous input
            (self.folder / other).write_bytes(pristine)
        (self.folder / name).write_bytes(content)
        if name != "manifest.json":
            manifest = json.loads(json.dumps(self.manifest))
            manifest["files"][name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
            (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            safeckpt.load_checkpoint(
                self.folder, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
        except safeckpt.CheckpointError:
            pass

    def corpus(self) -> dict[str, bytes]:
        return {name: bytes([i]) + self.pristine[name] for i, name in enumerate(FILES)}


_target: _Target | None = None


def TestOneInput(data: bytes) -> None:  # the name atheris conventionally uses
    global _target
    if _target is None:
        _target = _Target()
    _target.run(data)


def main(argv: list[str]) -> int:
    if len(argv) > 2 and argv[1] == "--make-corpus":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, data in _Target().corpus().items():
            (out / name).write_bytes(data)
        print(f"wrote {len(FILES)} seed inputs to {out}")
        return 0
    if len(argv) > 1 and argv[1] == "--replay":
        paths = [p for arg in argv[2:] for p in (sorted(Path(arg).iterdir()) if Path(arg).is_dir() else [Path(arg)])]
        for path in paths:
            TestOneInput(path.read_bytes())
        print(f"replayed {len(paths)} inputs without a finding")
        return 0
    if atheris is None:
        print("atheris is not installed: pip install 'safeckpt[fuzz]' (or --replay without it)", file=sys.stderr)
        return 2
    # libFuzzer's -timeout arms a SIGALRM timer that keeps firing after "Done N", while the
    # interpreter shuts down with the signal's default action (terminate): ignore it from then on.
    atexit.register(signal.signal, signal.SIGALRM, signal.SIG_IGN)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

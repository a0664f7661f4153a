"""Mutation sweep over a small checkpoint, run by ``test_corruption.py`` in a child process.

Every case changes one byte of one file (or truncates it), rewrites ``manifest.json`` with the
file's new size and SHA-256 so that verification passes and the parsers see the damage, then
loads the checkpoint into a model, an optimizer and a scheduler with RNG restore. A case passes
if the load succeeds or raises a ``CheckpointError``; any other exception, a hang past the
per-case alarm or a crash is a failure. The process runs under ``RLIMIT_AS`` so a parser that
tries to allocate too much fails here instead of on a user's machine.

Usage: ``python corruption_sweep.py FOLDER MAX_CASES MEMORY_BYTES`` prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import signal
import struct
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

CASE_SECONDS = 10


class Hang(Exception):
    """Raised by the alarm: a case ran past ``CASE_SECONDS``."""


def structural_length(name: str, data: bytes) -> int:
    """Bytes of ``data`` a parser interprets (the header of an archive, all of a document)."""
    if name.endswith(".safetensors") and len(data) >= 8:
        return min(len(data), 8 + struct.unpack_from("<Q", data)[0])
    return len(data)


def cases(files: dict[str, bytes], budget: int, seed: int = 0) -> Iterator[tuple[str, str, int, int]]:
    """(file, kind, position, value) for every byte change and truncation, thinned to ``budget``."""
    rng = random.Random(seed)
    changes, truncations = [], []
    for name, data in files.items():
        head = structural_length(name, data)
        positions = list(range(head)) + list(range(head, len(data), 61))
        for pos in positions:
            old = data[pos]
            value = rng.choice([old ^ 0xFF, old ^ 0x01, old ^ 0x80, 0x00, 0xFF, (old + 1) % 256, rng.randrange(256)])
            if value == old:
                value = old ^ 0x20
            changes.append((name, "byte", pos, value))
        truncations += [(name, "truncate", n, 0) for n in range(0, len(data))]
    rng.shuffle(truncations)
    keep_truncations = truncations[: max(budget // 5, 1)]
    if len(changes) > budget - len(keep_truncations):
        changes = rng.sample(changes, budget - len(keep_truncations))
    yield from changes
    yield from keep_truncations


def main() -> None:
    folder, max_cases, memory = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    import torch

    import safeckpt

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TinyLM

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"case ran over {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, on_alarm)
    manifest_path = folder / "manifest.json"
    original_manifest = json.loads(manifest_path.read_bytes())
    files = {name: (folder / name).read_bytes() for name in original_manifest["files"]}
    files["manifest.json"] = manifest_path.read_bytes()
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)

    def write(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        if name != "manifest.json":
            doc = json.loads(json.dumps(original_manifest))
            doc["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            manifest_path.write_text(json.dumps(doc, indent=1))

    done, clean, loaded, failures, slowest = 0, 0, 0, [], 0.0
    for name, kind, pos, value in cases(files, max_cases):
        data = files[name]
        mutated = data[:pos] if kind == "truncate" else data[:pos] + bytes([value]) + data[pos + 1 :]
        write(name, mutated)
        started = time.monotonic()
        signal.alarm(CASE_SECONDS)
        try:
            safeckpt.load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler)
            loaded += 1
        except safeckpt.CheckpointError:
            clean += 1
        except BaseException as exc:  # the finding: report it, keep sweeping
            failures.append(
                {"file": name, "kind": kind, "position": pos, "value": value,
                 "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                 "where": traceback.format_exc(limit=-3)[-900:]}
            )
        finally:
            signal.alarm(0)
        slowest = max(slowest, time.monotonic() - started)
        write(name, data)
        done += 1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"cases": done, "clean_errors": clean, "loaded": loaded, "failures": failures,
                      "slowest_case_s": round(slowest, 3), "max_rss_bytes": rss}))  # fmt: skip


if __name__ == "__main__":
    main()

"""Where does a safeckpt save or load spend its time? Stage timings for one model+AdamW state.

Run: ``.venv/bin/python benchmarks/profile_safeckpt.py --mb 1000``. Prints the time of each
stage (planning, writing and hashing each file, committing; reading and hashing each file,
building tensors, restoring into the model and optimizer) next to the raw floors of this
machine (SHA-256 per core, memcpy, page-cache write, fsync), so the slow stage is obvious.
This is a diagnostic, not the comparison benchmark (see ``compare_formats.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import build_state

import safeckpt


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of fresh memory, so the host backs it (see benchmarks/README.md)."""
    if nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8).fill_(0)


def floors(nbytes: int, folder: Path) -> None:
    data = bytearray(os.urandom(1 << 20)) * max(1, nbytes >> 20)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    sha = len(data) / (time.perf_counter() - t)
    src = torch.frombuffer(data, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    dst.copy_(src)
    memcpy = len(data) / (time.perf_counter() - t)
    path = folder / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    t = time.perf_counter()
    os.write(fd, data)
    write = len(data) / (time.perf_counter() - t)
    t = time.perf_counter()
    os.fsync(fd)
    fsync = time.perf_counter() - t
    os.close(fd)
    path.unlink()
    print(
        f"floors: sha256 {sha / 1e9:.2f} GB/s/core, memcpy {memcpy / 1e9:.1f} GB/s, "
        f"page-cache write {write / 1e9:.2f} GB/s, fsync of {len(data) >> 20} MiB {fsync:.3f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=1000, help="approximate state size in MB")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of save and load")
    parser.add_argument("--warm-gb", type=float, default=3.0, help="memory to pre-touch before each stage")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safeckpt-profile-", dir=args.dir))
    try:
        model, optimizer, state_bytes = build_state(args.mb * 1_000_000)
        print(f"state: {state_bytes / 1e6:.0f} MB, baseline RSS {_rss_mb():.0f} MB")
        floors(min(state_bytes, 512 << 20), root)

        from safeckpt.torch import plan as planning
        from safeckpt.torch import saver

        warm = int(args.warm_gb * 1e9)
        warm_memory(warm)
        t0 = time.perf_counter()
        plan = planning.plan_checkpoint(model, optimizer, None, None, 1)
        t1 = time.perf_counter()
        print(f"save: plan {t1 - t0:.3f}s")
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        t1 = time.perf_counter()
        path = saver.write_checkpoint(plan, root / "ck")
        t2 = time.perf_counter()
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
        total = sum(f.stat().st_size for f in path.iterdir())
        print(f"save: write+hash+fsync+commit {t2 - t1:.3f}s ({total / (t2 - t1) / 1e9:.2f} GB/s), peak RSS {_rss_mb():.0f} MB")

        for label in ("first", "second"):
            warm_memory(warm)
            t0 = time.perf_counter()
            pending = safeckpt.save_checkpoint(model, optimizer, None, None, 2, directory=root / label, async_=True)
            t1 = time.perf_counter()
            pending.wait()
            print(f"save: async ({label} of the process) blocks {t1 - t0:.3f}s, commits after {time.perf_counter() - t0:.3f}s")

        from safeckpt.torch import loader

        warm_memory(warm)
        t0 = time.perf_counter()
        _, buffers = loader.read_checkpoint_files(path, verify=True)
        t1 = time.perf_counter()
        del buffers
        print(f"load: read and hash every file {t1 - t0:.3f}s ({total / (t1 - t0) / 1e9:.2f} GB/s)")
        for verify, with_optimizer in ((True, True), (False, True), (False, False)):
            fresh_model, fresh_opt, _ = build_state(args.mb * 1_000_000, init_optimizer=False)
            warm_memory(warm)
            profiler = cProfile.Profile() if args.profile and verify else None
            if profiler:
                profiler.enable()
            t0 = time.perf_counter()
            safeckpt.load_checkpoint(
                path, model=fresh_model, optimizer=fresh_opt if with_optimizer else None, verify=verify, restore_rng=False
            )
            t1 = time.perf_counter()
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            what = "model+optimizer" if with_optimizer else "model only"
            print(f"load: load_checkpoint(verify={verify}) into {what} {t1 - t0:.3f}s, peak RSS {_rss_mb():.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

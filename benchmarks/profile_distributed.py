"""Where does a sharded load spend its time, per rank and per phase? ``dcp.load`` against safeckpt.

A diagnostic for the ``load`` row of ``distributed.py`` (not a comparison benchmark): the same
FSDP2 + AdamW state on 2 gloo ranks, saved once by each method, then loaded ``--repeats`` times
by each, in turn, with the files in the page cache. For each load and each rank it reports the
wall time, the CPU time of the whole process (all threads) and of the calling thread, page
faults and context switches, for the whole load and for each storage-reader call DCP makes
(``read_metadata``, ``prepare_local_plan``, ``read_data``) and, inside safeckpt's
``prepare_local_plan``, for ``VerifiedFiles`` (read + SHA-256 of the files it needs). CPU
times do not depend on what else runs on the machine, so they compare methods on a busy one.

Each rank also prints the shard files its load read. ``--alone`` also verifies each rank's files (``VerifiedFiles``) while the other rank waits at a
barrier (is a rank slower inside the job than alone?). ``--profile`` writes a cProfile of each
rank's last safeckpt load (``--out``/profile-rank{N}.txt and .prof; cProfile counts wall time,
so on a busy machine read it for call counts and structure, not for seconds).

Run: ``python benchmarks/profile_distributed.py --mb 1000 --repeats 3 [--alone] [--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


class Meter:
    """Wall, process CPU, thread CPU, minor page faults and context switches of named phases,
    summed over the calls in each round (a phase may run several times in one load)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, float]]] = {}
        self.round = 0
        self.open: list[str] = []
        """Phases now running, innermost last (names the garbage collections inside them)."""

    @staticmethod
    def _now() -> tuple[float, ...]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        thread = resource.getrusage(resource.RUSAGE_THREAD)
        return (
            time.perf_counter(), me.ru_utime + me.ru_stime, thread.ru_utime + thread.ru_stime,
            me.ru_minflt, me.ru_nvcsw, me.ru_nivcsw,
        )  # fmt: skip

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        self.open.append(name)
        try:
            yield
        finally:
            self.open.pop()
            end = self._now()
            keys = ("wall", "cpu", "thread_cpu", "minflt", "vcsw", "ivcsw")
            rounds = self.rows.setdefault(name, [])
            while len(rounds) <= self.round:
                rounds.append(dict.fromkeys(keys, 0.0))
            for key, a, b in zip(keys, start, end, strict=True):
                rounds[self.round][key] += b - a

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Time every call of ``owner.attr`` as phase ``name``."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    def wrap_everywhere(self, function: Callable[..., Any], name: str) -> None:
        """Time every call of ``function`` as phase ``name``, wherever safeckpt imported it."""

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        _replace_everywhere(function, timed)


def _replace_everywhere(function: Callable[..., Any], replacement: Callable[..., Any]) -> None:
    """Rebind every safeckpt module's name for ``function`` (``from x import f`` copies it)."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("safeckpt"):
            for attr, value in list(vars(module).items()):
                if value is function:
                    setattr(module, attr, replacement)


def _warm(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as file:
                while file.read(8 << 20):
                    pass


def _rank(rank: int, world: int, init: str, work: str, args: argparse.Namespace, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem
    from workload import sharded_state

    from safeckpt import distributed as sd
    from safeckpt.distributed import reader as safe_reader
    from safeckpt.storage import posix_stream

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    if args.threads:
        torch.set_num_threads(args.threads)
    state = sharded_state(args.mb, world)
    root = Path(work)
    plain, safe = root / "dcp", root / "safeckpt"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(plain)))
    sd.save(state, safe, step=1)
    dist.barrier()

    meter = Meter()
    for cls, tag in ((filesystem.FileSystemReader, "dcp"), (safe_reader.Reader, "safeckpt")):
        for attr in ("read_metadata", "prepare_local_plan", "read_data"):
            meter.wrap(cls, attr, f"{tag} {attr}")
    seen: dict[str, Any] = {}

    verified_files = posix_stream.VerifiedFiles.__init__

    def recording(self: Any, dir_fd: int, entries: Any, **kwargs: Any) -> None:
        entries = list(entries)
        if any(e.name.endswith(".safetensors") for e in entries):
            seen.update(entries=entries, folder=kwargs["folder"])
        verified_files(self, dir_fd, entries, **kwargs)

    posix_stream.VerifiedFiles.__init__ = recording  # type: ignore[method-assign]
    meter.wrap(posix_stream.VerifiedFiles, "__init__", "safeckpt   open_verified (read + sha256)")
    profiler = cProfile.Profile() if args.profile else None
    collecting: list[contextlib.AbstractContextManager[None]] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:  # time in the cyclic garbage collector
        if phase == "start":
            inside = meter.open[-1] if meter.open else "outside the loads"
            collecting.append(meter.phase(f"gc, generation {info['generation']}, in {inside}"))
            collecting[-1].__enter__()
        elif collecting:
            collecting.pop().__exit__(None, None, None)

    gc.callbacks.append(on_gc)

    def load(tag: str, run: Callable[[], None], last: bool) -> None:
        if not args.keep_gc_debt:
            gc.collect()  # as distributed.py does: no full collection owed by the other method
        dist.barrier()
        with meter.phase(f"{tag} load (total)"):
            if profiler is not None and last and tag == "safeckpt":
                profiler.enable()
            run()
            if profiler is not None and last and tag == "safeckpt":
                profiler.disable()

    for round_ in range(args.repeats):
        last = round_ == args.repeats - 1
        meter.round = round_
        _warm(plain)
        load("dcp", lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(str(plain))), last)
        _warm(safe)
        load("safeckpt", lambda: sd.load(state, safe), last)

    if args.alone:  # the files this rank's last load read, now read with the other rank idle
        entries, folder = seen["entries"], seen["folder"]
        for round_ in range(args.repeats):
            meter.round = round_
            for turn in range(world):
                dist.barrier()
                if turn == rank:
                    _warm(folder)
                    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        with meter.phase("alone open_verified (read + sha256)"):
                            posix_stream.VerifiedFiles(dir_fd, entries, folder=folder).close()
                    finally:
                        os.close(dir_fd)

    rows = meter.rows
    if seen:  # which shard files this rank had to read (and hash) for its part of the state
        print(f"rank {rank} read: " + ", ".join(f"{e.name} ({e.size / 1e6:.0f} MB)" for e in seen["entries"]), flush=True)
    rows["_info"] = [{"torch_threads": float(torch.get_num_threads())}]
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        Path(args.out or out).mkdir(parents=True, exist_ok=True)
        Path(args.out or out, f"profile-rank{rank}.txt").write_text(text.getvalue())
        profiler.dump_stats(Path(args.out or out, f"profile-rank{rank}.prof"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each rank (0: leave)")
    parser.add_argument("--alone", action="store_true")
    parser.add_argument("--keep-gc-debt", action="store_true", help="no gc.collect() before each load")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the cProfile reports")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        mp.spawn(_rank, args=(2, str(Path(tmp) / "init"), str(work), args, tmp), nprocs=2)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    print(f"torch threads per rank: {ranks[0]['_info'][0]['torch_threads']:.0f}; medians over {args.repeats} loads")
    print(f"{'phase':45s} {'rank':>4s} {'wall s':>7s} {'cpu s':>7s} {'thr cpu':>7s} {'minflt':>8s} {'vcsw':>6s} {'ivcsw':>6s}")
    for name in sorted(k for k in ranks[0] if not k.startswith("_")):
        for r, rows in enumerate(ranks):
            samples = rows.get(name, [])
            if not samples:
                continue
            med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            print(
                f"{name:45s} {r:4d} {med['wall']:7.3f} {med['cpu']:7.3f} {med['thread_cpu']:7.3f} "
                f"{med['minflt']:8.0f} {med['vcsw']:6.0f} {med['ivcsw']:6.0f}"
            )


if __name__ == "__main__":
    main()

"""Sharded saves and loads on 2 ranks: safeckpt's DCP backend against DCP's own file system one.

An FSDP2 model (``workload.py``'s transformer-shaped stack, each block ``fully_shard``-ed) and
its AdamW, ~1 GB of state in total, on 2 gloo ranks on this machine's CPUs. Measured (seconds,
the slower rank's time, each method in turn, ``--repeats`` rounds):

- save: ``dcp.save`` + ``FileSystemWriter`` (fsyncs, hashes nothing, writes in place) against
  ``safeckpt.distributed.save`` (hashes while writing, manifest last, atomic commit);
- load: ``dcp.load`` + ``FileSystemReader`` (verifies nothing) against
  ``safeckpt.distributed.load`` (every file read is SHA-256 verified first); files cached;
- async: the time ``dcp.async_save`` and ``safeckpt.distributed.async_save`` block the caller,
  against the blocking ``dcp.save``.

Run: ``python benchmarks/distributed.py [--mb 1000] [--repeats 2] [--dir /tmp]``. Prints a
table and writes it into ``RESULTS.md`` between the ``distributed`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- distributed:begin -->", "<!-- distributed:end -->"


def _timed(run: object, *, peak: list[float] | None = None) -> float:
    """Seconds ``run()`` took on the slowest rank (barriers around it); with ``peak``, also
    appends the largest rise of a rank's peak RSS during it, in MB (VmHWM, reset first).

    Python's garbage collector is run first, on every rank: a full collection (~0.2 s here, with
    ~300k objects alive in each rank) falls due about once every three loads of either method,
    and otherwise lands in whichever operation happens to tip it, which in this fixed order was
    always the same one. Collected first, each operation pays only for the collections its own
    allocations cause."""
    from _measure import _reset_peak, _status  # (benchmarks/ is on sys.path in the ranks)

    gc.collect()
    before = _status("VmHWM") if peak is not None and _reset_peak() else None
    dist.barrier()
    start = time.perf_counter()
    run()  # type: ignore[operator]
    if peak is not None:
        rise = torch.tensor([(_status("VmHWM") - before) / 1e6 if before is not None else float("nan")], dtype=torch.float64)
        dist.all_reduce(rise, op=dist.ReduceOp.MAX)
        peak.append(float(rise.item()))
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.item())


def _warm(folder: Path) -> None:
    """Read every file under ``folder`` once, so the timed load finds it in the page cache (the
    other method's files, read in between, may have pushed it out)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as file:
                while file.read(8 << 20):
                    pass


def _rank(rank: int, world: int, init: str, work: str, mb: int, repeats: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch.distributed.checkpoint as dcp
    from workload import sharded_state

    from safeckpt import distributed as sd

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    state = sharded_state(mb, world)
    model_sd, optim_sd = state["model"], state["optim"]
    local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in model_sd.values())
    local += sum(
        v.to_local().nbytes if hasattr(v, "to_local") else v.nbytes
        for s in optim_sd["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    )  # fmt: skip
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)

    rows: dict[str, list[float]] = {}
    root = Path(work)
    for round_ in range(repeats):
        plain, safe = root / f"dcp-{round_}", root / f"safeckpt-{round_}"
        rows.setdefault("save dcp", []).append(
            _timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(plain))))
        )
        rows.setdefault("save safeckpt", []).append(_timed(lambda: sd.save(state, safe, step=1)))
        _warm(plain)
        rows.setdefault("load dcp", []).append(
            _timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(str(plain))), peak=rows.setdefault("peak dcp", []))
        )
        _warm(safe)
        rows.setdefault("load safeckpt", []).append(_timed(lambda: sd.load(state, safe), peak=rows.setdefault("peak safeckpt", [])))
        pending: list[object] = []
        rows.setdefault("async dcp (blocks)", []).append(
            _timed(lambda: pending.append(dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(plain) + "-a"))))
        )
        pending.pop().result()  # type: ignore[attr-defined]
        rows.setdefault("async safeckpt (blocks)", []).append(
            _timed(lambda: pending.append(sd.async_save(state, safe.parent / f"{safe.name}-a", step=1)))
        )
        pending.pop().wait()  # type: ignore[attr-defined]
        dist.barrier()
        if rank == 0:
            for path in root.iterdir():
                shutil.rmtree(path, ignore_errors=True)
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "state_bytes": int(total.item())}))
    dist.barrier()
    dist.destroy_process_group()


def _table(result: dict[str, object], mb: int, repeats: int, took: float) -> str:
    rows: dict[str, list[float]] = result["rows"]  # type: ignore[assignment]
    med = {name: statistics.median(values) for name, values in rows.items()}
    lines = [
        f"## Sharded: FSDP2 + AdamW on 2 ranks (state {result['state_bytes'] / 1e6:.0f} MB)",
        "",
        f"Command: `python benchmarks/distributed.py --mb {mb} --repeats {repeats}` ({took:.0f} s). "
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo; "
        f"load average after: {os.getloadavg()[0]:.2f} (the machine is shared).",
        "",
        "Median [min–max] of the slower rank's time over the rounds; each load right after reading "
        "its files once (page cache warm for both); dcp = `FileSystemWriter`/`FileSystemReader` (fsync, no hashes, no atomic commit).",
        "",
        "| Operation | dcp (s) | safeckpt (s) | safeckpt ÷ dcp |",
        "|---|---|---|---|",
    ]

    def cell(name: str) -> str:
        values = rows[name]
        return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"

    for label, a, b in (
        ("save (hashed, durable, atomic)", "save dcp", "save safeckpt"),
        ("load (safeckpt verifies every file read)", "load dcp", "load safeckpt"),
        ("async save: time the caller is blocked", "async dcp (blocks)", "async safeckpt (blocks)"),
    ):
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | {med[b] / med[a]:.2f}× |")
    lines.append(f"| load: peak RSS rise of a rank (MB) | {med['peak dcp']:.0f} | {med['peak safeckpt']:.0f} | |")
    ratio = med["async safeckpt (blocks)"] / med["save dcp"]
    lines += ["", f"Blocking time of `safeckpt.distributed.async_save` ÷ blocking `dcp.save`: {ratio:.2f}×.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000, help="total state (parameters + AdamW moments), MB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        out = Path(tmp) / "result.json"
        mp.spawn(_rank, args=(2, str(Path(tmp) / "init"), str(work), args.mb, args.repeats, str(out)), nprocs=2)
        result = json.loads(out.read_text())
    table = _table(result, args.mb, args.repeats, time.perf_counter() - started)
    print(table)
    if not args.no_write:
        path = HERE / "RESULTS.md"
        text = path.read_text() if path.exists() else ""
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()

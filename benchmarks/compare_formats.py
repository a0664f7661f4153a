"""Compare safeckpt with torch.save/torch.load, safetensors and torch.distributed.checkpoint.

Each measurement runs in a new process (``_measure.py``, forked from a server that imported
everything once, so no measurement pays for imports), is repeated (3 times by default,
round-robin over the methods so that a noisy moment does not hit one method only), and is
reported as median [min-max]. Writes ``RESULTS.md``, ``results.json`` and ``results.png`` next
to this script (or ``--out``). See README.md for what is measured and how to read it.

    python benchmarks/compare_formats.py              # 10 MB, 100 MB, 1 GB (make bench)
    python benchmarks/compare_formats.py --quick      # 10 MB and 100 MB, warm cache only
    python benchmarks/compare_formats.py --large      # adds 4 GB
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_chart, write_markdown  # noqa: E402

SIZES = {"10MB": 10_000_000, "100MB": 100_000_000, "1GB": 1_000_000_000, "4GB": 4_000_000_000}
SAVES = [
    "torch.save", "torch.save+fsync", "safetensors (weights)", "dcp.save",
    "safeckpt", "safeckpt async", "safeckpt (weights)", "safeckpt +chunks",
]  # fmt: skip
LOADS = {
    "torch.load": "torch.save",
    "safetensors (weights)": "safetensors (weights)",
    "dcp.load": "dcp.save",
    "safeckpt verified": "safeckpt",
    "safeckpt unverified": "safeckpt",
    "safeckpt weights unverified": "safeckpt",
    "safeckpt (weights) unverified": "safeckpt (weights)",
    "safeckpt (weights) verified": "safeckpt (weights)",
    "safeckpt verified +chunks": "safeckpt +chunks",
}
"""Each load and the save that prepares the files it reads."""
COLD = {"torch.load", "safetensors (weights)", "dcp.load", "safeckpt verified", "safeckpt unverified",
        "safeckpt (weights) unverified", "safeckpt verified +chunks"}  # fmt: skip
"""Loads also measured with the files evicted from the page cache (the rest add nothing new)."""


def _run_child(conn: Connection, args: tuple[object, ...]) -> None:
    import _measure

    try:
        conn.send(("ok", _measure.measure(*args)))  # type: ignore[arg-type]
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Children:
    """Starts each measurement in a new process, forked from a server that imported torch,
    safeckpt, safetensors and torch.distributed.checkpoint once."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["_measure"])
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), *sys.path) if p)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before

    def run(self, *args: object, timeout: float) -> dict[str, object]:
        parent, child = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_run_child, args=(child, args))
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            raise RuntimeError(f"{args}: no result within {timeout:.0f} s")
        try:
            status, value = parent.recv()
        except EOFError:
            status, value = "error", "the process died without a result"
        process.join(30)
        if status != "ok" and process.exitcode:
            value = f"exit code {process.exitcode}: {value}"
        if status != "ok":
            raise RuntimeError(f"{args} failed: {value}")
        result: dict[str, object] = value
        return result


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def drop_cache(path: Path) -> None:
    """Write back, then evict every file under ``path`` from the page cache (cold reads)."""
    os.sync()
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fill_cache(path: Path) -> None:
    """Read every file under ``path`` once so that it is in the page cache (cached reads)."""
    for p in files_under(path):
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def record(rows: dict[tuple[str, ...], dict[str, list[float]]], key: tuple[str, ...], result: dict[str, object]) -> None:
    row = rows.setdefault(key, {})
    for name, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row.setdefault(name, []).append(float(value))
    if "peak_rss" in result and "baseline_rss" in result:
        row.setdefault("rss_delta", []).append(float(result["peak_rss"]) - float(result["baseline_rss"]))  # type: ignore[arg-type]


def rewrite_report(out: Path) -> None:
    """Regenerate RESULTS.md and results.png from results.json (after editing report.py)."""
    data = json.loads((out / "results.json").read_text())
    write_markdown(out / "RESULTS.md", data["meta"], data["results"])
    write_chart(out / "results.png", data["meta"], data["results"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--large", action="store_true", help="also measure 4 GB (needs ~16 GB RAM, ~12 GB disk)")
    parser.add_argument("--quick", action="store_true", help="10 MB and 100 MB, cached reads only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="cached,cold", help="page-cache state for loads: cached, cold or both")
    parser.add_argument("--cold-all", action="store_true", help="cold loads below 1 GB too (default: 1 GB and up)")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a new folder under $TMPDIR)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md, results.json, results.png")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and results.png from results.json")
    args = parser.parse_args()
    if args.report_only:
        rewrite_report(args.out)
        return
    sizes = ["10MB", "100MB"] if args.quick else args.sizes.split(",")
    if args.large and "4GB" not in sizes:
        sizes.append("4GB")
    caches = ["cached"] if args.quick else args.cache.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="safeckpt-bench-", dir=args.dir))
    need = 4 * max(SIZES[s] for s in sizes)
    free = shutil.disk_usage(scratch).free
    if free < need:
        sys.exit(f"{scratch}: {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB")
    started = time.time()
    load_before = os.getloadavg()
    rows: dict[tuple[str, ...], dict[str, list[float]]] = {}
    children = Children()
    fingerprints: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.repeats):
            record(rows, ("floor",), children.run("floor", timeout=120))
        for size_name in sizes:
            size = SIZES[size_name]
            timeout = 120 + size / 5e6
            print(f"[{time.time() - started:6.0f}s] {size_name}: saves", flush=True)
            for _ in range(args.repeats):
                for phase in ("first", "steady"):
                    for kind in SAVES:
                        path = scratch / "save"
                        path.mkdir()
                        result = children.run("save", kind, size, path, 2.5, phase == "steady", timeout=timeout)
                        shutil.rmtree(path)  # unlinking also discards dirty pages: no writeback leaks into the next
                        record(rows, (size_name, f"save-{phase}", kind), result)
            print(f"[{time.time() - started:6.0f}s] {size_name}: loads", flush=True)
            artifacts: dict[str, Path] = {}
            for source in dict.fromkeys(LOADS.values()):
                path = scratch / f"artifact-{len(artifacts)}"
                path.mkdir()
                result = children.run("prepare", source, size, path, timeout=timeout)
                fingerprints[(size_name, source)] = result["fingerprint"]  # type: ignore[assignment]
                artifacts[source] = path
            for cache in caches:
                if cache == "cold" and size < 1e9 and not args.cold_all:
                    continue  # small files come back from the host's cache at once: nothing to see
                for _ in range(args.repeats):
                    for kind, source in LOADS.items():
                        if cache == "cold" and kind not in COLD:
                            continue
                        path = artifacts[source]
                        drop_cache(path) if cache == "cold" else fill_cache(path)
                        result = children.run("load", kind, size, path, timeout=timeout)
                        expected = fingerprints[(size_name, source)]
                        got = result["fingerprint"]
                        count = 2 if "weights" in kind else 3
                        if got[:count] != expected[:count]:  # type: ignore[index]
                            raise RuntimeError(f"{kind} ({size_name}) did not restore the saved state: {got} != {expected}")
                        record(rows, (size_name, f"load-{cache}", kind), result)
            for path in artifacts.values():
                shutil.rmtree(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {" / ".join(k): {m: summarize(v) for m, v in metrics.items()} for k, metrics in rows.items()}
    meta = {
        "command": " ".join(["python", "benchmarks/compare_formats.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "python": platform.python_version(),
        "versions": _versions(),
        "load_average": [load_before, os.getloadavg()],
        "wall_seconds": time.time() - started,
        "sizes": sizes,
        "caches": caches,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": summary}, indent=1) + "\n")
    write_markdown(args.out / "RESULTS.md", meta, summary)
    write_chart(args.out / "results.png", meta, summary)
    print((args.out / "RESULTS.md").read_text())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "safetensors", "safeckpt")}


if __name__ == "__main__":
    main()

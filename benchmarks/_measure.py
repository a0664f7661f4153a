"""One measurement in a fresh process, run by ``compare_formats.py``; prints one JSON line.

Every measurement builds the state first, then touches and frees scratch memory (so that the
operation's own allocations do not pay the host's first-touch cost, see README.md), resets the
process's peak-RSS counter, records the baseline RSS, and only then times the operation.

    python benchmarks/_measure.py save KIND --size BYTES --path DIR
    python benchmarks/_measure.py load KIND --size BYTES --path DIR
    python benchmarks/_measure.py floor

``compare_formats.py`` forks each measurement from a server process that has imported torch and
everything else once (``preload``): a new process per measurement, without paying the imports.
Set ``BENCH_PROFILE=1`` to print a cProfile of the timed operation to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import build_state, state_nbytes

import safeckpt

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MB = 1024 * 1024


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM (and so ru_maxrss) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_memory(nbytes: int) -> None:
    if nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)


def _fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    """A few sums that differ between the saved state and a freshly built one."""
    params = [p.detach() for p in model.parameters()]
    state = optimizer.state.get(list(model.parameters())[-1], {})
    moment = state.get("exp_avg_sq")
    return [float(params[0][0].double().sum()), float(params[-1].double().sum()),
            float(moment.double().sum()) if moment is not None else 0.0]  # fmt: skip


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(".safeckpt"))


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


# --- saves: each returns extra figures (e.g. the time an async save blocked) ----------------


def save_torch(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path, durable: bool = False) -> dict[str, float]:
    file = path / "state.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)
    if durable:
        _fsync_tree(path)
    return {}


def save_safetensors(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path / "model.safetensors"))
    return {}


def save_dcp(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, opt), checkpoint_id=str(path / "dcp"))
    return {}


def save_safeckpt(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    safeckpt.save_checkpoint(model, opt, None, None, 1, directory=path)
    return {}


def save_safeckpt_chunks(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    """What safeckpt writes on a machine of 4 or more cores: per-chunk digests as well."""
    from safeckpt.storage.tuning import TUNING

    TUNING.min_cores_for_chunks = 1  # this child process only
    return save_safeckpt(model, opt, path)


def save_safeckpt_weights(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=path, rng=False)
    return {}


def save_async(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, float]:
    start = time.perf_counter()
    pending = safeckpt.save_checkpoint(model, opt, None, None, 1, directory=path, async_=True)
    blocked = time.perf_counter() - start
    pending.wait()
    return {"blocking_s": blocked}


SAVES: dict[str, Callable[..., dict[str, float]]] = {
    "torch.save": save_torch,
    "torch.save+fsync": lambda m, o, p: save_torch(m, o, p, durable=True),
    "safetensors (weights)": save_safetensors,
    "dcp.save": save_dcp,
    "safeckpt": save_safeckpt,
    "safeckpt (weights)": save_safeckpt_weights,
    "safeckpt async": save_async,
    "safeckpt +chunks": save_safeckpt_chunks,
}

# --- loads: restore into a fresh model and optimizer ---------------------------------------


def load_torch(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    state = torch.load(path / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def load_safetensors(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))


def load_dcp(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, opt)  # allocates the optimizer state DCP loads into
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])  # type: ignore[arg-type]


def load_safeckpt(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path, **kwargs: object) -> None:
    safeckpt.load_checkpoint(path, model=model, optimizer=opt, **kwargs)  # type: ignore[arg-type]


LOADS: dict[str, tuple[str, Callable[..., object]]] = {
    "torch.load": ("torch.save", load_torch),
    "safetensors (weights)": ("safetensors (weights)", load_safetensors),
    "dcp.load": ("dcp.save", load_dcp),
    "safeckpt verified": ("safeckpt", load_safeckpt),
    "safeckpt unverified": ("safeckpt", lambda m, o, p: load_safeckpt(m, o, p, verify=False)),
    "safeckpt weights unverified": (
        "safeckpt",
        lambda m, o, p: safeckpt.load_checkpoint(p, model=m, verify=False, restore_rng=False),
    ),
    "safeckpt (weights) unverified": (
        "safeckpt (weights)",
        lambda m, o, p: safeckpt.load_checkpoint(p, model=m, verify=False, restore_rng=False),
    ),
    "safeckpt (weights) verified": (
        "safeckpt (weights)",
        lambda m, o, p: safeckpt.load_checkpoint(p, model=m, restore_rng=False),
    ),
    "safeckpt verified +chunks": ("safeckpt +chunks", load_safeckpt),
}


def floor() -> dict[str, float]:
    """SHA-256 throughput on one core and on all cores at once."""
    data = os.urandom(MB) * 256
    hashlib.sha256(data[:MB]).digest()
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    one = len(data) / (time.perf_counter() - start)
    cores = os.cpu_count() or 1
    threads = [threading.Thread(target=lambda: hashlib.sha256(data).digest()) for _ in range(cores)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sha256_core_Bps": one, "sha256_all_Bps": cores * len(data) / (time.perf_counter() - start), "cores": cores}


def preload() -> None:
    """Import everything a measurement may use, so no measurement times an import (the
    forkserver that ``compare_formats.py`` forks the measurements from runs this once)."""
    import importlib

    for module in ("safeckpt.torch.loader", "safeckpt.torch.saver", "safetensors.torch", "torch.distributed.checkpoint",
                   "torch.distributed.checkpoint.state_dict"):  # fmt: skip
        importlib.import_module(module)


def measure(
    mode: str, kind: str = "", size: int = 0, path: Path | None = None, warm_factor: float = 2.5, steady: bool = False
) -> dict[str, object]:
    """Run one measurement (``mode`` save, load, prepare or floor) in this process.

    With ``steady``, a save is timed the second time the process makes it (the first goes to a
    scratch folder, deleted at once): a training loop's periodic saves, rather than a new
    process's first write (which also pays for the page cache's first pages, and, for an async
    save, for the snapshot's memory)."""
    if mode == "floor":
        return dict(floor())
    assert path is not None
    fresh = mode == "load"
    model, opt, _ = build_state(size, init_optimizer=not fresh, seed=1 if fresh else 0)
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) if fresh else state_nbytes(model, opt)
    if mode == "prepare":
        SAVES[kind](model, opt, path)
        return {"fingerprint": _fingerprint(model, opt)}
    if steady and mode == "save":
        (path / "warm-up").mkdir()
        SAVES[kind](model, opt, path / "warm-up")
        shutil.rmtree(path / "warm-up")
    _warm_memory(int(warm_factor * state_bytes) + 256 * MB)
    exact_peak = _reset_peak()
    baseline = _status("VmRSS")
    profiler = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    if mode == "save":
        extra = SAVES[kind](model, opt, path)
    else:
        LOADS[kind][1](model, opt, path)
        extra = {}
    seconds = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    result: dict[str, object] = {
        "seconds": seconds,
        **extra,
        "state_bytes": state_bytes,
        "baseline_rss": baseline,
        "peak_rss": _status("VmHWM"),
        "exact_peak": exact_peak,
    }
    if mode == "save":
        result["disk_bytes"] = _disk_bytes(path)
    else:
        result["fingerprint"] = _fingerprint(model, opt)
    return result


preload()  # at import: the forkserver imports this module once, before forking measurements


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "prepare", "floor"])
    parser.add_argument("kind", nargs="?", default="")
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--path", type=Path)
    parser.add_argument("--warm-factor", type=float, default=2.5)
    parser.add_argument("--steady", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.mode, args.kind, args.size, args.path, args.warm_factor, args.steady)))


if __name__ == "__main__":
    main()

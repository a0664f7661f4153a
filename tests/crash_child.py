"""Fault injection and the writer processes that the crash, disk-full and concurrency tests kill.

The tests start these functions in children forked from a ``forkserver`` that has imported
torch and safeckpt once, so a trial costs a fork, not an interpreter start. Every state here is
a pure function of its step, so the parent can rebuild what any committed step must contain and
compare a loaded checkpoint bit for bit.
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import multiprocessing.forkserver
import os
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import safeckpt
from safeckpt.storage import posix_commit as commit
from safeckpt.storage.local import list_checkpoints


def start_forkserver() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context, its server started with this module and torch preloaded.

    Python 3.11's forkserver ignores the parent's ``sys.path``, so the tests folder goes into
    ``PYTHONPATH`` while the server starts.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["crash_child", "safeckpt.torch.saver", "safeckpt.torch.loader"])
    here = os.path.dirname(os.path.abspath(__file__))
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, *sys.path) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return context


# -- fault injection -------------------------------------------------------------------------

FAULTABLE = ("open", "write", "pwrite", "writev", "pwritev", "fsync", "fdatasync", "close", "mkdir", "rename", "replace")
"""``os`` functions a save calls to change the file system (each is one fault boundary)."""


class Faults:
    """Counts calls to every faultable function; the ``at``-th one (1-based) fails.

    ``mode`` is ``"raise"`` (an ``OSError`` with ``code``, the call not performed, except
    ``close``, which Linux always performs) or ``"exit"`` (``os._exit(EXIT_CODE)`` on the spot).
    """

    EXIT_CODE = 70

    def __init__(self, at: int, *, mode: str = "raise", code: int = errno.EIO, only: tuple[str, ...] = ()) -> None:
        self.at, self.mode, self.code, self.only = at, mode, code, only
        self.calls: list[str] = []
        self.fired = ""
        self._lock = threading.Lock()
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, real: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            with self._lock:
                counted = not self.only or name in self.only
                if counted:
                    self.calls.append(name)
                fire = counted and len(self.calls) == self.at and not self.fired
                if fire:
                    self.fired = name
            if fire:
                if self.mode == "exit":
                    os._exit(self.EXIT_CODE)
                if name == "close":
                    real(*args, **kwargs)
                raise OSError(self.code, f"{os.strerror(self.code)} (injected at {name} call {self.at})")
            return real(*args, **kwargs)

        return wrapper

    def __enter__(self) -> Faults:
        targets: list[tuple[object, str]] = [(os, n) for n in FAULTABLE if hasattr(os, n)]
        targets += [(fcntl, "flock"), (commit, "_renameat2")]
        for owner, name in targets:
            real = getattr(owner, name)
            self._saved.append((owner, name, real))
            setattr(owner, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()


# -- deterministic states ------------------------------------------------------------------


def small_state(step: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A model state dict (with a tied pair) and an optimizer-like tree, unique to ``step``."""
    gen = torch.Generator().manual_seed(step)
    embed = torch.randn(17, 8, generator=gen)
    model = {
        "embed.weight": embed,
        "head.weight": embed,
        "hidden.weight": torch.randn(8, 8, generator=gen),
        "hidden.bias": torch.randn(8, generator=gen).to(torch.bfloat16),
        "calls": torch.tensor(step, dtype=torch.int64),
    }
    tree = {
        "state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(8, generator=gen)} for i in range(3)},
        "param_groups": [{"lr": 1e-3 * step, "betas": (0.9, 0.999), "params": [0, 1, 2], "name": f"s{step}"}],
    }
    return model, tree


def save_small(root: Path, step: int, *, content: int | None = None, overwrite: bool = False) -> Path:
    """Save ``small_state(content)`` (default: ``step``) as checkpoint ``step``."""
    model, tree = small_state(step if content is None else content)
    return safeckpt.save_checkpoint(
        model, None, {"step": step}, None, step, directory=root, extra={"opt": tree}, rng=False, overwrite=overwrite
    )


def expected_small(content: int) -> object:
    """Fingerprint a load of ``save_small(..., content=content)`` must have."""
    from ckpt_tools import state_fingerprint

    model, tree = small_state(content)
    return state_fingerprint(model, None, {"opt": tree})


def loaded_fingerprint(root: Path) -> tuple[int, object]:
    """(step, fingerprint) of the newest checkpoint under ``root``."""
    from ckpt_tools import state_fingerprint

    ckpt = safeckpt.load_checkpoint(root, restore_rng=False)
    return ckpt.step, state_fingerprint(ckpt.model_state, None, ckpt.extra)


_BASE_BYTES = 216 * 1024 * 1024
SIZES_MB = (50, 80, 120, 160, 200)
_base: torch.Tensor | None = None


def base() -> torch.Tensor:
    """216 MiB of pseudo-random bytes, made once per process (numpy: no torch thread pool)."""
    global _base
    if _base is None:
        words = np.arange(_BASE_BYTES // 4, dtype=np.uint32)
        words *= np.uint32(2654435761)
        words ^= words >> np.uint32(15)
        _base = torch.from_numpy(words.view(np.uint8))
    return _base


def big_state(step: int) -> dict[str, torch.Tensor]:
    """50-200 MB of tensors (F32, BF16, I64 views of ``base()`` at a step-dependent offset)."""
    rng = random.Random(step)
    size = rng.choice(SIZES_MB) * 1024 * 1024
    offset = rng.randrange(0, _BASE_BYTES - size, 64)
    data = base()[offset : offset + size]
    a, b = size * 6 // 10 // 8 * 8, size * 9 // 10 // 8 * 8
    return {
        "w": data[:a].view(torch.float32),
        "h": data[a:b].view(torch.bfloat16),
        "i": data[b : size // 8 * 8].view(torch.int64),
        "step": torch.tensor([step, size, offset], dtype=torch.int64),
    }


# -- child entry points --------------------------------------------------------------------


def exit_at(root: str, step: int, content: int, at: int, overwrite: bool, exchange: bool) -> None:
    """Save ``small_state(content)`` as ``step``; die by ``os._exit`` at the ``at``-th call."""
    if not exchange:
        commit._renameat2 = lambda src, dst, flags: False  # type: ignore[assignment]
    with Faults(at, mode="exit"):
        try:
            save_small(Path(root), step, content=content, overwrite=overwrite)
        except safeckpt.CheckpointError:
            os._exit(1)
    os._exit(0)


def save_forever(root: str, first_step: int, keep: int) -> None:
    """Save big states at ``first_step``, ``first_step + 1``, ... pruning to ``keep``, until killed."""
    step = first_step
    while True:
        safeckpt.save_checkpoint(big_state(step), None, None, None, step, directory=root, rng=False)
        for _, old in list_checkpoints(root)[:-keep]:
            commit.remove_checkpoint(old)
        step += 1


def race(root: str, writer: int, rounds: int, barrier: object, result_path: str) -> None:
    """One of two writers saving the same step into the same root at the same moment, round
    after round: even steps with ``overwrite=True`` (both commit, the last one wins), odd steps
    without (exactly one commits, the other gets ``CheckpointExistsError``)."""
    import json
    import traceback

    refused, errors = 0, []
    for step in range(rounds):
        barrier.wait()  # type: ignore[attr-defined]
        model, tree = small_state(step * 2 + writer)
        try:
            safeckpt.save_checkpoint(
                model, None, None, None, step, directory=root, extra={"opt": tree}, rng=False, overwrite=step % 2 == 0
            )
        except safeckpt.CheckpointExistsError:
            refused += 1
        except BaseException:
            errors.append(traceback.format_exc())
    Path(result_path).write_text(json.dumps({"refused": refused, "errors": errors}))
    os._exit(0)


def save_under_file_size_limit(root: str, limit: int, result_path: str) -> None:
    """Save a ~1 MB state with ``RLIMIT_FSIZE`` at ``limit`` bytes; write what happened as JSON."""
    import json
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    model, tree = small_state(NEW_CONTENT)
    model = {**model, "big": torch.arange(256 * 1024, dtype=torch.float32)}
    try:
        safeckpt.save_checkpoint(model, None, None, None, 2, directory=root, extra={"opt": tree}, rng=False)
    except safeckpt.CheckpointError as exc:
        outcome = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)}
    else:
        outcome = {"error": None}
    Path(result_path).write_text(json.dumps(outcome))
    os._exit(0)


NEW_CONTENT = 2

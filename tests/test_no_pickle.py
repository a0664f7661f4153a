"""Loading never unpickles: no pickle, no torch.load, no eval/exec anywhere on the load path.

Checked three ways: the source of every load-path module (AST, so docstrings do not count),
spies that make every unpickling entry point fail during a full load, and a fresh interpreter
that records every function called during a load (all threads) and every audit event.
"""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeckpt
from conftest import TinyLM, train_steps

SRC = Path(safeckpt.__file__).parent
NOT_LOAD_PATH = {"convert.py", "hf_convert.py", "cli.py", "saver.py", "manager.py"}
"""Modules that may use torch.load (importing torch.save files, with weights_only=True) or are
not imported by a load."""
FORBIDDEN_MODULES = {"pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def load_path_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name not in NOT_LOAD_PATH)


@pytest.mark.parametrize("path", load_path_modules(), ids=lambda p: p.name)
def test_load_path_source_has_no_unpickling(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, (path.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, (path.name, node.lineno)
            assert not (node.module == "torch" and any(a.name == "load" for a in node.names)), path.name
        elif isinstance(node, ast.Attribute):
            assert not (node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch"), (
                path.name, node.lineno)  # fmt: skip
            assert node.attr not in ("Unpickler", "loads") or not isinstance(node.value, ast.Name) or (
                node.value.id not in FORBIDDEN_MODULES), (path.name, node.lineno)  # fmt: skip
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__"), (path.name, node.lineno)


@pytest.fixture
def full_checkpoint(tmp_path: Path) -> tuple[Path, TinyLM, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    train_steps(model, optimizer, 2)
    path = safeckpt.save_checkpoint(
        model, optimizer, {"lr": 0.01}, ["a", "b"], 2, directory=tmp_path / "run", scheduler=scheduler,
        extra={"loader": {"epoch": 1, "order": (1, 2)}},
    )  # fmt: skip
    return path, model, optimizer, scheduler


def test_load_with_every_unpickler_booby_trapped(
    full_checkpoint: tuple[Path, TinyLM, torch.optim.Optimizer, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    import _pickle
    import copyreg
    import marshal

    import torch.serialization

    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unpickler was called during load")

    class TrappedUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            trap()

    for module, name in [(pickle, "load"), (pickle, "loads"), (_pickle, "load"), (_pickle, "loads"),
                         (torch, "load"), (torch.serialization, "load"), (marshal, "loads"),
                         (copyreg, "_reconstructor")]:  # fmt: skip
        monkeypatch.setattr(module, name, trap)
    monkeypatch.setattr(pickle, "Unpickler", TrappedUnpickler)
    monkeypatch.setattr(_pickle, "Unpickler", TrappedUnpickler)
    path, model, optimizer, scheduler = full_checkpoint
    ckpt = safeckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert ckpt.extra["loader"] == {"epoch": 1, "order": (1, 2)}


PROBE = r"""
import json, sys, threading

called, events = set(), set()
WATCH = ("pickle", "_pickle", "copyreg", "torch.serialization", "torch._weights_only_unpickler")

def audit(event, args):
    if event.startswith(("pickle.", "marshal.")) and event != "marshal.loads":
        events.add(event)  # (marshal.loads is how the import system reads .pyc files)

def profile(frame, event, arg):
    if event == "c_call":
        module = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__module__
        name = f"{module}.{getattr(arg, '__qualname__', arg)}"
    elif event == "call":
        name = f"{frame.f_globals.get('__name__')}.{frame.f_code.co_name}"
    else:
        return
    if name.startswith(WATCH) or name.endswith((".torch.load", "serialization.load")):
        called.add(name)

import safeckpt, torch
from safeckpt.torch.loader import load_checkpoint  # imports done before watching: only the load counts
sys.addaudithook(audit)
threading.setprofile(profile)
sys.setprofile(profile)
ckpt = load_checkpoint(sys.argv[1])
if sys.argv[2:] == ["control"]:  # proves the probe sees an unpickler when one runs
    import io, pickle
    buffer = io.BytesIO()
    torch.save(torch.ones(1), buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    import collections
    pickle.loads(pickle.dumps(collections.OrderedDict(a=1)))  # resolves a global: audited
sys.setprofile(None)
threading.setprofile(None)
print(json.dumps({"called": sorted(called), "events": sorted(events), "step": ckpt.step}))
"""

PROBE_TORCH_FREE = r"""
import json, sys
import safeckpt
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("pickle", "_pickle", "torch"))
safeckpt.verify_checkpoint(sys.argv[1])
after_verify = loaded()
from safeckpt.numpy import load_checkpoint  # numpy itself imports pickle (for np.load), never torch
load_checkpoint(sys.argv[1])
print(json.dumps({"verify": after_verify, "numpy": [m for m in loaded() if m.startswith("torch")]}))
"""


@pytest.mark.parametrize("control", [False, True], ids=["load", "control"])
def test_fresh_interpreter_load_calls_no_unpickler(
    full_checkpoint: tuple[Path, TinyLM, torch.optim.Optimizer, object], control: bool
) -> None:
    path = full_checkpoint[0]
    command = [sys.executable, "-c", PROBE, str(path), *(["control"] if control else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["step"] == 2
    if control:
        assert "pickle.find_class" in report["events"], report
        assert any(name.endswith("serialization.load") for name in report["called"]), report
        assert any(name.startswith("_pickle.") or name.startswith("pickle.") for name in report["called"]), report
    else:
        assert report["called"] == [] and report["events"] == [], report


def test_torch_free_readers_never_import_pickle_or_torch(full_checkpoint: tuple[Path, TinyLM, torch.optim.Optimizer, object]) -> None:
    numpy_reader = SRC / "numpy.py"
    if not numpy_reader.exists():
        pytest.skip("safeckpt.numpy is not part of this tree")
    path = full_checkpoint[0]
    done = subprocess.run([sys.executable, "-c", PROBE_TORCH_FREE, str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"verify": [], "numpy": []}

"""RNG state that a load leaves behind is named: generators saved by name and not passed back,
and NumPy's state when NumPy is not installed (a missing package, not a damaged checkpoint)."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import safeckpt
from ckpt_tools import run_python
from conftest import TinyLM


def test_named_generators_not_passed_back_are_named_in_a_warning(tmp_path: Path, model: TinyLM) -> None:
    shuffle, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path, rng={"shuffle": shuffle, "noise": noise})
    with pytest.warns(safeckpt.MissingRNGStateWarning, match=r"generator\(s\) 'noise', 'shuffle', which were not restored"):
        safeckpt.load_checkpoint(tmp_path, model=TinyLM())
    with pytest.warns(safeckpt.MissingRNGStateWarning, match=r"'shuffle', which were not restored.*restore_rng=\{'shuffle': gen\}"):
        safeckpt.load_checkpoint(tmp_path, restore_rng={"noise": torch.Generator()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safeckpt.load_checkpoint(tmp_path, restore_rng={"noise": torch.Generator(), "shuffle": torch.Generator()})
        safeckpt.load_checkpoint(tmp_path, restore_rng=False)


def test_numpy_state_without_numpy_names_the_missing_package(tmp_path: Path, model: TinyLM) -> None:
    pytest.importorskip("numpy")  # the checkpoint must hold NumPy's global state
    safeckpt.save_checkpoint(model, None, None, None, 1, directory=tmp_path)
    assert "numpy" in safeckpt.load_checkpoint(tmp_path).rng_state
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["numpy"] = None  # as if numpy were not installed
        import torch, safeckpt
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = safeckpt.load_checkpoint({str(tmp_path)!r})
        rng = [w for w in caught if issubclass(w.category, safeckpt.MissingRNGStateWarning)]
        assert ckpt.step == 1
        assert len(rng) == 1, [str(w.message) for w in caught]
        print(rng[0].message)
        """
    )
    done = run_python(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "numpy package is not installed" in done.stdout
    assert "damaged" not in done.stdout and "malformed" not in done.stdout

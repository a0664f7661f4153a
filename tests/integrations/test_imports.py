"""``import safeckpt`` (and saving through it) never imports lightning, transformers or omegaconf;
the integrations load them only when imported themselves."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_after(code: str) -> set[str]:
    snippet = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, check=True)
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


FRAMEWORKS = {"lightning", "pytorch_lightning", "transformers", "omegaconf", "accelerate"}


def test_import_safeckpt_and_save_load_no_framework(tmp_path: object) -> None:
    loaded = loaded_after(
        "import safeckpt, torch\n"
        f"p = safeckpt.save_checkpoint(torch.nn.Linear(2, 2), None, {{'a': {{1: 2}}}}, None, 1, directory={str(tmp_path)!r})\n"
        "safeckpt.load_checkpoint(p)"
    )
    assert not loaded & FRAMEWORKS, loaded & FRAMEWORKS


def test_hf_integration_does_not_import_lightning() -> None:
    # (Lightning itself imports transformers when it is installed, so the converse cannot hold.)
    assert not {"lightning", "pytorch_lightning"} & loaded_after("import safeckpt.hf")

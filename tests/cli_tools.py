"""Helpers for the command-line tests: run a command in-process or as a real ``safeckpt``
subprocess, and check ``--json`` output against the schemas in spec/cli/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from safeckpt.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "spec" / "cli"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self, schema: str) -> dict[str, object]:
        """stdout parsed as JSON and validated against ``spec/cli/<schema>.schema.json``."""
        document = json.loads(self.out)
        validate(document, schema)
        return document


def validate(document: object, schema: str) -> None:
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
    validator.validate(document)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> Result:
    """``main([...])`` in this process; usage errors (SystemExit) return their code."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def cli_process(*args: object, cwd: Path | None = None, python_flags: tuple[str, ...] = ()) -> Result:
    """``python -m safeckpt.cli ...`` in a new interpreter (stdout and stderr piped)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, *python_flags, "-m", "safeckpt.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)

"""What every command shares: exit codes, JSON and table output, progress bars, fsspec
``--storage-option``s, and naming a file that is not a checkpoint. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Protocol

from ..errors import CheckpointExistsError

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Progress",
    "add_command",
    "add_json",
    "add_quiet",
    "add_storage_options",
    "as_flags",
    "emit_json",
    "finite",
    "human_size",
    "iso_time",
    "progress",
    "stderr_note",
    "storage_options",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""A checkpoint failed verification or could not be read or written, or ``diff`` found a
difference beyond the tolerance."""
EXIT_USAGE = 2
"""Bad command line (argparse's convention)."""

EXIT_CODES_HELP = """exit status:
  0  success (every checkpoint verified; diff: within tolerance)
  1  a checkpoint failed verification, could not be read or written, or
     diff found differences beyond --atol/--rtol
  2  usage error (unknown command, bad option)"""


class Progress(Protocol):
    """The part of ``tqdm`` the commands use."""

    def update(self, n: float = 1) -> object: ...


class _NoProgress:
    def update(self, n: float = 1) -> object:
        return None


def as_flags(exc: CheckpointExistsError) -> CheckpointExistsError:
    """The library's "already exists" error as a command says it: ``overwrite=True`` is ``--overwrite``
    (and where even that does not replace what is there, the message says so)."""
    return CheckpointExistsError(str(exc).replace("overwrite=True", "--overwrite"))


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the exit codes as its epilog."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    return parser


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bar (bars are shown only when stderr is a terminal and tqdm is installed)",
    )  # fmt: skip


STORAGE_OPTION_HELP = (
    "fsspec storage option for URL paths (s3://..., gs://..., memory://...), repeatable; VALUE is "
    "read as JSON when it parses (true, 3, {\"region_name\": \"eu-west-1\"}), else as a string: "
    "--storage-option anon=true, --storage-option endpoint_url=http://127.0.0.1:9000, "
    "--storage-option client_kwargs='{\"region_name\": \"us-east-1\"}'. Without it, s3fs reads "
    "credentials and endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)"
)


def _storage_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. anon=true), got {text!r}")
    try:
        parsed: object = json.loads(value)
    except ValueError:
        parsed = value  # a plain string: endpoint_url=http://..., profile=dev
    return key.strip(), parsed


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--storage-option KEY=VALUE`` (repeatable); read them back with :func:`storage_options`."""
    parser.add_argument(
        "--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE",
        dest="storage_options", help=STORAGE_OPTION_HELP,
    )  # fmt: skip


def storage_options(args: argparse.Namespace) -> dict[str, object] | None:
    """The ``--storage-option``s as fsspec ``storage_options`` (the last of a repeated key wins);
    None when there are none, so that local paths are accepted."""
    return dict(getattr(args, "storage_options", None) or ()) or None


@contextmanager
def progress(total: int, description: str, *, quiet: bool, unit: str = "B") -> Iterator[Progress]:
    """A tqdm bar on stderr when it is a terminal, ``quiet`` is off and tqdm is installed;
    otherwise an object whose ``update`` does nothing (tqdm is an optional dependency)."""
    if quiet or not _is_terminal():
        yield _NoProgress()
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield _NoProgress()
        return
    bar = tqdm(total=total, desc=description, unit=unit, unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def emit_json(document: object) -> None:
    """Print ``document`` as JSON (strict: no NaN or Infinity)."""
    print(json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False))


def human_size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def iso_time(timestamp: float) -> str:
    """A POSIX timestamp as ISO 8601 UTC, like the manifest's ``created``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def finite(value: float) -> float | None:
    """``value`` for JSON: infinity and NaN become None (JSON has no such numbers)."""
    return value if math.isfinite(value) else None


def stderr_note(message: str, *, quiet: bool = False) -> None:
    """A line for the person at the terminal (not part of the command's output)."""
    if not quiet:
        print(message, file=sys.stderr)

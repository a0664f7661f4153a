"""The ``safeckpt`` command line: one module per command, torch-free where possible.

``verify``, ``inspect``, ``ls`` and ``prune`` never import torch; ``diff``, ``export`` and
``convert`` import it when they run. Every checkpoint path may be an fsspec URL, and ``convert``
and ``consolidate`` also write into one (``export`` writes local files only), with
``--storage-option KEY=VALUE`` for the file system (:mod:`._common`). Every read command takes ``--json``; long work shows a
progress bar when stderr is a terminal (tqdm, optional). Exit status: 0 on success, 1 when a
checkpoint fails verification or cannot be read or written or ``diff`` finds differences beyond
its tolerance, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import CheckpointError, CheckpointUsageError
from . import consolidate, convert, diff, export, inspect, ls, prune, verify
from ._common import EXIT_CODES_HELP, EXIT_FAILED, EXIT_USAGE

__all__ = ["build_parser", "main"]

_COMMANDS = (verify, inspect, ls, diff, prune, export, convert, consolidate)
_EXIT_SIGPIPE = 128 + 13
"""What a shell reports for a process a closed pipe ended (``inspect ... | head``)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (``safeckpt demo`` parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="safeckpt",
        description="Verify, inspect, compare, prune, convert and export safeckpt checkpoints.\n\n"
        "Checkpoint paths may be fsspec URLs (s3://bucket/run, gs://..., memory://...), and convert "
        "and consolidate also write into one (export's OUT is a local path). Credentials and endpoint come from the environment as s3fs reads them "
        "(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) or from --storage-option KEY=VALUE (repeatable; "
        "VALUE is JSON when it parses, else a string: anon=true, endpoint_url=http://host:9000).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"safeckpt {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    sub.add_parser(
        "demo",
        help="train a small language model, kill it, resume it and compare the curves (safeckpt demo --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse would eat a leading --flag)
        from ..demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        try:
            return int(args.run(args))
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`safeckpt inspect ... | head`): stop quietly. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        return _EXIT_SIGPIPE
    except CheckpointUsageError as exc:  # arguments that cannot go together: bad usage, as argparse's
        print(f"safeckpt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"safeckpt: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("safeckpt: interrupted", file=sys.stderr)
        return 128 + 2

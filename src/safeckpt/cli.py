"""The ``safeckpt`` command line: verify, inspect, convert from/to torch.save, run the demo.

Exit status: 0 on success, 1 when a checkpoint fails verification or cannot be loaded, 2 on
bad usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import CheckpointError

__all__ = ["main"]


def _verify(args: argparse.Namespace) -> int:
    from .pipeline.verify import verify_checkpoint

    for path in args.paths:
        manifest = verify_checkpoint(path)
        total = sum(e.size for e in manifest.files)
        print(f"OK {path}: step {manifest.step}, {len(manifest.files)} files, {total} bytes verified")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .format.safetensors import parse_header
    from .torch.loader import locate_checkpoint, read_checkpoint_files

    folder = locate_checkpoint(args.path)
    manifest, buffers = read_checkpoint_files(folder, verify=not args.no_verify)
    report: dict[str, object] = {
        "path": str(folder),
        "step": manifest.step,
        "format_version": "{}.{}".format(*manifest.format_version),
        "created": manifest.created,
        "producer": manifest.producer,
        "metadata": manifest.metadata,
        "files": {},
    }
    files: dict[str, dict[str, object]] = {}
    for entry in manifest.files:
        info: dict[str, object] = {"size": entry.size, "sha256": entry.sha256}
        if entry.chunks is not None:
            info["chunks"] = {"size": entry.chunks.size, "count": len(entry.chunks.sha256)}
        if entry.name.endswith(".safetensors"):
            tensors, _ = parse_header(buffers[entry.name], source=str(folder / entry.name))
            info["tensors"] = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in tensors}
        files[entry.name] = info
    report["files"] = files
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{folder}  step {manifest.step}  format {report['format_version']}  created {manifest.created}")
    for name, info in files.items():
        chunks = info.get("chunks")
        per_chunk = f"  + {chunks['count']} chunk digests" if isinstance(chunks, dict) else ""
        print(f"  {name:<24} {info['size']:>14,} bytes  sha256 {str(info['sha256'])[:16]}…{per_chunk}")
        tensors_info = info.get("tensors", {})
        assert isinstance(tensors_info, dict)
        for tname, t in tensors_info.items():
            print(f"      {tname:<40} {t['dtype']:<8} {t['shape']}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import import_torch_checkpoint

    path = import_torch_checkpoint(args.source, args.directory, step=args.step, overwrite=args.overwrite)
    print(f"wrote {path} (read {args.source} with torch.load(weights_only=True))")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .convert import export_torch_checkpoint

    print(f"wrote {export_torch_checkpoint(args.checkpoint, args.target)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeckpt", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every file's size and SHA-256 (whole-file and per-chunk) against the manifest")
    p.add_argument("paths", nargs="+", help="checkpoint folders, manifest.json files or checkpoint roots")
    p.set_defaults(func=_verify)
    p = sub.add_parser("inspect", help="show the manifest and every stored tensor")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("convert", help="import a torch.save .pt file (read with weights_only=True)")
    p.add_argument("source", help="legacy .pt/.pth/.bin file")
    p.add_argument("directory", help="checkpoint root to write step-NNNNNNNN into")
    p.add_argument("--step", type=int, default=None, help="step to record (default: the file's own)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)
    p = sub.add_parser("export", help="write a checkpoint as one torch.save file")
    p.add_argument("checkpoint")
    p.add_argument("target")
    p.set_defaults(func=_export)
    p = sub.add_parser("demo", help="train, kill, resume and compare a small language model", add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # argparse.REMAINDER drops a leading "--flag"; the demo parses its own
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"safeckpt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

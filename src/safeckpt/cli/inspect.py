"""``safeckpt inspect PATH``: the manifest, config, files and every stored tensor's dtype and
shape. Torch-free; tensors are listed from the archives' headers (memory-mapped, so only the
header pages are read; in an object store, fetched by byte ranges), after every file has been
verified by streaming (unless ``--no-verify``).
"""

from __future__ import annotations

import argparse

from ..format.documents import load_json
from . import _files
from ._common import (
    EXIT_OK,
    add_command,
    add_json,
    add_quiet,
    add_storage_options,
    emit_json,
    human_size,
    progress,
    storage_options,
)

__all__ = ["inspect", "register", "run"]

HELP = "show a checkpoint's manifest, config, files and every tensor's dtype and shape (torch-free)"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "inspect",
        help=HELP,
        description=f"{HELP[0].upper()}{HELP[1:]}. Files are verified first (streamed, small memory); "
        "tensor listings come from the safetensors headers alone.",
    )
    p.add_argument("path", metavar="PATH", help="checkpoint folder, its manifest.json, or a root of step-* folders (the newest); or a URL (s3://bucket/run)")
    add_json(p)
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks (sizes and headers are still checked)")
    add_quiet(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def inspect(path: str, *, verify: bool = True, quiet: bool = True, storage_options: _files.Options = None) -> dict[str, object]:
    """The report ``inspect --json`` prints (see spec/cli/inspect.schema.json)."""
    folder = _files.locate(path, storage_options=storage_options)
    manifest = _files.read_manifest(folder, storage_options=storage_options)
    if verify:
        with progress(sum(e.size for e in manifest.files), f"verify {folder.name}", quiet=quiet) as bar:
            _files.audit(folder, manifest, done=bar.update, storage_options=storage_options)
    files: dict[str, dict[str, object]] = {}
    config: object = None
    vocab_size: int | None = None
    with _files.mapped_files(folder, manifest, storage_options=storage_options) as maps:
        headers = _files.archive_headers(folder, maps)
        for entry in manifest.files:
            info: dict[str, object] = {"size": entry.size, "sha256": entry.sha256}
            if entry.chunks is not None:
                info["chunks"] = {"size": entry.chunks.size, "count": len(entry.chunks.sha256)}
            if entry.name in headers:
                tensors, metadata = headers[entry.name]
                info["tensors"] = {
                    t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in sorted(tensors, key=lambda t: t.name)
                }
                if entry.name == "model.safetensors":
                    stored = {t.name for t in tensors}
                    info["aliases"] = _files.model_aliases(metadata, stored, source=str(folder / entry.name))
            files[entry.name] = info
        if "config.json" in maps:
            config = load_json(bytes(maps["config.json"]), source=str(folder / "config.json"))
        if "vocab.json" in maps:
            vocab = load_json(bytes(maps["vocab.json"]), source=str(folder / "vocab.json"))
            vocab_size = len(vocab) if isinstance(vocab, (list, dict)) else None
    return {
        "path": str(folder),
        "step": manifest.step,
        "format_version": "{}.{}".format(*manifest.format_version),
        "created": manifest.created,
        "producer": manifest.producer,
        "metadata": manifest.metadata,
        "verified": verify,
        "config": config,
        "vocab_size": vocab_size,
        "size": sum(e.size for e in manifest.files),
        "files": files,
    }


def run(args: argparse.Namespace) -> int:
    report = inspect(args.path, verify=not args.no_verify, quiet=args.quiet, storage_options=storage_options(args))
    if args.json:
        emit_json(report)
        return EXIT_OK
    checked = "verified" if report["verified"] else "NOT verified (--no-verify)"
    print(
        f"{report['path']}  step {report['step']}  format {report['format_version']}  "
        f"created {report['created']}  {human_size(int(report['size']))}  {checked}"  # type: ignore[call-overload]
    )
    if report["config"] is not None:
        print(f"  config: {_one_line(report['config'])}")
    if report["vocab_size"] is not None:
        print(f"  vocab: {report['vocab_size']} entries")
    if report["metadata"]:
        print(f"  metadata: {_one_line(report['metadata'])}")
    files = report["files"]
    assert isinstance(files, dict)
    for name, info in files.items():
        chunks = info.get("chunks")
        per_chunk = f"  + {chunks['count']} chunk digests" if isinstance(chunks, dict) else ""
        print(f"  {name:<24} {info['size']:>14,} bytes  sha256 {str(info['sha256'])[:16]}…{per_chunk}")
        for tname, t in info.get("tensors", {}).items():
            print(f"      {tname:<40} {t['dtype']:<8} {t['shape']}")
        for alias, target in info.get("aliases", {}).items():
            print(f"      {alias:<40} tied to {target}")
    return EXIT_OK


def _one_line(value: object, limit: int = 200) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"

"""``safeckpt diff A B``: what differs between two checkpoints, as a report and a CI gate.

* step, user metadata (shown, never gating);
* config and vocabulary, entry by entry;
* for the model and every state tree (optimizer, scheduler, rng, extra): tensors added, removed
  or changed in dtype or shape, plain values that differ, and for every common tensor the max
  absolute and relative difference.

Equal parts cost little: a part whose files have the same SHA-256 in both manifests is reported
identical without being parsed (its files are only stream-verified, so that a damaged copy is
never called identical), and a tensor is compared numerically only if its bytes differ. Files
that are compared are read and verified first. A file that fails verification is an error (exit
1, naming the file), never a difference. ``--part`` limits the comparison, and the gate, to the
parts named. The exit status is 0 when everything compared (config, vocabulary, every tree)
matches within ``--atol``/``--rtol``, else 1.
"""

from __future__ import annotations

import argparse
import math

from . import _files
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    add_json,
    add_quiet,
    add_storage_options,
    emit_json,
    finite,
    progress,
    storage_options,
)
from ._compare import close, flatten

__all__ = ["diff", "register", "run"]

HELP = "compare two checkpoints: config, metadata, and every tensor of model, optimizer, scheduler, rng and extra"
DOCUMENTS = ("config", "vocab")
TREES = ("model", "optimizer", "scheduler", "rng", "extra")
PARTS = (*DOCUMENTS, *TREES)
_LISTED = 20
"""Vocabulary differences listed in full; the rest are counted."""


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    description = "Compare two checkpoints:\n\n" + (__doc__ or "").split("\n\n", 1)[1].replace("``", "")
    p = add_command(sub, "diff", help=HELP, description=description)
    p.add_argument("a", metavar="A", help="first checkpoint (folder, manifest.json, or root: the newest; or a URL)")
    p.add_argument("b", metavar="B", help="second checkpoint; relative differences are taken against B")
    p.add_argument("--atol", type=_tolerance, default=0.0, help="absolute tolerance (default 0: exact)")
    p.add_argument("--rtol", type=_tolerance, default=0.0, help="relative tolerance, times |B| (default 0: exact)")
    p.add_argument(
        "--part", action="append", choices=PARTS, dest="parts", metavar="PART",
        help=f"compare only this part, and fail only on it (repeatable; one of {', '.join(PARTS)}; default all)",
    )  # fmt: skip
    add_json(p)
    add_quiet(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, dict)) and not value:
        return [] if not isinstance(value, dict) else {}
    return repr(value)


def _value_changes(a: dict[str, object], b: dict[str, object], *, atol: float, rtol: float) -> list[dict[str, object]]:
    changes: list[dict[str, object]] = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            changes.append({"path": path, "change": "removed", "a": _jsonable(a[path]), "b": None})
        elif path not in a:
            changes.append({"path": path, "change": "added", "a": None, "b": _jsonable(b[path])})
        elif not close(a[path], b[path], atol=atol, rtol=rtol):
            changes.append({"path": path, "change": "changed", "a": _jsonable(a[path]), "b": _jsonable(b[path])})
    return changes


def _spec(tensor: object) -> dict[str, object]:
    import torch

    from ._compare import dtype_name

    assert isinstance(tensor, torch.Tensor)
    return {"dtype": dtype_name(tensor), "shape": list(tensor.shape)}


def _compare_part(part: str, a: object, b: object, *, atol: float, rtol: float) -> dict[str, object]:
    import torch

    from ._compare import compare_tensors

    leaves_a, leaves_b = flatten(a, keys_are_names=part == "model"), flatten(b, keys_are_names=part == "model")
    is_t = lambda v: isinstance(v, torch.Tensor)  # noqa: E731
    ta = {k: v for k, v in leaves_a.items() if is_t(v)}
    tb = {k: v for k, v in leaves_b.items() if is_t(v)}
    report: dict[str, object] = {
        "added": [{"name": k, **_spec(tb[k])} for k in sorted(tb.keys() - ta.keys())],
        "removed": [{"name": k, **_spec(ta[k])} for k in sorted(ta.keys() - tb.keys())],
        "changed": [],
        "tensors": [],
        "values": _value_changes(
            {k: v for k, v in leaves_a.items() if k not in ta and k not in tb},
            {k: v for k, v in leaves_b.items() if k not in tb and k not in ta},
            atol=atol,
            rtol=rtol,
        ),
    }
    changed, tensors = report["changed"], report["tensors"]
    assert isinstance(changed, list) and isinstance(tensors, list)
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        if x.dtype != y.dtype or x.shape != y.shape:
            changed.append({"name": name, "a": _spec(x), "b": _spec(y)})
            continue
        result = compare_tensors(x, y, atol=atol, rtol=rtol)
        tensors.append({
            "name": name, **_spec(x), "equal": result.equal, "max_abs": finite(result.max_abs),
            "max_rel": finite(result.max_rel), "within_tolerance": result.within,
        })  # fmt: skip
    # A leaf that is a tensor on one side and a plain value on the other:
    values = report["values"]
    assert isinstance(values, list)
    for name in sorted((ta.keys() ^ tb.keys()) & (leaves_a.keys() & leaves_b.keys())):
        values.append({"path": name, "change": "changed", "a": _jsonable(leaves_a[name]), "b": _jsonable(leaves_b[name])})
    return report


def _part_ok(report: dict[str, object]) -> bool:
    tensors = report.get("tensors", [])
    assert isinstance(tensors, list)
    return (
        not report.get("added") and not report.get("removed") and not report.get("changed")
        and not report.get("values") and all(t["within_tolerance"] for t in tensors)
    )  # fmt: skip


def diff(
    a: str,
    b: str,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    parts: tuple[str, ...] = PARTS,
    quiet: bool = True,
    storage_options: _files.Options = None,
) -> dict[str, object]:
    """The report ``diff --json`` prints (see spec/cli/diff.schema.json)."""
    opts = storage_options
    folders = (_files.locate(a, storage_options=opts), _files.locate(b, storage_options=opts))
    manifests = tuple(_files.read_manifest(folder, storage_options=opts) for folder in folders)

    def digests(manifest: _files.Manifest, part: str) -> dict[str, str]:
        return {e.name: e.sha256 for e in manifest.files if e.name in _files.files_of(part)}

    parts = tuple(p for p in PARTS if p in parts)  # in report order, each once
    to_read = [p for p in parts if digests(manifests[0], p) != digests(manifests[1], p)]
    # What the report calls identical rests on the manifests' digests: check the files hold them.
    trusted = {name for p in parts if p not in to_read for name in digests(manifests[0], p)}
    total = sum(e.size for m in manifests for e in m.files if any(e.name in _files.files_of(p) for p in parts))
    report: dict[str, object] = {
        "a": str(folders[0]),
        "b": str(folders[1]),
        "atol": atol,
        "rtol": rtol,
        "step": {"a": manifests[0].step, "b": manifests[1].step},
        "metadata": _value_changes(flatten(manifests[0].metadata), flatten(manifests[1].metadata), atol=0.0, rtol=0.0),
    }
    results: dict[str, dict[str, object]] = {}
    with progress(total, "diff", quiet=quiet) as bar:
        if trusted:
            for folder, manifest in dict(zip(folders, manifests, strict=True)).items():  # the same folder once
                _files.audit(folder, manifest, names=trusted, done=bar.update, storage_options=opts)
        for part in parts:
            present = [bool(digests(m, part)) for m in manifests]
            entry: dict[str, object] = {"a": present[0], "b": present[1], "identical": part not in to_read}
            if part in to_read:
                if part in DOCUMENTS:
                    values = [
                        _files.read_document(f, m, part, done=bar.update, storage_options=opts)
                        for f, m in zip(folders, manifests, strict=True)
                    ]
                    changes = _value_changes(flatten(values[0]), flatten(values[1]), atol=0.0, rtol=0.0)
                    entry["count"] = len(changes)
                    entry["changes"] = changes if part == "config" else changes[:_LISTED]
                else:  # tensors: torch is imported only now, when a tree's files differ
                    from . import _trees

                    values = [
                        _trees.read_part(f, m, part, done=bar.update, storage_options=opts)
                        for f, m in zip(folders, manifests, strict=True)
                    ]
                    entry.update(_compare_part(part, values[0], values[1], atol=atol, rtol=rtol))
                del values
            results[part] = entry
    report["parts"] = results
    report["within_tolerance"] = all(
        (not r.get("count")) if p in DOCUMENTS else _part_ok(r) for p, r in results.items()
    )
    return report


def run(args: argparse.Namespace) -> int:
    parts = tuple(args.parts) if args.parts else PARTS
    report = diff(
        args.a, args.b, atol=args.atol, rtol=args.rtol, parts=parts, quiet=args.quiet, storage_options=storage_options(args)
    )
    if args.json:
        emit_json(report)
    else:
        _print(report)
    return EXIT_OK if report["within_tolerance"] else EXIT_FAILED


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _print(report: dict[str, object]) -> None:
    step = report["step"]
    assert isinstance(step, dict)
    print(f"A: {report['a']} (step {step['a']})\nB: {report['b']} (step {step['b']})")
    for change in report["metadata"]:  # type: ignore[attr-defined]
        print(f"metadata{change['path']}: {change['a']!r} -> {change['b']!r}")
    results = report["parts"]
    assert isinstance(results, dict)
    for part, entry in results.items():
        if entry["identical"]:
            print(f"{part}: {'identical (same SHA-256, verified)' if entry['a'] else 'absent in both'}")
            continue
        if not entry["a"] or not entry["b"]:
            print(f"{part}: only in {'A' if entry['a'] else 'B'}")
        if part in DOCUMENTS:
            print(f"{part}: {entry['count']} difference(s)" if entry["count"] else f"{part}: equal")
            for change in entry["changes"]:
                print(f"  {part}{change['path']}: {change['a']!r} -> {change['b']!r} ({change['change']})")
            continue
        tensors = entry["tensors"]
        differing = [t for t in tensors if not t["equal"]]
        print(f"{part}: {len(tensors)} common tensor(s), {len(differing)} differ"
              + (" (all within tolerance)" if differing and all(t["within_tolerance"] for t in differing) else ""))  # fmt: skip
        for t in entry["added"]:
            print(f"  + {t['name']}  {t['dtype']} {t['shape']}  (only in B)")
        for t in entry["removed"]:
            print(f"  - {t['name']}  {t['dtype']} {t['shape']}  (only in A)")
        for t in entry["changed"]:
            print(f"  ~ {t['name']}  {t['a']['dtype']} {t['a']['shape']} -> {t['b']['dtype']} {t['b']['shape']}")
        for t in differing:
            flag = "" if t["within_tolerance"] else "  OUT OF TOLERANCE"
            print(f"  {t['name']}  {t['dtype']} {t['shape']}  max abs {_fmt(t['max_abs'])}  max rel {_fmt(t['max_rel'])}{flag}")
        for change in entry["values"]:
            print(f"  {change['path']}: {change['a']!r} -> {change['b']!r} ({change['change']})")
    verdict = "within tolerance" if report["within_tolerance"] else "DIFFERENT beyond tolerance"
    print(f"{verdict} (atol={report['atol']}, rtol={report['rtol']})")

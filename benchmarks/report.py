"""Turn the summary of ``compare_formats.py`` into RESULTS.md and results.png."""

from __future__ import annotations

import re
from pathlib import Path

Summary = dict[str, dict[str, dict[str, float]]]
MB = 1e6

SAVE_NOTES = {
    "torch.save": ("no", "none"),
    "torch.save+fsync": ("fsync", "none"),
    "safetensors (weights)": ("no", "none"),
    "dcp.save": ("fsync", "none"),
    "safeckpt": ("fsync + atomic commit", "SHA-256"),
    "safeckpt async": ("fsync + atomic commit", "SHA-256"),
    "safeckpt (weights)": ("fsync + atomic commit", "SHA-256"),
    "safeckpt +chunks": ("fsync + atomic commit", "SHA-256 + per-chunk"),
}
PHASES = {"first": "first save of a new process", "steady": "second save of a process"}
LOAD_NOTES = {
    "torch.load": ("model + optimizer", "no"),
    "safetensors (weights)": ("model only", "no"),
    "dcp.load": ("model + optimizer", "no"),
    "safeckpt verified": ("model + optimizer", "SHA-256"),
    "safeckpt unverified": ("model + optimizer", "sizes only"),
    "safeckpt weights unverified": ("model only, of the full checkpoint", "sizes only"),
    "safeckpt (weights) unverified": ("model only", "sizes only"),
    "safeckpt (weights) verified": ("model only", "SHA-256"),
    "safeckpt verified +chunks": ("model + optimizer", "per-chunk SHA-256"),
}


def _get(summary: Summary, key: str, metric: str, stat: str = "median") -> float | None:
    row = summary.get(key, {}).get(metric)
    return None if row is None else row[stat]


def _span(summary: Summary, key: str, metric: str) -> str:
    row = summary.get(key, {}).get(metric)
    if row is None:
        return "–"
    return f"{row['median']:.3f} [{row['min']:.3f}–{row['max']:.3f}]"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / MB:,.0f}"


def _targets(summary: Summary, size: str, floor_bps: float) -> list[tuple[str, str, bool | None]]:
    def t(op: str, kind: str, metric: str = "seconds") -> float | None:
        return _get(summary, f"{size} / {op} / {kind}", metric)

    state = t("save-first", "safeckpt", "state_bytes") or 0.0
    disk = t("save-first", "safeckpt", "disk_bytes") or 0.0
    rows: list[tuple[str, str, bool | None]] = []

    def check(name: str, value: float | None, limit: float | None, text: str) -> None:
        ok = None if value is None or limit is None else value <= limit
        rows.append((name, text if value is not None and limit is not None else "not measured", ok))

    for phase, kind in (("first", "safeckpt"), ("steady", "safeckpt"), ("first", "safeckpt +chunks"),
                        ("steady", "safeckpt +chunks")):  # fmt: skip
        save, base = t(f"save-{phase}", kind), t(f"save-{phase}", "torch.save")
        check(f"Durable save ≤ 1.0× torch.save ({kind}, {PHASES[phase]})", save, base and 1.0 * base,
              f"{_ratio(save, base)} ({save or 0:.3f} s vs {base or 0:.3f} s)")  # fmt: skip
    for phase in ("first", "steady"):
        blocked, base = t(f"save-{phase}", "safeckpt async", "blocking_s"), t(f"save-{phase}", "torch.save")
        check(f"Async blocking ≤ 0.15× torch.save ({PHASES[phase]})", blocked, base and 0.15 * base,
              f"{_ratio(blocked, base)} ({blocked or 0:.3f} s vs {base or 0:.3f} s)")  # fmt: skip
    for cache in ("cached", "cold"):
        for kind in ("safeckpt verified", "safeckpt verified +chunks"):
            load, ref = t(f"load-{cache}", kind), t(f"load-{cache}", "torch.load")
            check(f"Verified load ≤ 0.5× torch.load+load_state_dict ({kind}, {cache})", load, ref and 0.5 * ref,
                  f"{_ratio(load, ref)} ({load or 0:.3f} s vs {ref or 0:.3f} s)")  # fmt: skip
            floor = disk / floor_bps if floor_bps else None
            check(f"Verified load ≤ 1.5× SHA-256 floor ({kind}, {cache})", load, floor and 1.5 * floor,
                  f"{_ratio(load, floor)} of the floor {floor or 0:.3f} s")  # fmt: skip
        st = t(f"load-{cache}", "safetensors (weights)")
        for kind, what in (("safeckpt (weights) unverified", "weights-only checkpoint"),
                           ("safeckpt weights unverified", "model of a full checkpoint")):  # fmt: skip
            weights = t(f"load-{cache}", kind)
            check(f"Unverified weights-only load ≤ safetensors load_file ({what}, {cache})", weights, st,
                  f"{_ratio(weights, st)} ({weights or 0:.3f} s vs {st or 0:.3f} s)")  # fmt: skip
    rss = t("save-first", "safeckpt", "rss_delta")
    check("Peak RSS during save ≤ state + 10% + 64 MB", rss, 0.1 * state + 64 * 2**20,
          f"+{_mb(rss)} MB over the {_mb(state)} MB state (limit +{_mb(0.1 * state + 64 * 2**20)} MB)")  # fmt: skip
    rss = t("load-cached", "safeckpt verified", "rss_delta")
    check("Peak RSS during verified load ≤ 1.2× state", rss, 1.2 * state,
          f"+{_mb(rss)} MB = {_ratio(rss, state)} the state")  # fmt: skip
    return rows


OTHER_SECTIONS = re.compile(r"^<!-- [a-z]+:begin -->$", re.MULTILINE)
"""Where the sections other benchmarks write (``distributed.py``, ``remote.py``) start."""


def _other_sections(path: Path) -> str:
    """Everything from the first ``<!-- NAME:begin -->`` marker of the existing ``path`` on: the
    other benchmarks' sections, which this report keeps as they are instead of dropping them."""
    text = path.read_text() if path.exists() else ""
    match = OTHER_SECTIONS.search(text)
    return "" if match is None else "\n" + text[match.start() :]


def write_markdown(path: Path, meta: dict[str, object], summary: Summary) -> None:
    floor_core = _get(summary, "floor", "sha256_core_Bps") or 0.0
    floor_all = _get(summary, "floor", "sha256_all_Bps") or 0.0
    caches: list[str] = meta["caches"]  # type: ignore[assignment]
    lines = [
        "# safeckpt vs torch.save, safetensors and torch.distributed.checkpoint",
        "",
        f"Command: `{meta['command']}` ({meta['wall_seconds']:.0f} s). Date: {meta['date']}.",
        f"Machine: {meta['machine']}. Python {meta['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())  # type: ignore[attr-defined]
        + f". Load average before/after: {meta['load_average']}.",
        "",
        f"Every figure is the median [min–max] of {meta['repeats']} runs, each in a new process "
        "(forked from a server that imported everything once, so no figure includes imports); "
        "methods run round-robin. Times in seconds. State = model parameters + AdamW moments "
        "(float32). Peak RSS Δ = the child's ru_maxrss (reset after building the state) minus its "
        "RSS after building the state. Loads restore into a freshly built model and optimizer "
        "(load-to-usable-state); *cached* = files in the page cache, *cold* = evicted with "
        "`posix_fadvise(DONTNEED)` first (the VM's host may still cache them). torch.save, "
        "safetensors and the ratios against them do not fsync; torch.save+fsync is the durable "
        "baseline. SHA-256 floor on this machine: "
        f"{floor_core / 1e9:.2f} GB/s per core, {floor_all / 1e9:.2f} GB/s on all cores.",
        "",
    ]
    for size in meta["sizes"]:  # type: ignore[attr-defined]
        state = _get(summary, f"{size} / save-first / safeckpt", "state_bytes")
        lines += [f"## {size} (state {_mb(state)} MB)", ""]
        for phase in ("first", "steady"):
            lines += [f"### Save: {PHASES[phase]}", ""]
            lines += [
                "| Method | Durable | Hash | Time to commit (s) | Blocks caller (s) | × torch.save | × torch.save+fsync | Peak RSS Δ (MB) | On disk (MB) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            base = _get(summary, f"{size} / save-{phase} / torch.save", "seconds")
            durable = _get(summary, f"{size} / save-{phase} / torch.save+fsync", "seconds")
            for kind, (sync, hashed) in SAVE_NOTES.items():
                key = f"{size} / save-{phase} / {kind}"
                if key not in summary:
                    continue
                seconds = _get(summary, key, "seconds")
                blocking = "blocking_s" if "blocking_s" in summary[key] else "seconds"
                lines.append(
                    f"| {kind} | {sync} | {hashed} | {_span(summary, key, 'seconds')} | "
                    f"{_span(summary, key, blocking)} | {_ratio(_get(summary, key, blocking), base)} | "
                    f"{_ratio(seconds, durable)} | {_mb(_get(summary, key, 'rss_delta'))} | "
                    f"{_mb(_get(summary, key, 'disk_bytes'))} |"
                )
            lines.append("")
        lines += ["### Load into a fresh model and optimizer", ""]
        header = "| Method | Restores | Verifies |"
        rule = "|---|---|---|"
        for cache in caches:
            header += f" {cache} (s) | × torch.load ({cache}) |"
            rule += "---|---|"
        lines += [header + " Peak RSS Δ (MB) |", rule + "---|"]
        for kind, (restores, verifies) in LOAD_NOTES.items():
            line = f"| {kind} | {restores} | {verifies} |"
            for cache in caches:
                key = f"{size} / load-{cache} / {kind}"
                ref = _get(summary, f"{size} / load-{cache} / torch.load", "seconds")
                line += f" {_span(summary, key, 'seconds')} | {_ratio(_get(summary, key, 'seconds'), ref)} |"
            lines.append(line + f" {_mb(_get(summary, f'{size} / load-{caches[0]} / {kind}', 'rss_delta'))} |")
        lines.append("")
    sizes: list[str] = meta["sizes"]  # type: ignore[assignment]
    target_size = "1GB" if "1GB" in sizes else sizes[-1]
    lines += [f"## Targets at {target_size}", "", "| Target | Measured | Met |", "|---|---|---|"]
    for name, text, ok in _targets(summary, str(target_size), floor_all):
        lines.append(f"| {name} | {text} | {'–' if ok is None else 'yes' if ok else '**no**'} |")
    path.write_text("\n".join(lines) + "\n" + _other_sections(path))


def write_chart(path: Path, meta: dict[str, object], summary: Summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes: list[str] = meta["sizes"]  # type: ignore[assignment]
    caches: list[str] = meta["caches"]  # type: ignore[assignment]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        ax = axes[0][column]
        kinds = [k for k in SAVE_NOTES if f"{size} / save-first / {k}" in summary]
        bars = [("first", "seconds", "tab:blue", "first save"), ("steady", "seconds", "tab:cyan", "second save"),
                ("first", "blocking_s", "tab:orange", "async: blocks caller (first)"),
                ("steady", "blocking_s", "tab:red", "async: blocks caller (second)")]  # fmt: skip
        for y, kind in enumerate(kinds):
            shown = [b for b in bars if b[1] in summary.get(f"{size} / save-{b[0]} / {kind}", {})]
            height = 0.8 / len(shown)
            for i, (phase, metric, color, label) in enumerate(shown):
                m = summary[f"{size} / save-{phase} / {kind}"][metric]
                ax.barh(y - 0.4 + height * (i + 0.5), m["median"], height=height, color=color,
                        xerr=[[m["median"] - m["min"]], [m["max"] - m["median"]]], capsize=2, label=label)  # fmt: skip
        ax.set_yticks(range(len(kinds)), kinds)
        ax.invert_yaxis()
        ax.set_title(f"save, {size}")
        ax.set_xlabel("seconds (median, min–max)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right", framealpha=0.6)
        ax = axes[1][column]
        kinds = list(LOAD_NOTES)
        width = 0.8 / len(caches)
        for c, cache in enumerate(caches):
            for y, kind in enumerate(kinds):
                key = f"{size} / load-{cache} / {kind}"
                if key not in summary:
                    continue
                m = summary[key]["seconds"]
                ax.barh(y - 0.4 + width * (c + 0.5), m["median"], height=width, color=f"C{c + 2}",
                        xerr=[[m["median"] - m["min"]], [m["max"] - m["median"]]], capsize=3,
                        label=cache if y == 0 else None)  # fmt: skip
        ax.set_yticks(range(len(kinds)), kinds)
        ax.invert_yaxis()
        ax.set_title(f"load into model + optimizer, {size}")
        ax.set_xlabel("seconds (median, min–max)")
        ax.legend(fontsize=8)
    fig.suptitle(f"safeckpt vs other formats ({meta['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Tuning knobs of the storage code: sizes of pieces, chunks and batches, and core counts.

One mutable :data:`TUNING` object rather than module constants, so benchmarks and tests change
a knob in one place (``monkeypatch.setattr(TUNING, "piece", 64)``) and every module that reads it
sees the change. None of these change what is written, only how: a file saved with any setting
reads with any other (chunk sizes are recorded in the manifest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["TUNING", "Tuning", "cores"]


@dataclass
class Tuning:
    """The knobs; defaults measured on the benchmark machine (benchmarks/RESULTS.md)."""

    piece: int = 8 * 1024 * 1024
    """Bytes hashed on a helper thread while the calling thread writes or reads the next piece."""
    inline: int = 1024 * 1024
    """Files whose pieces are all this small are hashed on the calling thread: a hand-off costs more."""
    writeback: int = 32 * 1024 * 1024
    """Start writing dirty pages to disk every this many bytes, so the final fsync waits less."""
    min_chunk: int = 16 * 1024 * 1024
    """Smallest chunk a writer digests separately (a power of two; see ``hashing.chunk_size``)."""
    max_chunks: int = 1024
    """Most chunk digests per file (keeps the manifest small)."""
    min_cores_for_chunks: int = 4
    """Fewer usable cores than this: no chunk digests (the second hashing thread would compete)."""
    open_at_once: int = 64
    """Files a read holds open at a time (a manifest may list thousands)."""
    cached_piece: int = 1024 * 1024
    """Bytes a chunk is read and hashed in, so the hash reads them while they are in the cache."""
    ahead: int = 4
    """Pieces handed to a hashing thread and not yet hashed, at most (bounds staged copies in use)."""
    cores: int | None = None
    """Usable cores; None: what the scheduler allows this process (see :func:`cores`)."""


TUNING = Tuning()


def cores() -> int:
    """Cores this process may run on (``TUNING.cores`` when set)."""
    if TUNING.cores is not None:
        return TUNING.cores
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

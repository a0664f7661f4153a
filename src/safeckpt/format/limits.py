"""Bounds every reader enforces before trusting a checkpoint's bytes.

They exist so that a hostile or damaged checkpoint fails fast with a
:class:`~safeckpt.errors.CheckpointCorruptedError` instead of exhausting memory or time.
``spec/FORMAT.md`` lists the same numbers; a reader in another language should use them too.
"""

from __future__ import annotations

import re

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""``manifest.json`` larger than this is rejected before it is parsed."""

MAX_FILES = 4096
"""Most files one manifest may list."""

MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 2**40
"""Bounds of a manifest's ``chunks.size`` (which must also be a power of two)."""

MAX_FILE_NAME_LENGTH = 128
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Allowed names of files inside a checkpoint folder: no separators, no leading dot."""

MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
"""Same bound as the safetensors library itself."""

MAX_TENSORS_PER_FILE = 1_000_000
MAX_TENSOR_NDIM = 64

MAX_DOCUMENT_BYTES = 512 * 1024 * 1024
"""Largest msgpack structure document a reader accepts (``bytes`` leaves may be large)."""

MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest ``config.json`` / ``vocab.json`` (and JSON inside metadata) a reader accepts. JSON
grows up to ~20-fold when parsed into Python objects, hence a tighter bound than msgpack's."""

MAX_DOCUMENT_ITEMS = 10_000_000
"""Most list elements plus map entries in one msgpack or JSON document (counted while
decoding; for JSON, every ``[`` and ``{`` counts as one). Bounds memory: one byte of msgpack can
otherwise become a 64-byte Python dict."""

MAX_STEP = 2**63 - 1
"""Largest training step a manifest may record."""

MAX_NESTING_DEPTH = 64
"""Deepest nesting of containers in a JSON document, and of containers (list, tuple, dict) in a
decoded structure tree."""

MAX_MSGPACK_DEPTH = 3 * MAX_NESTING_DEPTH + 2
"""Deepest raw nesting of msgpack maps and arrays in a structure document. Each tree level costs
up to three raw levels (a dict is a tag map, an array and a ``[key, value]`` pair), so a tree
``MAX_NESTING_DEPTH`` deep, which the writer allows, stays within this bound."""

ALIGN = 64
"""Alignment, in bytes, of an archive's data section and of its 64-byte-multiple tensors (the
alignment of torch's CPU allocations, which tensors handed to optimizers must match); readers
move tensors to ``ALIGN``-byte addresses into room left after the file."""

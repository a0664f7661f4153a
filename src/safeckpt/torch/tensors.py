"""Torch tensors <-> safetensors archives: validation, sharing, zero-copy bytes.

:class:`TensorCollector` collects the tensors of one state tree before anything is written,
rejecting layouts the format cannot hold (sparse, quantized, meta, unsupported dtypes) with the
key path of the offender, and storing a tensor referenced several times (tied weights, the
same view twice) once. :func:`archive_parts` streams an archive straight from tensor memory;
:func:`tensors_from_buffer` builds tensors over a verified buffer without copying.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Mapping

import torch

from ..errors import UnsupportedValueError
from ..format.limits import ALIGN
from ..format.safetensors import DTYPE_SIZES, METADATA_KEY, TensorInfo, build_header, parse_header
from ..format.tree import key_path
from ..storage.base import Buffer, ReadArena

__all__ = ["TensorCollector", "archive_parts", "tensor_memory", "tensors_from_buffer"]

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("safeckpt stores tensors little-endian and supports little-endian hosts only")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
assert set(TORCH_DTYPES) == set(DTYPE_SIZES)


def _identity(t: torch.Tensor) -> tuple[object, ...]:
    """Two tensors with equal identity are the same view of the same memory."""
    if t.numel() == 0:  # empty tensors share a null data pointer: never treat them as aliases
        return (id(t),)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, t.shape, t.stride())


class TensorCollector:
    """The tensors of one archive, collected (and validated) while a state tree is encoded."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[tuple[object, ...], str] = {}

    def check(self, tensor: torch.Tensor, where: str) -> None:
        """Raise :class:`UnsupportedValueError` if ``tensor`` cannot be stored."""
        problem = None
        if tensor.layout != torch.strided:
            problem = f"has layout {tensor.layout}; convert it with .to_dense()"
        elif tensor.is_quantized:
            problem = "is quantized; store .int_repr() and its scale/zero_point instead"
        elif tensor.is_nested:
            problem = "is a nested tensor; store its components instead"
        elif tensor.device.type == "meta":
            problem = "is on the meta device and has no data"
        elif tensor.dtype not in DTYPE_NAMES:
            problem = f"has dtype {tensor.dtype}, which the format does not store"
        elif type(tensor) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
            problem = f"is a tensor subclass ({type(tensor).__qualname__}); store a plain tensor"
        if problem:
            raise UnsupportedValueError(f"{self.label}{where}: tensor {problem}")

    def add(self, tensor: object, path: tuple[object, ...]) -> str:
        """Register ``tensor`` found at ``path``; returns the name it is stored under."""
        assert isinstance(tensor, torch.Tensor)
        self.check(tensor, key_path(path))
        identity = _identity(tensor)
        if identity in self._names:
            return self._names[identity]
        name = ".".join(str(p) for p in path) or "tensor"
        base, n = name, 1
        while name in self.tensors or name == METADATA_KEY:  # safetensors reserves __metadata__
            name, n = f"{base}~{n}", n + 1
        self.tensors[name] = tensor
        self._names[identity] = name
        return name

    def add_named(self, name: str, tensor: torch.Tensor) -> str:
        """Register a tensor under a fixed name (a model state-dict key); returns the stored name
        (another key's name when ``tensor`` aliases a tensor already registered)."""
        self.check(tensor, f"[{name!r}]")
        if name == METADATA_KEY:
            raise UnsupportedValueError(
                f"{self.label}[{name!r}]: the name {METADATA_KEY} is reserved by the safetensors "
                "format for its metadata; rename this key"
            )
        identity = _identity(tensor)
        if identity in self._names:
            return self._names[identity]
        self.tensors[name] = tensor
        self._names[identity] = name
        return name

    def snapshot(self, reuse: Mapping[str, torch.Tensor] | None = None) -> None:
        """Copy every tensor to contiguous CPU memory owned by the archive (for saves that outlive
        the call). Tensors of ``reuse`` (an earlier snapshot no longer in use) with the same name,
        shape and dtype are overwritten instead of allocating: no new pages to fault in."""
        copies = {}
        for name, tensor in self.tensors.items():
            old = (reuse or {}).get(name)
            if old is None or old.shape != tensor.shape or old.dtype != tensor.dtype:
                old = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            copies[name] = old.copy_(tensor.detach())
        self.tensors = copies


_STAGE = 16 * 1024 * 1024
"""Largest piece of a GPU or non-contiguous tensor staged in CPU memory at a time when saving."""


def tensor_memory(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's own memory as a writable byte view (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:
        # torch calls a one-element tensor contiguous whatever its stride (e.g. x[::2] of a
        # 2-element x), but view(uint8) demands stride 1: same element, stride 1.
        flat = flat.as_strided((1,), (1,))
    if flat.device.type != "cpu":  # pragma: no cover - callers stage other devices first
        raise ValueError("tensor_memory needs a CPU tensor")
    # A ctypes array over the tensor's memory (no numpy: the core install has none). The array
    # holds the tensor, and the memoryview holds the array, so the memory outlives every use.
    raw = (ctypes.c_ubyte * flat.nbytes).from_address(flat.data_ptr())
    raw._owner = flat  # type: ignore[attr-defined]
    return memoryview(raw).cast("B")


def _tensor_bytes(tensor: torch.Tensor) -> Iterator[memoryview]:
    """A tensor's bytes in row-major order: the tensor's own memory when it is a contiguous CPU
    tensor, otherwise copies of slices of at most ``_STAGE`` bytes (whole rows along dim 0), so
    saving a GPU or non-contiguous tensor never holds a second copy of all of it."""
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        yield tensor_memory(t)
        return
    if t.dim() == 0 or t.nbytes <= _STAGE:
        yield tensor_memory(t.to("cpu").contiguous())
        return
    rows = max(1, _STAGE // (t[0].numel() * t.element_size() or 1))
    for start in range(0, t.shape[0], rows):
        yield tensor_memory(t[start : start + rows].to("cpu").contiguous())


def archive_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Iterator[memoryview | bytes]:
    """The archive as a sequence of buffers: the header, then each tensor's bytes in order.

    Contiguous CPU tensors are written from their own memory; GPU and non-contiguous ones are
    staged in CPU memory a slice of at most 16 MiB at a time.
    """
    # Sizes that are multiples of 64 first: after the 64-byte aligned header they all start on
    # 64-byte boundaries, where a loader can use them in place (see _aligned_bytes).
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGN != 0, -tensors[n].element_size(), n))
    header, _ = build_header(
        [(n, DTYPE_NAMES[tensors[n].dtype], tuple(tensors[n].shape)) for n in order], metadata
    )
    yield header
    for name in order:
        yield from _tensor_bytes(tensors[name])


def tensors_from_buffer(
    buffer: Buffer, *, source: str, device: torch.device | str = "cpu", aligned: bool = False, copy: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a verified archive; tensors on CPU are views of ``buffer`` (no copy).

    With ``aligned``, every CPU tensor starts on a 64-byte boundary, like torch's own
    allocations (some kernels, e.g. the dot products of LBFGS, round differently otherwise):
    tensors are moved in place into the room a verified read leaves after an archive
    (:class:`~safeckpt.storage.base.ReadArena`), and only those that do not fit there are copied. With ``copy``, CPU tensors are
    copies in torch's own (aligned) memory instead of views: for state that is restored into a
    live object and must not stay backed by a memory-mapped file.
    """
    infos, metadata = parse_header(buffer, source=source)
    on_cpu = torch.device(device).type == "cpu"
    if aligned and on_cpu and not copy:
        raw = _aligned_bytes(buffer, infos)
    else:
        raw = _view_bytes(buffer, infos, copy=copy and on_cpu)
    out = {}
    for info in infos:
        dtype = TORCH_DTYPES[info.dtype]
        tensor = raw[info.name].view(dtype).reshape(info.shape) if info.name in raw else torch.empty(info.shape, dtype=dtype)
        out[info.name] = tensor.to(device)
    return out, metadata


def _region(owner: object, offset: int, size: int) -> torch.Tensor:
    """``size`` bytes of ``owner`` as a tensor with its own storage (so ``torch.save`` of tensors
    of different dtypes from one file still works); keeps ``owner`` alive."""
    return torch.frombuffer(owner, dtype=torch.uint8, offset=offset, count=size)


def _view_bytes(buffer: Buffer, infos: list[TensorInfo], *, copy: bool = False) -> dict[str, torch.Tensor]:
    """Each non-empty tensor's bytes as a view of ``buffer``; copied if ``copy`` or if not aligned
    to its element size (never the case for files safeckpt wrote)."""
    out = {}
    for info in infos:
        if info.end > info.begin:
            view = _region(buffer, info.begin, info.end - info.begin)
            out[info.name] = view.clone() if copy or info.begin % DTYPE_SIZES[info.dtype] else view
    return out


def _aligned_bytes(buffer: Buffer, infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """Each non-empty tensor's bytes at a ``ALIGN``-byte aligned address.

    Tensors already aligned stay where they are as long as every tensor before them is aligned
    too (in files safeckpt writes, all but a few small ones at the end). The rest are moved
    towards the end of the buffer's room, last first, so a move only ever overwrites bytes
    already moved away; when the room runs out the rest are copied instead.
    """
    view = memoryview(buffer)
    if not len(view):
        return {}
    room = ReadArena.spare_room(view)
    owner = view.obj if room else view
    base = _region(owner, 0, 1).data_ptr()
    limit = len(view) + room
    out = {}
    ordered = sorted((i for i in infos if i.end > i.begin), key=lambda i: i.begin)
    settled = next((n for n, i in enumerate(ordered) if (base + i.begin) % ALIGN), len(ordered))
    for info in ordered[:settled]:
        out[info.name] = _region(owner, info.begin, info.end - info.begin)
    for info in reversed(ordered[settled:]):
        size = info.end - info.begin
        target = (base + limit - size) // ALIGN * ALIGN - base
        if room and target >= info.begin:
            if target != info.begin:
                ctypes.memmove(base + target, base + info.begin, size)
            out[info.name] = _region(owner, target, size)
            limit = target
        elif (base + info.begin) % ALIGN == 0:
            out[info.name] = _region(owner, info.begin, size)
            limit = info.begin
        else:  # copy now, before a later move can overwrite these bytes
            out[info.name] = _region(owner, info.begin, size).clone()
    return out

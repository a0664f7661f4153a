"""Torch tensors <-> safetensors archives: validation, sharing, zero-copy bytes.

:class:`TensorArchive` collects the tensors of one state tree before anything is written,
rejecting layouts the format cannot hold (sparse, quantized, meta, unsupported dtypes) with the
key path of the offender, and storing a tensor referenced several times (tied weights, the
same view twice) once. :func:`archive_parts` streams an archive straight from tensor memory;
:func:`tensors_from_buffer` builds tensors over a verified buffer without copying.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from .archive import DTYPE_SIZES, METADATA_KEY, build_header, parse_header
from .errors import UnsupportedValueError
from .tree import key_path

__all__ = ["TensorArchive", "archive_parts", "tensors_from_buffer"]

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


class TensorArchive:
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

    def snapshot(self) -> None:
        """Copy every tensor to CPU memory owned by the archive (for saves that outlive the call)."""
        self.tensors = {
            k: t.detach().to("cpu", copy=True).contiguous() for k, t in self.tensors.items()
        }


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def archive_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Iterator[memoryview | bytes]:
    """The archive as a sequence of buffers: the header, then each tensor's bytes in order.

    Tensors are copied to CPU and made contiguous one at a time, so at most one extra tensor
    is alive while writing a GPU or non-contiguous state.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, _ = build_header(
        [(n, DTYPE_NAMES[tensors[n].dtype], tuple(tensors[n].shape)) for n in order], metadata
    )
    yield header
    for name in order:
        yield _raw_bytes(tensors[name])


def tensors_from_buffer(
    buffer: bytearray, *, source: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a verified archive; tensors on CPU are views of ``buffer`` (no copy)."""
    infos, metadata = parse_header(buffer, source=source)
    out = {}
    for info in infos:
        dtype = TORCH_DTYPES[info.dtype]
        if info.end == info.begin:
            tensor = torch.empty(info.shape, dtype=dtype)
        else:
            raw = torch.frombuffer(buffer, dtype=torch.uint8, offset=info.begin, count=info.end - info.begin)
            if info.begin % DTYPE_SIZES[info.dtype]:
                raw = raw.clone()  # misaligned (not written by safeckpt): copy to aligned memory
            tensor = raw.view(dtype).reshape(info.shape)
        out[info.name] = tensor.to(device)
    return out, metadata

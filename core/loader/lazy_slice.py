"""A checkpoint tensor that reads from its memory-mapped safetensors file only what is used.

Tensor-parallel ranks hand `LazySlice`s to the layers' weight loaders instead of tensors: a
loader's `narrow(dim, start, length)` (what `linear._rank_slice` and the vocab-parallel
embedding do) only narrows the window, and the bytes are read when the window is used as a
tensor (`copy_`, `.float()`, `.t()`, ...), through safetensors' `get_slice`. So a rank reads its
own rows or columns of a weight and never materialises the whole of it. Loaders that need the
whole tensor (replicated norms, biases of row-parallel layers, quantizer scales) still get it:
any tensor use outside `narrow`/`shape`/`dim`/`size`/`dtype` materialises the current window.

Every materialisation is counted in `reads` (name, window), which the tests use to check that
each rank read exactly its shard and nothing twice.
"""
from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class LazySlice:
    """A window (one (start, stop) per axis) of tensor `name` in an open `safe_open` handle."""

    def __init__(self, handle: Any, name: str, window: tuple[tuple[int, int], ...] | None = None,
                 reads: list[tuple[str, tuple[tuple[int, int], ...]]] | None = None) -> None:
        self._slice = handle.get_slice(name)
        self.name = name
        shape = self._slice.get_shape()
        self.window = window if window is not None else tuple((0, n) for n in shape)
        self.dtype = _DTYPES.get(self._slice.get_dtype())
        self.reads = reads if reads is not None else []
        self._handle = handle

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self.window)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.window)

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        dim = dim % self.dim()
        lo, hi = self.window[dim]
        if start < 0 or length < 0 or lo + start + length > hi:
            raise ValueError(f"narrow({dim}, {start}, {length}) is outside {self.name} of shape {tuple(self.shape)}")
        window = (*self.window[:dim], (lo + start, lo + start + length), *self.window[dim + 1:])
        return LazySlice(self._handle, self.name, window, self.reads)

    def t(self) -> TransposedSlice:
        """The 2-D window transposed, still lazy (Conv1D checkpoints store W as [in, out])."""
        return TransposedSlice(self)

    def materialize(self) -> torch.Tensor:
        self.reads.append((self.name, self.window))
        if not self.window:  # a scalar
            return self._handle.get_tensor(self.name)
        return self._slice[tuple(slice(lo, hi) for lo, hi in self.window)]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __getattr__(self, attr: str) -> Any:  # any other tensor method: on the materialised window
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.materialize(), attr)

    def __repr__(self) -> str:
        return f"LazySlice({self.name!r}, window={self.window})"


class TransposedSlice:
    """A `LazySlice` seen transposed: `narrow` on one axis narrows the other axis of the window,
    so a loader slicing the transposed weight still reads only its rows or columns."""

    def __init__(self, inner: LazySlice) -> None:
        if inner.dim() != 2:
            raise ValueError(f"t() expects a 2-D tensor, {inner.name} has {inner.dim()} axes")
        self.inner = inner
        self.dtype = inner.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(reversed(self.inner.shape))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> TransposedSlice:
        return TransposedSlice(self.inner.narrow(1 - dim % 2, start, length))

    def t(self) -> LazySlice:
        return self.inner

    def materialize(self) -> torch.Tensor:
        return self.inner.materialize().t()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.materialize(), attr)


def _materialized(value: Any) -> Any:
    if isinstance(value, (LazySlice, TransposedSlice)):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialized(v) for k, v in value.items()}
    return value


def materialize(value: torch.Tensor | LazySlice | TransposedSlice) -> torch.Tensor:
    """The tensor itself, or the window's values read from the file."""
    return value.materialize() if isinstance(value, (LazySlice, TransposedSlice)) else value


def iterate_safetensor_slices(path: Any, reads: list | None = None) -> Any:
    """(name, LazySlice) for every tensor of the checkpoint (the tensor-parallel counterpart of
    `files.iterate_safetensors`); `reads` collects what the loaders materialised."""
    from pathlib import Path

    from safetensors import safe_open

    from textgen.core.loader.files import safetensors_files

    reads = reads if reads is not None else []
    for file in safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, LazySlice(f, name, reads=reads)

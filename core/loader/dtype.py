"""Choosing the compute dtype from the --dtype flag, the checkpoint and the backend."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from textgen.core.backend import Backend

_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HALF = (torch.float16, torch.bfloat16)


def checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    """The dtype the checkpoint says it is stored in: `dtype` (transformers 5) or `torch_dtype`."""
    raw = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    if isinstance(raw, str):
        return _NAMES.get(raw.removeprefix("torch."))
    return None


def resolve_dtype(requested: str, hf_config: Any, backend: Backend) -> torch.dtype:
    """`requested` is a dtype name or "auto".

    auto = the backend's default dtype (falling back to float32 when the backend does not list
    its own default as supported), except that when that default is a half type and the
    checkpoint is stored in the *other* supported half type, the checkpoint's is kept:
    converting bf16 to fp16 can overflow and fp16 to bf16 loses mantissa. A half checkpoint on a
    backend whose default is float32 (an AVX2 CPU) is upcast: it runs faster and more exactly.
    An explicit name must be one the backend supports.
    """
    supported = tuple(backend.supported_dtypes())
    name = (requested or "auto").lower()
    if name != "auto":
        if name not in _NAMES:
            raise ValueError(f"unknown dtype {requested!r}: use auto, float32, bfloat16 or float16")
        dtype = _NAMES[name]
        if dtype not in supported:
            raise ValueError(f"backend '{backend.name}' does not support {dtype}; supported: "
                             f"{', '.join(str(d).removeprefix('torch.') for d in supported)}")
        return dtype
    default = backend.default_dtype()
    if default not in supported:
        default = torch.float32
    stored = checkpoint_dtype(hf_config)
    if default in _HALF and stored in _HALF and stored != default and stored in supported:
        return stored
    return default


KV_CACHE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(requested: str | None) -> torch.dtype | None:
    """TGI's `--kv-cache-dtype` (fp8_e4m3fn, fp8_e5m2); None for auto (the model dtype)."""
    name = (requested or "auto").lower()
    if name == "auto":
        return None
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {requested!r}: use auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]

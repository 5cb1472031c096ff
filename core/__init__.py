"""textgen.core: the device-agnostic heart of textgen.

Interfaces a backend implements (Backend, AttentionBackend with its metadata builder, quantization
methods, GraphRunner, Communicator) and the Model interface; the pluggy hook specs; model
implementations, weight loading, the KV block manager (core/kv_cache: block ids only, the tensor
layout belongs to the kernel), the scheduler, sampling and grammar.

Importing this package stays light (no torch import) so `textgen backends` and plugin discovery
are fast; heavy objects are imported lazily through `__getattr__`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The backend contract's version (hook specs and the interfaces above). MAJOR changes when a call
# a plugin relies on changes or disappears; MINOR when core calls something new that has a
# default. A plugin may check it at import: `textgen.core.CONTRACT_VERSION[0] == 2`.
CONTRACT_VERSION = (2, 1)  # 2.1: textgen_owned_cache_runner

_LAZY = {
    "LLM": "textgen.core.llm",
    "AsyncEngine": "textgen.core.engine.async_engine",
    "SamplingParams": "textgen.core.sampling_params",
}

if TYPE_CHECKING:
    from textgen.core.engine.async_engine import AsyncEngine
    from textgen.core.llm import LLM
    from textgen.core.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'textgen.core' has no attribute {name!r}")


__all__ = ["CONTRACT_VERSION", "LLM", "AsyncEngine", "SamplingParams", "__version__"]

"""The pluggy hook specifications a textgen backend plugin implements.

A backend plugin is a module (or object) registered under the `textgen.backends` entry point
group. It implements some of the hooks below with `@hookimpl`. Every hook is called with keyword
arguments. Hooks must stay cheap and must never import a vendor SDK at module import time: class
paths are strings, resolved only once the backend has been chosen.

Ordering contract (`textgen.core.engine.setup.build_engine_parts`; version
`textgen.core.CONTRACT_VERSION`):
1. `textgen_add_cli_options` when `textgen serve` builds its parser (flags land in config.extra).
2. `textgen_probe_backend` is called on every registered plugin (never initializing a device).
3. One backend is selected (`PluginManager.select`); all other backend plugins are unregistered,
   so the remaining hooks are answered by the chosen plugin (plus non-backend plugins such as
   model-architecture providers). Its `Backend` class is instantiated once.
4. `textgen_configure` may adjust or refuse the engine config (reasons: exit 2); then
   `textgen_owned_cache_runner` may hand over a runner that owns its KV cache, which skips 5-6.
5. `textgen_attention_backends`, `textgen_model_architectures` and `textgen_quantizers` are
   called once each; the model is built and loaded (through the chosen quantization method), then
   the kernel is negotiated over the model's per-layer specs (`textgen.core.attention_selection`).
6. Then the Backend's own methods, in order: memory profile, KV cache allocation, graph rule
   (see `textgen.core.backend.Backend`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from textgen.core.backend import Backend, BackendCandidate
    from textgen.core.config import EngineConfig
    from textgen.core.engine.owned_cache import OwnedCacheRunner
    from textgen.core.registry import AttentionBackendInfo, QuantizerInfo

PROJECT_NAME = "textgen"
ENTRY_POINT_GROUP = "textgen.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate | None:
    """Say whether this plugin's device can run here.

    Return a `BackendCandidate` (available or not, with a reason that names the exact missing
    package, device or driver when unavailable, or the device detail when available), or None
    when the plugin provides no backend. Must never initialize a device or allocate memory on it:
    only look at installed packages, device files and driver-reported counts.
    """


@hookspec
def textgen_configure(config: EngineConfig, backend: Backend) -> list[str] | None:
    """Adjust `config` in place for the chosen backend (block size, dtype, graphs).

    Return a list of reasons the config cannot run on this backend (empty or None when fine);
    the engine refuses to start and prints them.
    """


@hookspec
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    """Attention kernels this backend offers, each with a priority and a lazy class path. The
    highest-priority kernel whose `check` accepts every layer of the model serves it; a kernel's
    declared block sizes choose the block size when the user gave none."""


@hookspec
def textgen_quantizers(backend: Backend) -> list[QuantizerInfo]:
    """Quantization methods this backend runs, keyed by Hugging Face `quant_method` name (and
    textgen's own `int8` / `int4`), each with the `WeightKernels` that compute with it.

    Called once at startup after the backend is chosen; the model loader picks the method named
    by `--quantize` (TGI's names: `bitsandbytes-nf4` -> `bitsandbytes`, ...) or by the
    checkpoint's `quantization_config.quant_method`; a method missing here is refused at startup
    with the reason. `textgen.core.quantization.catalog.builtin_quantizers(kernels)` lists the
    built-in formats for a backend that brings its own kernels. Later plugins override earlier
    entries of the same name."""


@hookspec
def textgen_model_architectures() -> dict[str, str]:
    """Extra or overriding model classes: HF architecture name -> "module:Class" path."""


@hookspec(firstresult=True)
def textgen_owned_cache_runner(config: EngineConfig, backend: Backend) -> OwnedCacheRunner | None:
    """A runner whose compiled model keeps its own KV cache (`textgen.core.engine.owned_cache`),
    or None to run textgen's own model over the paged cache. Called once after
    `textgen_configure`; the first non-None answer is used, and the engine then allocates no KV
    blocks and negotiates no attention kernel. Raise `ValueError` with the reason when the
    backend's runner is wanted but cannot be built."""


@hookspec
def textgen_add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add backend-specific flags to the `textgen serve` parser."""


def _all_specs() -> Any:
    import sys

    return sys.modules[__name__]

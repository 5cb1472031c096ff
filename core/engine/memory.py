"""The memory profile run that KV cache sizing is based on.

After the weights are loaded the runner executes the largest step the budgets allow (a forward at
`max_batch_prefill_tokens`, then logits and sampling for `max_batch_size` rows) while the backend
measures its peak; the KV cache then gets what the backend's rule leaves
(`Backend.kv_cache_budget_bytes`). Without the run, a GPU's first long prefill could run out of
memory after the cache took everything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from textgen.core.backend import MemoryProfile
from textgen.core.engine.sizing import DEFAULT_MAX_BATCH_PREFILL_TOKENS, DEFAULT_MAX_BATCH_SIZE

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import ModelRunner


def profile_memory(config: EngineConfig, backend: Backend, runner: ModelRunner, max_length: int) -> MemoryProfile:
    """Free memory before, and the peak of, the profile run (skipped when the backend says so)."""
    info = backend.memory_info()
    if not backend.wants_memory_profile(config):
        return MemoryProfile(info.total_bytes, info.available_bytes, None)
    tokens = config.max_batch_prefill_tokens or DEFAULT_MAX_BATCH_PREFILL_TOKENS
    sampled = min(config.max_batch_size or DEFAULT_MAX_BATCH_SIZE, tokens)
    backend.synchronize()
    backend.reset_peak_memory()
    runner.profile_run(tokens, min(max_length, config.max_total_tokens or max_length), sampled)
    return MemoryProfile(info.total_bytes, info.available_bytes, backend.peak_memory_bytes())


def describe_profile(profile: MemoryProfile) -> str:
    free = f"{profile.free_bytes / 2**20:.1f} MiB free of {profile.total_bytes / 2**20:.1f} MiB after the weights"
    if profile.peak_bytes is None:
        return f"memory: {free}; no profile run (the backend's budget rule needs none)"
    return f"memory: {free}; profile run peak {profile.peak_bytes / 2**20:.1f} MiB"

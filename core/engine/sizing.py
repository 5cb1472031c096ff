"""KV cache sizing and the token budgets TGI derives at start when the flags leave them unset.

Order (TGI §3.2): the KV cache gets what the backend says it may take after the weights; then
max_batch_total_tokens = blocks * block_size, max_total_tokens = min(that, model max length),
max_input_tokens = max_total_tokens - 1, max_batch_prefill_tokens = min(4096, max_batch_total_tokens).
Explicit flags always win but are checked against each other with TGI's messages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from textgen.core.attention import AttentionSpec
    from textgen.core.backend import Backend, MemoryProfile
    from textgen.core.config import EngineConfig

DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
DEFAULT_MAX_BATCH_SIZE = 256


class ConfigError(ValueError):
    """A combination of settings that cannot run; the message says which and why."""


@dataclass(frozen=True, slots=True)
class SpeculatorMemory:
    """What speculative decoding takes from the KV cache's budget: weights loaded after the
    memory profile (a draft model, Medusa heads) and the draft's own KV bytes for each block
    (it gets as many blocks as the target)."""

    weight_bytes: int
    bytes_per_block: int = 0


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int
    cache_dtype: str = ""
    speculator: SpeculatorMemory | None = None

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        tokens = self.num_blocks * self.block_size
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {tokens} tokens, "
                f"{self.total_bytes / 2**20:.1f} MiB in {self.cache_dtype} ({self.bytes_per_block} bytes per block; "
                f"budget {self.budget_bytes / 2**20:.1f} MiB){self._describe_speculator()}")

    def _describe_speculator(self) -> str:
        if self.speculator is None:
            return ""
        return (f"; the speculator took {self.speculator.weight_bytes / 2**20:.1f} MiB of weights and "
                f"{self.speculator.bytes_per_block} bytes per block of the budget")


def bytes_per_block(specs: list[AttentionSpec], block_size: int) -> int:
    """K and V of every layer for one block of tokens, in the cache's storage dtype."""
    return sum(2 * block_size * s.num_kv_heads * s.head_size * _itemsize(s.cache_dtype) for s in specs)


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def plan_kv_cache(config: EngineConfig, backend: Backend, specs: list[AttentionSpec], max_length: int,
                  profile: MemoryProfile, speculator: SpeculatorMemory | None = None) -> KVCachePlan:
    """Blocks from the backend's memory budget after the profile run, but never more than every
    admissible request at full length could use (max_concurrent_requests x the longest
    sequence): memory past that would only be zero-filled and never touched. A speculator's
    weights come off the budget and its per-block KV bytes are paid for each block too."""
    per_block = bytes_per_block(specs, config.block_size)
    budget = backend.kv_cache_budget_bytes(config, profile)
    if speculator is not None:
        budget = max(0, budget - speculator.weight_bytes)
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        useful_tokens = config.max_concurrent_requests * (config.max_total_tokens or max_length)
        paid = per_block + (speculator.bytes_per_block if speculator is not None else 0)
        num_blocks = min(budget // paid, math.ceil(useful_tokens / config.block_size))
        if config.max_batch_total_tokens is not None:
            num_blocks = min(num_blocks, math.ceil(config.max_batch_total_tokens / config.block_size))
    if num_blocks < 2:
        raise ConfigError(f"Not enough memory for the KV cache: {budget} bytes available, "
                          f"{per_block} bytes needed per block of {config.block_size} tokens")
    dtype = str(specs[0].cache_dtype).removeprefix("torch.") if specs else ""
    return KVCachePlan(int(num_blocks), config.block_size, per_block, int(budget), dtype, speculator)


def model_max_length(hf_config: Any, tokenizer: Any) -> int:
    """The longest sequence the model supports: max_position_embeddings, capped by the tokenizer."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 4096
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**8:
        limit = min(limit, tok_limit)
    return int(limit)


def derive_budgets(config: EngineConfig, plan: KVCachePlan, max_length: int) -> list[str]:
    """Fill unset budgets in `config`; return the lines to print at start. Raises ConfigError."""
    kv_tokens = plan.num_blocks * plan.block_size
    if config.max_batch_total_tokens is None:
        config.max_batch_total_tokens = kv_tokens
    if config.max_total_tokens is None:
        config.max_total_tokens = min(config.max_batch_total_tokens, max_length)
        if config.max_input_tokens is not None and config.max_input_tokens >= config.max_total_tokens:
            config.max_total_tokens = config.max_input_tokens + 1
    if config.max_input_tokens is None:
        config.max_input_tokens = config.max_total_tokens - 1
    if config.max_batch_prefill_tokens is None:
        config.max_batch_prefill_tokens = min(DEFAULT_MAX_BATCH_PREFILL_TOKENS, config.max_batch_total_tokens)
    if config.max_batch_size is None:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    check_budgets(config, kv_tokens)
    return [
        plan.describe(),
        f"max_input_tokens={config.max_input_tokens} max_total_tokens={config.max_total_tokens} "
        f"max_batch_prefill_tokens={config.max_batch_prefill_tokens} "
        f"max_batch_total_tokens={config.max_batch_total_tokens} max_batch_size={config.max_batch_size}",
    ]


def check_budgets(config: EngineConfig, kv_tokens: int) -> None:
    """TGI's launcher and router checks, with TGI's messages."""
    i, t, b = config.max_input_tokens, config.max_total_tokens, config.max_batch_total_tokens
    if i >= t:
        raise ConfigError(f"`max_input_tokens`({i}) must be < `max_total_tokens`({t})")
    if t > b:
        raise ConfigError(f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {t} and {b}")
    if config.max_batch_prefill_tokens > b:
        raise ConfigError(f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
                          f"Given: {config.max_batch_prefill_tokens} and {b}")
    if config.max_batch_size <= 0:
        raise ConfigError("`max_batch_size` must be > 0")
    if t > kv_tokens:
        raise ConfigError(f"Not enough memory to handle `max_total_tokens={t}` "
                          f"(the KV cache holds {kv_tokens} tokens)")

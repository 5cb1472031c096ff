"""The seam for a runner whose compiled model keeps its own KV cache (a vendor-compiled
application such as AWS's NxD Inference: one cache line per request slot, inside the program).

A backend plugin offers such a runner through `textgen_owned_cache_runner(config, backend)`;
`build_engine_parts` then builds the engine around it here instead of around the paged
`ModelRunner`: no KV blocks are allocated, no memory profile runs, no attention kernel is
negotiated. The scheduler still runs unchanged (continuous batching, priorities, preemption by
recompute, stop checks): its blocks are bookkeeping only, sized so that every one of the runner's
`max_requests` slots can hold a full `max_seq_len` sequence, and its `max_batch_size` (running
requests at most) is the slot count, so a running request always has a slot. Prefix caching is
off (a cached prefix would skip computing KV the runner never saw).

Invariants the runner keeps (checked by `tests/backends/test_neuron_runner.py`): a request holds
one slot from its first computed token until it finishes or is preempted (`finished_ids`,
`preempted_ids`, or its status seen at the next step); a recomputed request starts its slot over
from position 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import RowSampling, StepResult
    from textgen.core.engine.setup import EngineParts
    from textgen.core.loader.model_loader import LoadedModel
    from textgen.core.scheduler import SchedulerOutput

DEFAULT_BLOCK_SIZE = 16  # bookkeeping granularity of the scheduler's blocks


@dataclass(frozen=True, slots=True)
class OwnedCacheLimits:
    """What the compiled program holds: `max_requests` cache slots of `max_seq_len` positions."""

    max_requests: int
    max_seq_len: int

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_seq_len < 2:
            raise ValueError(f"an owned KV cache needs >= 1 slot of >= 2 positions, got {self}")


class OwnedCacheRunner(Protocol):
    """The runner interface the engine uses, for a runner that owns its KV cache."""

    dtype: torch.dtype
    hf_config: Any
    model_path: Path
    loaded: LoadedModel
    lora: None  # no LoRA adapters on an owned-cache runner
    outputs_continue_prompt: bool

    @property
    def vocab_size(self) -> int: ...

    @property
    def generator_device(self) -> torch.device: ...

    def cache_limits(self) -> OwnedCacheLimits: ...

    def describe(self) -> list[str]:
        """Startup lines: the compiled model, its buckets, where its artifacts are."""
        ...

    def execute(self, out: SchedulerOutput, rows: dict[str, RowSampling], prompt_logprob_ids: set[str],
                allowed_mask: torch.Tensor | None = None) -> StepResult: ...


def owned_cache_reasons(config: EngineConfig) -> list[str]:
    """Engine features that need textgen's own paged cache or model (empty when none is asked)."""
    reasons = []
    if config.speculate:
        reasons.append("--speculate needs textgen's paged KV cache (the runner owns its cache)")
    if config.lora_adapters or config.enable_lora:
        reasons.append("LoRA adapters are not served by a runner that owns its KV cache")
    if config.num_kv_blocks is not None:
        reasons.append("--num-kv-blocks sizes textgen's paged cache; the runner owns its cache")
    return reasons


def build_owned_cache_parts(config: EngineConfig, backend: Backend, runner: OwnedCacheRunner) -> EngineParts:
    """Tokenizer, budgets capped by the runner's slots and sequence length, a scheduler without
    prefix caching whose blocks are bookkeeping, and the in-process executor."""
    from textgen.core.engine.executor import InProcessExecutor
    from textgen.core.engine.setup import EngineParts, _build_scheduler, eos_ids, load_tokenizer
    from textgen.core.engine.sizing import ConfigError, KVCachePlan, derive_budgets, model_max_length

    reasons = owned_cache_reasons(config)
    if reasons:
        raise ConfigError(f"backend '{backend.name}' cannot run this configuration: " + "; ".join(reasons))
    limits = runner.cache_limits()
    tokenizer = load_tokenizer(config, runner.model_path)
    max_length = min(model_max_length(runner.hf_config, tokenizer), limits.max_seq_len)
    config.block_size = config.block_size or DEFAULT_BLOCK_SIZE
    config.enable_prefix_caching = False
    if config.max_batch_size is None or config.max_batch_size > limits.max_requests:
        config.max_batch_size = limits.max_requests
    if config.max_total_tokens is not None and config.max_total_tokens > limits.max_seq_len:
        raise ConfigError(f"--max-total-tokens {config.max_total_tokens} exceeds the compiled sequence length "
                          f"{limits.max_seq_len}")
    num_blocks = limits.max_requests * math.ceil(limits.max_seq_len / config.block_size)
    budget_lines = derive_budgets(config, KVCachePlan(num_blocks, config.block_size, 0, 0, "owned"), max_length)
    lines = [f"backend {backend.describe()}; dtype {runner.dtype}", *runner.describe(),
             f"KV cache owned by the runner: {limits.max_requests} slots x {limits.max_seq_len} positions; "
             f"scheduler bookkeeping {num_blocks} blocks x {config.block_size} tokens; no prefix caching",
             *budget_lines[1:]]
    scheduler = _build_scheduler(config, num_blocks)
    return EngineParts(backend, runner, tokenizer, scheduler, eos_ids(runner.hf_config, tokenizer, runner.model_path),
                       lines, InProcessExecutor(runner))

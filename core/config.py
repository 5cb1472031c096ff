"""EngineConfig: everything the engine needs to start, independent of how it was given (CLI, API)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineConfig:
    """Engine settings. Names follow TGI's launcher flags where TGI has one.

    Token budgets left as None are derived at start from the memory available for the KV cache
    (see `textgen.core.engine.sizing`).
    """

    model_id: str
    revision: str | None = None
    tokenizer_id: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantize: str | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"  # auto: safetensors from the model folder; dummy: random weights (benchmarks)
    backend: str | None = None  # forced backend name; None = auto
    attention_backend: str | None = None  # forced attention kernel name
    num_shard: int = 1
    seed: int = 0

    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # override the memory-derived KV cache size
    kv_cache_memory_fraction: float = 0.9  # of the memory left after weights

    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    waiting_served_ratio: float = 0.3

    extra: dict[str, object] = field(default_factory=dict)

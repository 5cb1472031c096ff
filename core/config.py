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
    speculate: int = 0  # TGI's --speculate: draft tokens verified per step (0 = off); see core/spec_decode
    speculative_model: str | None = None  # draft model (same tokenizer); None with speculate > 0 = n-gram lookup

    block_size: int | None = None  # None: the chosen attention kernel's preferred size (negotiated)
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8_e4m3fn | fp8_e5m2
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # override the memory-derived KV cache size
    memory_fraction: float | None = None  # --cuda-memory-fraction; None: the backend's default rule
    graph_batch_sizes: tuple[int, ...] | None = None  # --cuda-graphs; None: the backend's default, (): eager

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

    lora_adapters: tuple[str, ...] = ()  # --lora-adapters entries: `name=path`, `hub/id`, `hub/id@revision`
    enable_lora: bool = False  # serve LoRA even with no adapter at start (runtime loading)
    max_loras: int = 8  # adapters resident at once (vLLM's --max-loras); others load on demand
    max_lora_rank: int = 16  # largest adapter rank (vLLM's --max-lora-rank)

    extra: dict[str, object] = field(default_factory=dict)

"""The engine's parts for an encoder-decoder model: the same backend, tokenizer, scheduler and
budgets as the causal path, with a `Seq2SeqRunner` instead of the paged `ModelRunner`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from textgen.core.engine.sizing import KVCachePlan, derive_budgets, model_max_length

if TYPE_CHECKING:
    from pathlib import Path

    from textgen.core.config import EngineConfig
    from textgen.core.engine.setup import EngineParts

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_REQUESTS = 32  # the scheduler's bookkeeping blocks cover this many full-length requests


def seq2seq_config(config: EngineConfig) -> tuple[Any, Path] | None:
    """(hf_config, path) when the model is an encoder-decoder, else None."""
    from transformers import AutoConfig

    from textgen.core.loader.files import resolve_model_path
    from textgen.core.seq2seq.runner import is_encoder_decoder

    try:
        path = resolve_model_path(config.model_id, config.revision)
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    except Exception:  # noqa: BLE001 - not a plain HF folder (e.g. GGUF): the causal loader decides and reports
        return None
    return (hf_config, path) if is_encoder_decoder(hf_config) else None


def build_seq2seq_parts(config: EngineConfig, backend: Any, hf_config: Any, path: Path) -> EngineParts:
    """Runner, tokenizer, budgets and a scheduler without prefix caching. The scheduler's blocks
    are bookkeeping (the decoder caches are transformers' own, per request): enough for
    `max_batch_size` (default DEFAULT_MAX_REQUESTS) requests of `max_total_tokens` each."""
    from textgen.core.engine.executor import InProcessExecutor
    from textgen.core.engine.setup import EngineParts, _build_scheduler, eos_ids, load_tokenizer
    from textgen.core.seq2seq.runner import Seq2SeqRunner

    runner = Seq2SeqRunner(config, backend, hf_config, path)
    tokenizer = load_tokenizer(config, path)
    config.block_size = config.block_size or DEFAULT_BLOCK_SIZE
    config.enable_prefix_caching = False
    max_length = model_max_length(hf_config, tokenizer)
    requests = config.max_batch_size or DEFAULT_MAX_REQUESTS
    config.max_batch_size = requests
    num_blocks = requests * math.ceil((config.max_total_tokens or max_length) / config.block_size)
    budget_lines = derive_budgets(config, KVCachePlan(num_blocks, config.block_size, 0, 0, "none"), max_length)
    lines = [f"backend {backend.describe()}; dtype {runner.dtype}; {runner.describe()}",
             f"seq2seq path: the decoder runs each request alone within a step; scheduler bookkeeping for "
             f"{num_blocks} blocks x {config.block_size} tokens; no prefix caching", *budget_lines[1:]]
    scheduler = _build_scheduler(config, num_blocks)
    return EngineParts(backend, runner, tokenizer, scheduler, eos_ids(hf_config, tokenizer, path), lines,
                       InProcessExecutor(runner))

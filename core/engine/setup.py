"""Builds the engine's parts in order: backend, config hooks, model runner (model + negotiated
attention kernel), tokenizer, memory profile, KV cache, derived budgets, step buffers, graph
warm-up, scheduler."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgen.core.attention import StepLimits
from textgen.core.config import EngineConfig
from textgen.core.engine.executor import make_executor
from textgen.core.engine.memory import describe_profile, profile_memory
from textgen.core.engine.model_runner import ModelRunner
from textgen.core.engine.owned_cache import build_owned_cache_parts
from textgen.core.engine.sizing import ConfigError, derive_budgets, model_max_length, plan_kv_cache
from textgen.core.engine.topology import agree_on_kv_blocks, collective_timeout_s
from textgen.core.graphs import DecodeGraphs, decode_graphs
from textgen.core.kv_cache.manager import releasable_window
from textgen.core.seq2seq.setup import build_seq2seq_parts, seq2seq_config
from textgen.core.spec_decode.medusa import load_base_runner

if TYPE_CHECKING:
    from textgen.core.spec_decode import LoadedSpeculator, SpecDecoder
    from textgen.core.spec_decode.medusa import MedusaRepo

log = logging.getLogger("textgen.engine")


@dataclass(slots=True)
class EngineParts:
    backend: Any
    runner: Any
    tokenizer: Any
    scheduler: Any
    eos_token_ids: frozenset[int]
    startup_lines: list[str]
    executor: Any  # InProcessExecutor | ShardedExecutor (core.engine.executor)
    spec_decoder: Any = None  # SpecDecoder when --speculate > 0


def _flatten(results: list[Any]) -> list[Any]:
    return [item for group in results if group for item in group]


def build_engine_parts(config: EngineConfig, plugin_manager: Any = None) -> EngineParts:
    """Startup, in order: backend and its config hooks; model and attention kernel; memory profile;
    KV cache and budgets; step buffers; graph warm-up; scheduler. Each stage adds its line."""
    from textgen.core.plugins import PluginManager

    pm = plugin_manager or PluginManager()
    backend = pm.create_backend(config, forced=config.backend)
    reasons = _flatten(pm.hook.textgen_configure(config=config, backend=backend))
    if reasons:
        raise ConfigError(f"backend '{backend.name}' cannot run this configuration: " + "; ".join(reasons))
    owned = pm.hook.textgen_owned_cache_runner(config=config, backend=backend)
    if owned is not None:  # a compiled model with its own KV cache: no paged cache, no kernel choice
        return build_owned_cache_parts(config, backend, owned)
    seq2seq = seq2seq_config(config)
    if seq2seq is not None:  # encoder-decoder: the seq2seq runner instead of the paged one
        return build_seq2seq_parts(config, backend, *seq2seq)
    attention_infos = _flatten(pm.hook.textgen_attention_backends(backend=backend))
    architectures: dict[str, str] = {}
    for extra in pm.hook.textgen_model_architectures():
        architectures.update(extra or {})
    quantizers = _flatten(pm.hook.textgen_quantizers(backend=backend))

    def make_runner(cfg: EngineConfig) -> ModelRunner:
        return ModelRunner(cfg, backend, attention_infos, architectures, quantizers)

    _check_spec_flags(config)
    medusa = _find_medusa(config)
    runner = make_runner(config) if medusa is None else load_base_runner(config, medusa, make_runner)
    tokenizer = load_tokenizer(config, runner.model_path)
    max_length = model_max_length(runner.hf_config, tokenizer)
    lines = [f"backend {backend.describe()}; dtype {runner.dtype}; {runner.loaded.describe_weights()}",
             *runner.kernel.describe()]
    if runner.lora is not None:
        lines.append(runner.lora.describe())
    profile = profile_memory(config, backend, runner, max_length)
    lines.append(describe_profile(profile))
    speculator = _load_speculator(config, make_runner, runner, medusa)
    plan = plan_kv_cache(config, backend, runner.attention_specs(), max_length, profile,
                         speculator.memory() if speculator is not None else None)
    plan = agree_on_kv_blocks(plan, backend.communicator(), backend.device)
    runner.allocate_kv_cache(plan.num_blocks)
    lines += derive_budgets(config, plan, max_length)
    graphs, graph_line = decode_graphs(config, backend, runner.attention_cls)
    runner.prepare(step_limits(config, graphs))
    if graphs is not None:
        runner.capture_graphs(graphs)
    lines.append(graphs.describe() if graphs is not None else graph_line)
    scheduler = _build_scheduler(config, plan.num_blocks, releasable_window(runner.attention_specs()))
    executor = make_executor(runner, runner.loaded.tp_size, collective_timeout_s())
    eos = eos_ids(runner.hf_config, tokenizer, runner.model_path)
    spec = _build_spec_decoder(config, speculator, plan.num_blocks, eos)
    if spec is not None:
        lines.append(spec.describe())
    return EngineParts(backend, runner, tokenizer, scheduler, eos, lines, executor, spec)


def _check_spec_flags(config: EngineConfig) -> None:
    if config.speculate < 0:
        raise ConfigError(f"--speculate must be >= 0, got {config.speculate}")
    if config.speculative_model and not config.speculate:
        raise ConfigError("--speculative-model needs --speculate N (draft tokens per step), e.g. --speculate 4")


def _find_medusa(config: EngineConfig) -> MedusaRepo | None:
    """The Medusa repo --model-id names (then --speculate defaults to its head count), else None.
    A broken repo raises MedusaError: a load error, like a broken checkpoint's."""
    from textgen.core.spec_decode.medusa import apply_medusa_speculate, find_medusa_repo

    repo = find_medusa_repo(config)
    if repo is not None:
        apply_medusa_speculate(config, repo)
    return repo


def _load_speculator(config: EngineConfig, make_runner: Callable[[EngineConfig], ModelRunner], runner: ModelRunner,
                     medusa: MedusaRepo | None) -> LoadedSpeculator | None:
    """None unless --speculate > 0; else what the proposer loads before the KV cache is sized (a
    draft model's weights, Medusa heads), so that the plan leaves room for them."""
    if not config.speculate:
        return None
    if runner.loaded.tp_size > 1:  # drafts and acceptances do not cross ranks in the step diffs yet
        raise ConfigError("--speculate is not supported with --num-shard > 1 yet")
    from textgen.core.spec_decode import load_speculator
    from textgen.core.spec_decode.medusa import MedusaError

    try:
        return load_speculator(config, make_runner, runner, medusa)
    except MedusaError:
        raise
    except ValueError as exc:  # a draft model that does not fit the target
        raise ConfigError(str(exc)) from None


def _build_spec_decoder(config: EngineConfig, speculator: LoadedSpeculator | None, num_blocks: int,
                        eos: frozenset[int]) -> SpecDecoder | None:
    """None unless --speculate > 0; a draft model gets as many KV blocks as the target (the plan
    paid for both) and the same step limits."""
    if speculator is None:
        return None
    from textgen.core.spec_decode import SpecDecoder

    return SpecDecoder(config.speculate, speculator.proposer(config, num_blocks), config.max_total_tokens, eos)


def step_limits(config: EngineConfig, graphs: DecodeGraphs | None) -> StepLimits:
    """The largest step the budgets allow (graph buckets pad decode batches up to their size)."""
    padded_tokens, padded_requests = graphs.padded_limits() if graphs is not None else (0, 0)
    requests = max(min(config.max_batch_size, config.max_batch_prefill_tokens), padded_requests)
    tokens = max(config.max_batch_prefill_tokens, padded_tokens)
    return StepLimits(tokens, requests, -(-config.max_total_tokens // config.block_size), config.block_size)


def load_tokenizer(config: EngineConfig, model_path: Any) -> Any:
    from transformers import AutoTokenizer

    if config.tokenizer_id is None and str(model_path).endswith(".gguf"):
        from textgen.core.loader.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(Path(model_path))
    source = config.tokenizer_id or str(model_path)
    return AutoTokenizer.from_pretrained(source, revision=config.revision if not config.tokenizer_id else None,
                                         trust_remote_code=config.trust_remote_code)


def eos_ids(hf_config: Any, tokenizer: Any, model_path: Any) -> frozenset[int]:
    """EOS ids from generation_config.json (may be a list, as in Llama 3), the config and the tokenizer."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(str(model_path))
        ids |= _as_set(gen.eos_token_id)
    except (OSError, ValueError):
        pass
    ids |= _as_set(getattr(hf_config, "eos_token_id", None))
    ids |= _as_set(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def _as_set(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def _build_scheduler(config: EngineConfig, num_blocks: int, sliding_window: int | None = None) -> Any:
    from textgen.core.scheduler import Scheduler, SchedulerConfig

    return Scheduler(SchedulerConfig(
        max_batch_prefill_tokens=config.max_batch_prefill_tokens, max_batch_size=config.max_batch_size,
        max_model_len=config.max_total_tokens, block_size=config.block_size, num_blocks=num_blocks,
        enable_prefix_caching=config.enable_prefix_caching, sliding_window=sliding_window,
        max_loras=config.max_loras if config.lora_adapters or config.enable_lora else None,
    ))

"""Requests into and events out of the engine: the contract between the engine and the API layer.

`AsyncEngine.generate(request)` yields one `RequestOutput` per generated token (after stop-string
handling), the last one with `finished=True`. Closing the iterator (client disconnect, task
cancel) aborts the request at the next engine step and frees its KV blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from textgen.core.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    adapter_id: str | None = None  # LoRA adapter name; None = the base model


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One token as TGI reports it: id, decoded text, logprob (None when not computed), special."""

    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass(slots=True)
class RequestOutput:
    """One engine event for one request.

    - token: the token sampled this step (None on a final event that carries only an error/abort).
    - text: the text this event adds to the output (incremental detokenization: may be "" while a
      multi-byte character is incomplete; trimmed at a stop sequence).
    - top_tokens: the `top_n_tokens` most likely alternatives at this step.
    - finish_reason: "length" | "eos_token" | "stop_sequence" | "aborted" | "error" (TGI names).
    - prompt_tokens: on the first event when `prompt_logprobs` was asked (TGI decoder_input_details);
      the first prompt token has logprob None.
    - Timings are in seconds (monotonic): queue = arrival -> first scheduled; inference = first
      scheduled -> now.
    """

    request_id: str
    token: TokenInfo | None
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    top_tokens: list[TokenInfo] = field(default_factory=list)
    prompt_tokens: list[TokenInfo] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    stop_sequence: str | None = None
    seed: int | None = None
    queue_time: float = 0.0
    inference_time: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Snapshot for /metrics and /info."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float  # fraction of KV blocks in use
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found cached
    batch_max_tokens: int  # tokens scheduled in the last step
    num_kv_blocks: int
    block_size: int
    kv_cache_dtype: str = "auto"  # dtype of the KV cache tensors ("float32", "bfloat16", ...)
    enable_prefix_caching: bool = True
    max_loras: int = 0  # LoRA adapters resident at once; 0 when LoRA is off
    running_lora_adapters: tuple[str, ...] = ()  # adapters of running requests, sorted
    waiting_lora_adapters: tuple[str, ...] = ()  # adapters of waiting requests, sorted


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one engine step did and where its time went (seconds), for TGI's `tgi_batch_*`
    metrics. Passed to every `EngineCore.step_observers` callable on the engine thread.

    - method: "prefill" when the step computed prompt tokens (a chunk, a whole prompt or a prompt
      recomputed after preemption), else "decode";
    - concatenated: requests joined a batch that was already decoding (TGI's `chunking` concat);
    - schedule_s: the scheduler's choice of the step; forward_s: the model runner (inputs,
      forward, grammar masks, sampling); update_s: appending tokens, publishing KV blocks, stop
      checks and freeing finished requests; emit_s: token events (detokenization, stop strings);
    - failed: the batch's first forward raised (its requests were then retried one by one);
    - model_s: the model's own forward and logits inside forward_s (what is left of forward_s is
      input preparation, attention metadata and sampling); 0 from a runner that does not time it;
    - loop_s: the engine loop's work between the previous step and this one (queued requests and
      aborts applied, stats, step observers; compiled grammars admitted), 0 after an idle wait;
    - step_s: the whole step, loop_s + schedule_s + forward_s + update_s + emit_s, so the
      engine's overhead (everything but the model) is step_s - model_s;
    - skipped_tokens: with speculative decoding on, one entry per request that got tokens this
      step: its accepted draft tokens (TGI's tgi_request_skipped_tokens, tokens emitted - 1);
      empty when speculation is off.
    """

    method: str
    batch_size: int
    num_tokens: int
    concatenated: bool
    schedule_s: float
    forward_s: float
    update_s: float
    emit_s: float
    failed: bool
    skipped_tokens: tuple[int, ...] = ()
    model_s: float = 0.0
    loop_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.loop_s + self.schedule_s + self.forward_s + self.update_s + self.emit_s

    @property
    def overhead_s(self) -> float:
        """Everything in the step but the model's forward and logits."""
        return max(0.0, self.step_s - self.model_s)

"""What the scheduler hands to the engine each step, and what it gives back after it."""
from __future__ import annotations

from dataclasses import dataclass, field

from textgen.core.scheduler.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    - num_computed_tokens: tokens with KV before this step (prefix hits included);
    - token_ids = request.all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens];
    - block_ids: the request's whole block table after this step's allocation;
    - sample: the step reaches the last known token, so a new token is sampled from its logits
      (False for a prefill chunk that is not the last one);
    - spec_token_ids: draft tokens verified this step (speculative decoding): they are the last
      len(spec_token_ids) of token_ids and of num_new_tokens; only a decode step carries them.
    """

    request: Request
    num_new_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    token_ids: list[int]
    sample: bool
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    """`scheduled` lists the running requests first (in priority order), then the newly admitted.
    preempted_ids: requests preempted (KV freed) in this step; finished_ids: requests finished or
    aborted since the previous step, whose per-request state a runner may drop."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RequestUpdate:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Snapshot for metrics. Prompt tokens: computed = run through the model (recomputation after
    a preemption counts again), cached = served from the prefix cache at admission."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_prompt_tokens_computed: int
    num_prompt_tokens_cached: int
    num_preemptions: int

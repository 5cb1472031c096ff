"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each `schedule()` spends one token budget (max_batch_prefill_tokens; decode tokens count too):
1. `_schedule_running`: running requests in priority order get their next token (decode) or
   next prefill chunk. When the KV cache is full, the lowest-priority running request (largest
   priority value, then latest arrival) is preempted, possibly the request itself.
2. `_admit_waiting`: waiting requests in order (priority, preempted first, arrival) start with
   their prefix-cache hits and a first chunk, up to max_batch_size running requests. One that
   cannot get blocks is skipped (it keeps its place) so it does not stall smaller ones, but the
   walk stops at a request preempted in this same step: nothing ranked below it may take its room.
   A request whose LoRA adapter would make the running requests use more than max_loras distinct
   adapters is skipped the same way.
`update()` then advances the computed tokens, publishes full blocks, appends sampled tokens and
applies the stop checks. Finished and aborted requests free their blocks at once.
"""
from __future__ import annotations

import itertools
import time
from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass

from textgen.core.kv_cache import KVCacheManager
from textgen.core.scheduler.outputs import RequestUpdate, ScheduledRequest, SchedulerOutput, SchedulerStats
from textgen.core.scheduler.request import Request, RequestStatus, check_stop


@dataclass(slots=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int  # tokens per step, prefill chunks and decode tokens together
    max_batch_size: int | None  # running requests at most; None = no limit
    max_model_len: int  # prompt + generated tokens at most
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    sliding_window: int | None = None  # every layer's window (KVCacheManager releases blocks behind it)
    max_loras: int | None = None  # distinct LoRA adapters among running requests at most; None = no limit

    def __post_init__(self) -> None:
        for name in ("max_batch_prefill_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"SchedulerConfig.max_batch_size must be >= 1 or None, got {self.max_batch_size!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager | None = None) -> None:
        self.config = config
        self.kv_manager = kv_manager or KVCacheManager(config.num_blocks, config.block_size,
                                                       config.enable_prefix_caching, config.sliding_window)
        self.waiting: list[Request] = []  # sorted by _waiting_key
        self.running: list[Request] = []  # sorted by _running_key: the last is preempted first
        self._requests: dict[str, Request] = {}  # unfinished
        self._finished: dict[str, Request] = {}  # finished since the last schedule()
        self._arrival: dict[str, int] = {}
        self._counter = itertools.count()
        self._prompt_computed = self._prompt_cached = self._num_preemptions = 0

    # -- requests in and out --------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if its id is in use or it could never fit."""
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self._check_fits(request)
        self._arrival[request.request_id] = next(self._counter)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        insort(self.waiting, request, key=self._waiting_key)

    def finish_requests(self, request_ids: str | Iterable[str], reason: str) -> list[str]:
        """Finish (e.g. abort) unfinished requests now: their blocks are freed and they leave the
        queues; they appear in the next output's finished_ids. Returns the ids it finished."""
        RequestStatus.finished(reason)  # validates the reason
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        done = []
        for rid in ids:
            request = self._requests.get(rid)
            if request is not None:
                self._finish(request, reason)
                done.append(rid)
        return done

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request, or one finished since the last schedule()."""
        return self._requests.get(request_id) or self._finished.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> SchedulerStats:
        kv = self.kv_manager.prefix_cache_stats
        return SchedulerStats(
            num_waiting=self.num_waiting, num_running=self.num_running, kv_cache_usage=self.kv_manager.usage,
            prefix_cache_queries=kv.queries, prefix_cache_hits=kv.hits, prefix_cache_hit_rate=kv.hit_rate,
            num_prompt_tokens_computed=self._prompt_computed, num_prompt_tokens_cached=self._prompt_cached,
            num_preemptions=self._num_preemptions,
        )

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=list(self._finished))
        self._finished.clear()
        budget = self._schedule_running(out, self.config.max_batch_prefill_tokens)
        self._admit_waiting(out, budget)
        out.num_scheduled_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n > 0:
                spec = self._allocate_drafts(request, n, budget)
                if not spec and not self._allocate_or_preempt(request, n, out):
                    break  # it preempted itself: it was the last running request
                out.scheduled.append(self._scheduled(request, n, spec))
                budget -= n + len(spec)
            i += 1
        return budget

    def _allocate_drafts(self, request: Request, n: int, budget: int) -> list[int]:
        """The request's draft tokens that fit this step, with slots for its decode token and them;
        [] (nothing allocated) when it has none, is not decoding, or the cache lacks room for
        them: drafts never preempt anyone."""
        if not request.spec_token_ids or request.num_tokens - request.num_computed_tokens != 1:
            return []
        spec = request.spec_token_ids[: budget - n]
        if not spec or self.kv_manager.allocate_slots(request, n + len(spec)) is None:
            return []
        return spec

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate, preempting from the bottom of `running` until it fits; False if the request
        itself had to go. Victims always rank below `request`, so none was scheduled yet."""
        while self.kv_manager.allocate_slots(request, num_new_tokens) is None:
            victim = self._preempt_lowest()
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt_lowest(self) -> Request:
        victim = self.running.pop()
        self.kv_manager.free(victim)
        victim.num_computed_tokens = 0  # its output tokens stay and are recomputed with the prompt
        victim.spec_token_ids = []
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self._num_preemptions += 1
        insort(self.waiting, victim, key=self._waiting_key)
        return victim

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        preempted_now = set(out.preempted_ids)
        i = 0
        while i < len(self.waiting) and budget > 0 and self._has_batch_room():
            request = self.waiting[i]
            if request.request_id in preempted_now:
                break
            n = self._try_admit(request, budget) if self._has_lora_room(request) else None
            if n is None:
                i += 1  # skip, not stall: it keeps its place for the next step
                continue
            del self.waiting[i]
            insort(self.running, request, key=self._running_key)
            out.scheduled.append(self._scheduled(request, n))
            budget -= n

    def _try_admit(self, request: Request, budget: int) -> int | None:
        """Take the request's prefix hits and blocks for its first chunk; the chunk's size, or
        None (nothing taken) when the cache has no room."""
        computed, num_cached = self.kv_manager.get_computed_blocks(request)
        n = min(request.num_tokens - num_cached, budget)
        if self.kv_manager.allocate_slots(request, n, computed) is None:
            return None
        request.num_computed_tokens = num_cached
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = num_cached
        self._prompt_cached += min(num_cached, request.num_prompt_tokens)
        return n

    def _has_lora_room(self, request: Request) -> bool:
        """Its adapter is one the running requests use, or they use fewer than max_loras: every
        running request's adapter stays resident in the model's LoRA slots."""
        if request.adapter_id is None or self.config.max_loras is None:
            return True
        active = {r.adapter_id for r in self.running if r.adapter_id is not None}
        return request.adapter_id in active or len(active) < self.config.max_loras

    def _has_batch_room(self) -> bool:
        return self.config.max_batch_size is None or len(self.running) < self.config.max_batch_size

    def _scheduled(self, request: Request, n: int, spec: list[int] | None = None) -> ScheduledRequest:
        start, spec = request.num_computed_tokens, list(spec or ())
        return ScheduledRequest(
            request=request, num_new_tokens=n + len(spec), num_computed_tokens=start,
            block_ids=self.kv_manager.get_block_ids(request.request_id),
            token_ids=request.all_token_ids[start:start + n] + spec, sample=start + n == request.num_tokens,
            spec_token_ids=spec,
        )

    # -- after the forward ----------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: dict[str, int | list[int]]) -> list[RequestUpdate]:
        """Apply a step's results. Requests finished since schedule() (aborts) are ignored; a
        scheduled request with `sample` but no entry in `sampled` only advances its KV.

        With drafts (speculative decoding) a request's entry is a list: its accepted drafts, in
        order, then one token the target chose. Tokens are appended one at a time with the stop
        checks, so none lands past a stop; KV stays computed only up to the last appended token's
        input (rejected drafts' slots are overwritten later) and only those blocks are published."""
        updates = []
        for s in output.scheduled:
            request = s.request
            if request.status is not RequestStatus.RUNNING:
                continue
            request.spec_token_ids = []
            tokens = sampled.get(request.request_id) if s.sample else None
            if tokens is None:
                self._advance(request, s, s.num_computed_tokens + s.num_new_tokens)
                continue
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            _check_drafts(s, tokens)
            appended, reason = self._append(request, tokens)
            computed = s.num_new_tokens if not s.spec_token_ids else len(appended)
            self._advance(request, s, s.num_computed_tokens + computed)
            if reason is not None:
                self._finish(request, reason)
            updates.append(RequestUpdate(request.request_id, appended, reason is not None, reason))
        return updates

    def _append(self, request: Request, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append tokens until one stops the request: (the appended tokens, finish reason)."""
        appended: list[int] = []
        for token in tokens:
            request.append_output_token(token)
            appended.append(token)
            reason = check_stop(request, self.config.max_model_len)
            if reason is not None:
                return appended, reason
        return appended, None

    def _advance(self, request: Request, s: ScheduledRequest, end: int) -> None:
        prompt_len = request.num_prompt_tokens
        self._prompt_computed += max(0, min(end, prompt_len) - min(s.num_computed_tokens, prompt_len))
        request.num_computed_tokens = end
        self.kv_manager.cache_blocks(request, end)

    def _finish(self, request: Request, reason: str) -> None:
        rid = request.request_id
        del self._requests[rid]
        self._arrival.pop(rid, None)
        queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
        queue.remove(request)
        self.kv_manager.free(request)
        request.status = RequestStatus.finished(reason)
        request.finish_reason = reason
        self._finished[rid] = request

    # -- ordering and limits --------------------------------------------------------------

    def _running_key(self, request: Request) -> tuple[int, float, int]:
        return request.priority, request.arrival_time, self._arrival[request.request_id]

    def _waiting_key(self, request: Request) -> tuple[int, bool, float, int]:
        preempted_last = request.status is not RequestStatus.PREEMPTED
        return request.priority, preempted_last, request.arrival_time, self._arrival[request.request_id]

    def _check_fits(self, request: Request) -> None:
        cfg, prompt_len = self.config, request.num_prompt_tokens
        if prompt_len >= cfg.max_model_len:
            raise ValueError(f"request {request.request_id}: the prompt has {prompt_len} tokens; "
                             f"the maximum is {cfg.max_model_len - 1} (max_model_len - 1)")
        longest = min(prompt_len + request.sampling_params.max_new_tokens, cfg.max_model_len)
        needed = -(-(longest - 1) // cfg.block_size)  # the last token's KV is never computed
        if needed > cfg.num_blocks:
            raise ValueError(f"request {request.request_id} may need {needed} KV blocks of {cfg.block_size} "
                             f"tokens but the cache has {cfg.num_blocks}: lower max_new_tokens or "
                             f"max_model_len, or give the KV cache more memory")


def _check_drafts(s: ScheduledRequest, tokens: list[int]) -> None:
    """Every token before the last must be an accepted draft, in order."""
    drafts = s.spec_token_ids
    if len(tokens) > len(drafts) + 1 or tokens[:-1] != drafts[: len(tokens) - 1]:
        raise ValueError(f"request {s.request.request_id}: tokens {tokens} do not extend drafts {drafts}")

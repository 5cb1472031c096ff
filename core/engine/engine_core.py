"""EngineCore: scheduler + model runner + per-request state, driven one `step()` at a time.

Not thread-safe: exactly one thread (the AsyncEngine loop, or the caller of `LLM.generate`) calls
it. Failure isolation: a request that cannot be admitted gets an error event; if a forward pass
raises, every scheduled request is retried alone, and only the ones that fail alone get an error
event, so one bad request never takes the others (or the engine) down.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from textgen.core.engine.model_runner import RowSampling, StepResult
from textgen.core.engine.request_state import EventBuilder, RequestState, Sink, request_generator
from textgen.core.engine.setup import build_engine_parts
from textgen.core.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from textgen.core.engine.types import EngineRequest, EngineStats, StepRecord
from textgen.core.lora import lora_reasons
from textgen.core.sampling import sampling_param_reasons
from textgen.core.scheduler import Request

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.scheduler import SchedulerOutput

log = logging.getLogger("textgen.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, plugin_manager: Any = None) -> None:
        parts = build_engine_parts(config, plugin_manager)
        self.config, self.backend, self.runner = config, parts.backend, parts.runner
        self.tokenizer, self.scheduler, self.startup_lines = parts.tokenizer, parts.scheduler, parts.startup_lines
        self.eos_token_ids = parts.eos_token_ids
        self.executor = parts.executor  # runs each step here, or on every tensor-parallel rank
        self.events = EventBuilder(self.tokenizer)
        self.states: dict[str, RequestState] = {}
        self.pending_grammar: dict[str, RequestState] = {}
        self._grammar: Any = None
        self.last_step_tokens = 0
        self.step_observers: list[Callable[[StepRecord], None]] = []  # called on the engine thread
        self.spec = parts.spec_decoder  # SpecDecoder | None (speculative decoding)
        self._busy_since: float | None = None  # when the last step ended with work left (perf_counter)

    # -- requests in ----------------------------------------------------------------------

    def add_request(self, request: EngineRequest, sink: Sink) -> None:
        params = request.params
        gen, seed = request_generator(params.seed, not params.is_greedy, self.runner.generator_device)
        # an encoder-decoder's output does not continue its prompt: detokenize it on its own
        context = request.prompt_token_ids if getattr(self.runner, "outputs_continue_prompt", True) else []
        detok = IncrementalDetokenizer.for_prompt(self.tokenizer, context, self.events.special_ids, self.events.decode)
        st = RequestState(request, sink, detok, StopMatcher(list(params.stop)), gen, seed)
        if request.request_id in self.states:
            st.emit(EventBuilder.final_event(st, "error", f"duplicate request id {request.request_id}"))
            return
        problem = self._check_request(request)
        if problem:
            st.emit(EventBuilder.final_event(st, "error", problem))
            return
        self.states[request.request_id] = st
        if params.grammar is not None:
            try:
                st.grammar_future = self.grammar.compile(params.grammar)
            except Exception as exc:
                self._fail(st, f"grammar: {exc}")
                return
            self.pending_grammar[request.request_id] = st
            return
        self._schedule(st)

    def _check_request(self, request: EngineRequest) -> str | None:
        ids, vocab = request.prompt_token_ids, self.runner.vocab_size
        if not ids:
            return "the prompt is empty"
        if min(ids) < 0 or max(ids) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if len(ids) >= self.config.max_total_tokens:
            return f"the prompt has {len(ids)} tokens; the maximum is {self.config.max_total_tokens - 1}"
        reasons = sampling_param_reasons(request.params, vocab)
        if request.adapter_id is not None:
            reasons += lora_reasons(self.runner.lora, request.adapter_id)
        return "; ".join(reasons) if reasons else None

    def _schedule(self, st: RequestState) -> None:
        r = st.request
        salt = r.request_id if r.params.prompt_logprobs else None  # every prompt position needs logits
        adapter = self.runner.lora.get(r.adapter_id) if r.adapter_id is not None else None
        try:
            self.scheduler.add_request(Request(
                request_id=r.request_id, prompt_token_ids=list(r.prompt_token_ids), sampling_params=r.params,
                eos_token_ids=self.eos_token_ids, arrival_time=r.arrival_time, priority=r.priority, cache_salt=salt,
                adapter_id=r.adapter_id, adapter_load_id=adapter.load_id if adapter is not None else None,
            ))
        except ValueError as exc:  # e.g. a request that could never fit in the KV cache
            self._fail(st, str(exc))

    def abort(self, request_ids: list[str], reason: str = "aborted") -> None:
        for rid in request_ids:
            st = self.states.pop(rid, None)
            self.pending_grammar.pop(rid, None)
            if st is None:
                continue
            self.scheduler.finish_requests([rid], reason)
            if not st.finished:
                st.emit(EventBuilder.final_event(st, reason))

    def _fail(self, st: RequestState, message: str) -> None:
        log.warning("request %s failed: %s", st.request_id, message)
        self.states.pop(st.request_id, None)
        self.pending_grammar.pop(st.request_id, None)
        self.scheduler.finish_requests([st.request_id], "error")
        st.emit(EventBuilder.final_event(st, "error", message))

    @property
    def grammar(self) -> Any:
        if self._grammar is None:
            from textgen.core.grammar import GrammarManager

            self._grammar = GrammarManager(self.tokenizer, self.runner.vocab_size, eos_token_ids=self.eos_token_ids)
        return self._grammar

    # -- one step -------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.pending_grammar) or self.scheduler.has_unfinished()

    def step(self) -> bool:
        """Run one engine step; return False when there was nothing to run."""
        entered = time.perf_counter()
        # the loop's work since the last step (commands, stats, observers) counts as this step's
        loop_s = entered - self._busy_since if self._busy_since is not None else 0.0
        try:
            return self._step(entered, loop_s)
        finally:
            self._busy_since = time.perf_counter() if self.has_work() else None

    def _step(self, entered: float, loop_s: float) -> bool:
        self._admit_compiled_grammars()
        started = time.perf_counter()
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self.states)
        out = self.scheduler.schedule()
        if not out.scheduled:
            self.executor.skip(out)
            return False
        self.last_step_tokens = out.num_scheduled_tokens
        now = time.monotonic()
        for s in out.scheduled:
            st = self.states.get(s.request.request_id)
            if st is not None and st.first_scheduled is None:
                st.first_scheduled = now
        method, concatenated = _step_kind(out)  # before update() appends the sampled tokens
        scheduled = time.perf_counter()
        kept, result, failed = self._execute_isolated(out)
        executed = time.perf_counter()
        update_s = emit_s = 0.0
        if kept.scheduled:
            update_s, emit_s = self._process(kept, result)
        if self.spec is not None:
            self.spec.observe(kept, {rid: len(t.accepted) for rid, t in result.sampled.items()})
        if self.step_observers:
            skipped = tuple(len(t.accepted) for t in result.sampled.values()) if self.spec is not None else ()
            self._observe(StepRecord(
                method, len(out.scheduled), out.num_scheduled_tokens, concatenated,
                scheduled - started, executed - scheduled, update_s, emit_s, failed, skipped,
                model_s=result.model_s, loop_s=loop_s + started - entered))
        return True

    def _observe(self, record: StepRecord) -> None:
        for observer in self.step_observers:
            try:
                observer(record)
            except Exception:  # metrics must never stop the engine
                log.exception("step observer failed")

    def _admit_compiled_grammars(self) -> None:
        for rid, st in list(self.pending_grammar.items()):
            if not st.grammar_future.done():
                continue
            del self.pending_grammar[rid]
            try:
                st.grammar_state = self.grammar.new_state(st.grammar_future.result())
            except Exception as exc:
                self._fail(st, f"grammar: {exc}")
                continue
            self._schedule(st)

    def _execute_isolated(self, out: SchedulerOutput) -> tuple[SchedulerOutput, StepResult, bool]:
        """(what ran, its result, whether the batch's forward failed as a whole)."""
        try:
            return out, self._execute(out), False
        except Exception as exc:
            if len(out.scheduled) == 1:
                self._fail_scheduled(out.scheduled[0], exc)
                return replace(out, scheduled=[]), StepResult({}, {}), True
        kept, merged = [], StepResult({}, {})
        for s in out.scheduled:  # retry each alone: only the culprits fail
            one = replace(out, scheduled=[s], num_scheduled_tokens=s.num_new_tokens)
            try:
                res = self._execute(one)
            except Exception as exc:
                self._fail_scheduled(s, exc)
                continue
            kept.append(s)
            merged.sampled.update(res.sampled)
            merged.prompt_logprobs.update(res.prompt_logprobs)
            merged.model_s += res.model_s
        return replace(out, scheduled=kept, num_scheduled_tokens=sum(s.num_new_tokens for s in kept)), merged, True

    def _fail_scheduled(self, s: Any, exc: Exception) -> None:
        log.exception("forward failed for request %s", s.request.request_id, exc_info=exc)
        st = self.states.get(s.request.request_id)
        if st is not None:
            self._fail(st, f"{type(exc).__name__}: {exc}")

    def _execute(self, out: SchedulerOutput) -> StepResult:
        rows, grammar_states = {}, []
        for s in out.scheduled:
            st = self.states[s.request.request_id]
            probs = self.spec.draft_probs(st.request_id) if s.spec_token_ids else None
            rows[st.request_id] = RowSampling(st.request.params, st.generator, probs)
            if s.sample:
                grammar_states.append(st.grammar_state)
        mask = self.grammar.fill_bitmask(grammar_states, device=self.backend.device) if any(g is not None for g in grammar_states) else None
        if mask is not None and any(s.spec_token_ids for s in out.scheduled):
            mask = self.spec.allowed_mask(out, self.states, self.grammar)  # one row per verified position
        wanted = {rid for rid in rows if self.states[rid].request.params.prompt_logprobs}
        return self.executor.execute(out, rows, wanted, mask)

    def _process(self, out: SchedulerOutput, result: StepResult) -> tuple[float, float]:
        """Apply the step's tokens; returns (scheduler update seconds, event emission seconds)."""
        started = time.perf_counter()
        starts = {s.request.request_id: s.num_computed_tokens for s in out.scheduled}
        for rid, lps in result.prompt_logprobs.items():
            # entry j scores prompt token j + 1, so a step from position c writes from entry c: a
            # prompt recomputed after preemption overwrites its entries instead of appending them again
            del self.states[rid].prompt_logprobs[starts[rid]:]
            self.states[rid].prompt_logprobs.extend(lps)
        sampled = {rid: [*(a.token_id for a in tok.accepted), tok.token_id] for rid, tok in result.sampled.items()}
        for rid, tokens in list(sampled.items()):
            st = self.states[rid]
            if st.grammar_state is not None and not all(self.grammar.advance(st.grammar_state, t) for t in tokens):
                sampled.pop(rid)
                self._fail(st, "the sampled token was rejected by the grammar")
        kept = [s for s in out.scheduled if s.request.request_id in self.states]
        updates = self.scheduler.update(replace(out, scheduled=kept), sampled)
        updated = time.perf_counter()
        for u in updates:
            self._emit_update(u, result)
        return updated - started, time.perf_counter() - updated

    def _emit_update(self, update: Any, result: StepResult) -> None:
        st = self.states.get(update.request_id)
        if st is None:
            return
        req = self.scheduler.get_request(update.request_id)
        cached = req.num_cached_tokens if req is not None else 0
        last = result.sampled[update.request_id]
        tokens = [*last.accepted, last]  # accepted drafts first (speculative decoding), then the new token
        for i, token_id in enumerate(update.new_token_ids):
            event, stop = self.events.token_event(st, tokens[i], cached)
            is_last = i == len(update.new_token_ids) - 1  # the grammar has consumed them all already
            reason = update.finish_reason if update.finished and is_last else None
            if stop is not None:
                reason = "stop_sequence"
            elif reason is None and is_last and st.grammar_state is not None and st.grammar_state.is_terminated:
                reason = "eos_token"  # a finished grammar ends on EOS even with ignore_eos
            if reason is not None:
                event.finished, event.finish_reason = True, reason
                self.states.pop(update.request_id, None)
                if not update.finished:
                    self.scheduler.finish_requests([update.request_id], reason)
                st.emit(event)
                return
            st.emit(event)

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_waiting=s.num_waiting + len(self.pending_grammar), num_running=s.num_running,
            kv_cache_usage=s.kv_cache_usage, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, batch_max_tokens=self.last_step_tokens,
            num_kv_blocks=self.scheduler.config.num_blocks, block_size=self.config.block_size,
            kv_cache_dtype=str(self.runner.dtype).removeprefix("torch."),
            enable_prefix_caching=self.config.enable_prefix_caching,
            max_loras=self.runner.lora.max_loras if self.runner.lora is not None else 0,
            running_lora_adapters=_adapters(self.scheduler.running),
            waiting_lora_adapters=_adapters(self.scheduler.waiting),
        )


def _adapters(requests: list[Request]) -> tuple[str, ...]:
    return tuple(sorted({r.adapter_id for r in requests if r.adapter_id is not None}))


def _is_prefill(s: Any) -> bool:
    """The request computes KV it has not sampled from yet: its prompt (a chunk of it) or, after a
    preemption, its prompt and outputs again. A decode computes only its last sampled token."""
    return s.num_computed_tokens < max(s.request.num_prompt_tokens, s.request.num_tokens - 1)


def _step_kind(out: SchedulerOutput) -> tuple[str, bool]:
    """(method, concatenated): "prefill" when any request computes prompt KV, else "decode"; a
    concatenation when prefill work joined requests that were already decoding (TGI's `chunking`)."""
    prefill = [_is_prefill(s) for s in out.scheduled]
    return ("prefill" if any(prefill) else "decode"), any(prefill) and not all(prefill)

"""Per-request engine state and the conversion of sampled tokens into RequestOutput events."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from textgen.core.engine.detokenizer import IncrementalDetokenizer, StopMatcher, raw_decoder
from textgen.core.engine.types import EngineRequest, RequestOutput, TokenInfo
from textgen.core.sampling import make_generator

if TYPE_CHECKING:
    from textgen.core.engine.model_runner import SampledToken

Sink = Callable[[RequestOutput], None]


def request_generator(seed: int | None, do_sample: bool, device: torch.device) -> tuple[torch.Generator | None, int | None]:
    """A sampled request always gets its own seeded generator, so its tokens do not depend on
    what else is in the batch; without a seed one is drawn and reported (TGI's details.seed)."""
    if not do_sample:
        return None, seed
    gen = make_generator(seed, device)
    return gen, gen.initial_seed()


@dataclass(slots=True)
class RequestState:
    request: EngineRequest
    sink: Sink
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None
    seed: int | None
    grammar_future: Any = None  # concurrent.futures.Future[CompiledGrammar] until compiled
    grammar_state: Any = None
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_sent: bool = False
    num_generated: int = 0
    first_scheduled: float | None = None
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def emit(self, event: RequestOutput) -> None:
        self.finished = self.finished or event.finished
        self.sink(event)


class EventBuilder:
    """Builds RequestOutput events; owns the tokenizer-facing details (token texts, specials)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self.decode = raw_decoder(tokenizer)  # shared by every request's IncrementalDetokenizer

    def token_info(self, token_id: int, logprob: float | None) -> TokenInfo:
        text = self.decode([token_id])
        return TokenInfo(token_id, text, logprob, token_id in self.special_ids)

    def token_event(self, st: RequestState, sampled: SampledToken, num_cached: int) -> tuple[RequestOutput, str | None]:
        """The event for one generated token; returns (event, matched stop sequence or None)."""
        token_text, delta = st.detok.add(sampled.token_id)
        emitted, stop = st.stop.feed(delta)
        st.num_generated += 1
        token = TokenInfo(sampled.token_id, token_text, sampled.logprob, sampled.token_id in self.special_ids)
        event = RequestOutput(
            request_id=st.request_id, token=token, text=emitted,
            top_tokens=[self.token_info(i, lp) for i, lp in sampled.top],
            num_prompt_tokens=len(st.request.prompt_token_ids), num_generated_tokens=st.num_generated,
            num_cached_tokens=num_cached, seed=st.seed, stop_sequence=stop,
        )
        self._timings(st, event)
        if not st.prompt_sent:
            st.prompt_sent = True
            if st.request.params.prompt_logprobs:
                event.prompt_tokens = self.prompt_tokens(st)
        return event, stop

    def prompt_tokens(self, st: RequestState) -> list[TokenInfo]:
        ids = st.request.prompt_token_ids
        lps: list[float | None] = [None, *st.prompt_logprobs]
        return [self.token_info(t, lps[i] if i < len(lps) else None) for i, t in enumerate(ids)]

    @staticmethod
    def final_event(st: RequestState, reason: str, error: str | None = None) -> RequestOutput:
        event = RequestOutput(request_id=st.request_id, token=None, text="", finished=True, finish_reason=reason,
                              error=error, num_prompt_tokens=len(st.request.prompt_token_ids),
                              num_generated_tokens=st.num_generated, seed=st.seed)
        EventBuilder._timings(st, event)
        return event

    @staticmethod
    def _timings(st: RequestState, event: RequestOutput) -> None:
        now = time.monotonic()
        started = st.first_scheduled or now
        event.queue_time = max(0.0, started - st.request.arrival_time)
        event.inference_time = max(0.0, now - started)

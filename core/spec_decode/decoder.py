"""SpecDecoder: the engine's side of speculative decoding.

Each step, before `Scheduler.schedule()`, `propose` sets `spec_token_ids` on the running requests
that decode (their last token is the only one without KV). Drafts are capped so that accepting
all of them plus the target's own token stays within max_new_tokens and max_model_len; they stop
before an EOS id; with a grammar they stop at the first token the grammar forbids (checked on the
matcher without moving it). The scheduler schedules 1 + k tokens for such a request when the
budget and the KV cache have room, else plain decoding. After the forward, the runner verifies
them (`verify.py`) and `allowed_mask` gives it one grammar row per verified position.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from textgen.core.spec_decode.proposer import Draft, DraftQuery, NgramProposer, Proposer

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import ModelRunner
    from textgen.core.engine.sizing import SpeculatorMemory
    from textgen.core.scheduler import Request, SchedulerOutput
    from textgen.core.spec_decode.medusa import MedusaProposer, MedusaRepo


class SpecDecoder:
    def __init__(self, num_speculative_tokens: int, proposer: Proposer, max_model_len: int,
                 eos_token_ids: frozenset[int]) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"speculate must be >= 1 to enable speculative decoding, got {num_speculative_tokens}")
        self.k, self.proposer, self.max_model_len = num_speculative_tokens, proposer, max_model_len
        self.eos_token_ids = eos_token_ids
        self._probs: dict[str, torch.Tensor] = {}
        self._backoff: dict[str, list[int]] = {}  # request id -> [steps left to skip, next skip length]

    def describe(self) -> str:
        source = self.proposer.describe() if hasattr(self.proposer, "describe") else self.proposer.name
        return f"speculative decoding: {source}, up to {self.k} draft tokens per step"

    # -- before schedule() ----------------------------------------------------------------

    def propose(self, running: Sequence[Request], states: Mapping[str, Any]) -> None:
        """`states`: the engine's RequestState by id (generator, grammar state)."""
        self._probs.clear()
        live = {r.request_id for r in running}
        self._backoff = {rid: b for rid, b in self._backoff.items() if rid in live}
        queries = []
        for r in running:
            st = states.get(r.request_id)
            r.spec_token_ids = []
            limit = self._max_drafts(r)
            if st is None or limit <= 0 or r.num_tokens - r.num_computed_tokens != 1 or self._backing_off(r.request_id):
                continue
            if st.grammar_state is not None and st.grammar_state.is_terminated:
                continue
            queries.append(DraftQuery(r, limit, st.generator))
        drafts = self.proposer.propose(queries) if queries else {}
        for q in queries:
            draft = drafts.get(q.request.request_id)
            if draft is not None:
                self._accept(q.request, draft, states[q.request.request_id].grammar_state)

    def _backing_off(self, request_id: str) -> bool:
        backoff = self._backoff.get(request_id)
        if backoff is None or backoff[0] == 0:
            return False
        backoff[0] -= 1
        return True

    def observe(self, out: SchedulerOutput, accepted: Mapping[str, int]) -> None:
        """After a step: `accepted` drafts per request that got tokens. A request whose drafts were
        all rejected skips proposing for 4, 8, 16, then 32 steps (reset by an acceptance), so output
        that the proposer cannot predict costs few wasted verify positions. Depends only on past
        steps, so it changes no distribution."""
        for s in out.scheduled:
            rid = s.request.request_id
            if not s.spec_token_ids or rid not in accepted:
                continue
            if accepted[rid] > 0:
                self._backoff.pop(rid, None)
                continue
            length = self._backoff.get(rid, [0, 4])[1]
            self._backoff[rid] = [length, min(2 * length, 32)]

    def _max_drafts(self, r: Request) -> int:
        """All drafts accepted plus one token must fit both limits."""
        left = min(r.sampling_params.max_new_tokens - r.num_output_tokens, self.max_model_len - r.num_tokens)
        return min(self.k, left - 1)

    def _accept(self, r: Request, draft: Draft, grammar_state: Any) -> None:
        tokens = draft.token_ids[: self._max_drafts(r)]
        if draft.probs is not None:
            # sampled drafts: cutting them by their own values (EOS, grammar) would bias the
            # rejection sampler, so a sampled request with a grammar does not speculate
            if grammar_state is None:
                r.spec_token_ids = tokens
                self._probs[r.request_id] = draft.probs[: len(tokens)]
            return
        for i, t in enumerate(tokens):
            if t in self.eos_token_ids:
                tokens = tokens[:i]
                break
        if grammar_state is not None and tokens:
            tokens = tokens[: grammar_state.matcher.validate_tokens(tokens)]
        r.spec_token_ids = tokens

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        return self._probs.get(request_id)

    # -- the runner's grammar rows --------------------------------------------------------

    @staticmethod
    def allowed_mask(out: SchedulerOutput, states: Mapping[str, Any], grammar: Any) -> torch.Tensor | None:
        """bool [sum over sampled rows of 1 + k, V]: row j of a request is its grammar's mask after
        its first j drafts (consumed, masked, then rolled back). None without grammar rows."""
        sampled = [s for s in out.scheduled if s.sample]
        if all(states[s.request.request_id].grammar_state is None for s in sampled):
            return None
        rows = []
        for s in sampled:
            state = states[s.request.request_id].grammar_state
            if state is None:
                rows.append(torch.ones((len(s.spec_token_ids) + 1, grammar.vocab_size), dtype=torch.bool))
                continue
            rows.extend(_grammar_rows(grammar, state, s.spec_token_ids))
        return torch.cat(rows)


def _grammar_rows(grammar: Any, state: Any, drafts: list[int]) -> list[torch.Tensor]:
    rows = [grammar.fill_bitmask([state])]
    consumed = 0
    try:
        for token in drafts:
            if not state.matcher.consume_token(token):
                raise ValueError(f"draft token {token} is not allowed by the grammar")
            consumed += 1
            rows.append(grammar.fill_bitmask([state]))
    finally:
        if consumed:
            state.matcher.rollback(consumed)
    return rows


@dataclass(slots=True)
class LoadedSpeculator:
    """The proposer's parts loaded before the KV cache is sized (`memory()` is what they take
    from its budget); `proposer(num_blocks)` finishes it once the target's block count is known."""

    draft_runner: ModelRunner | None = None
    medusa: MedusaProposer | None = None

    def memory(self) -> SpeculatorMemory | None:
        from textgen.core.engine.sizing import SpeculatorMemory, bytes_per_block

        if self.medusa is not None:
            return SpeculatorMemory(self.medusa.weight_bytes)
        if self.draft_runner is not None:
            return SpeculatorMemory(self.draft_runner.loaded.weight_bytes,
                                    bytes_per_block(self.draft_runner.attention_specs(), self.draft_runner.block_size))
        return None

    def proposer(self, config: EngineConfig, num_blocks: int) -> Proposer:
        if self.medusa is not None:
            return self.medusa
        if self.draft_runner is not None:
            from textgen.core.spec_decode.draft_model import DraftModelProposer

            return DraftModelProposer.create(config, self.draft_runner, num_blocks)
        return NgramProposer()


def load_speculator(config: EngineConfig, make_runner: Callable[[EngineConfig], ModelRunner],
                    target: ModelRunner, medusa: MedusaRepo | None) -> LoadedSpeculator:
    """Medusa heads when the model id is a Medusa repo (the runner then feeds them each step's
    hidden rows), a draft model with --speculative-model, else n-gram prompt lookup."""
    if medusa is not None:
        from textgen.core.spec_decode.medusa import MedusaProposer

        target.medusa = MedusaProposer.create(medusa, target, config.speculate)
        return LoadedSpeculator(medusa=target.medusa)
    if config.speculative_model:
        from textgen.core.spec_decode.draft_model import DraftModelProposer

        return LoadedSpeculator(draft_runner=DraftModelProposer.load_runner(config, make_runner, target))
    return LoadedSpeculator()

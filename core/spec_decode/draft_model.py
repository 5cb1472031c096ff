"""Draft-model proposer (`--speculative-model PATH`): a small model with the target's tokenizer
drafts k tokens per decoding request; the target verifies them in one forward.

The draft runs its own `ModelRunner` (weights, attention kernel, paged KV tensors, step buffers)
and its own `KVCacheManager` (no prefix caching), with one `DraftSequence` per request. Before
drafting, a sequence is synced with the request's tokens: its computed KV is kept up to the
longest common prefix (drafts the target rejected are dropped, their slots overwritten later),
then the missing tokens (the prompt at first, afterwards the target's new tokens) run as one
catch-up forward, chunked by the step budget, whose last logits give draft 1; each further draft
is one single-token forward for all sequences together. A greedy request drafts by argmax (point
masses); a sampled one samples from the draft's processed distribution q (the request's own
temperature, top-k/p and penalties over its output and the drafts so far) and keeps q for the
rejection sampler. A sequence that cannot get draft KV blocks just proposes nothing this step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from textgen.core.kv_cache import KVCacheManager
from textgen.core.sampling import SamplingBatch
from textgen.core.spec_decode.proposer import Draft, DraftQuery
from textgen.core.spec_decode.rejection import sample_from

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.model_runner import ModelRunner


@dataclass(slots=True, eq=False)
class DraftSequence:
    """The draft's view of one request (the fields KVCacheManager reads)."""

    request_id: str
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass(slots=True)
class _Row:
    """One sequence's share of a draft forward (the fields StepBuffers.fill reads)."""

    seq: DraftSequence
    num_computed_tokens: int
    num_new_tokens: int
    token_ids: list[int]
    block_ids: list[int]


class DraftModelProposer:
    name = "draft model"

    def __init__(self, runner: ModelRunner, num_blocks: int, max_step_tokens: int, max_step_rows: int) -> None:
        self.runner = runner
        self.kv = KVCacheManager(num_blocks, runner.block_size, enable_prefix_caching=False)
        self.max_step_tokens, self.max_step_rows = max_step_tokens, max_step_rows
        self.seqs: dict[str, DraftSequence] = {}

    @staticmethod
    def load_runner(config: EngineConfig, make_runner: Callable[[EngineConfig], ModelRunner],
                    target: ModelRunner) -> ModelRunner:
        """The draft's runner, loaded like the target (same backend, dtype, block size) before
        the KV cache is sized, so its weights and KV come off the target's budget. ValueError
        when its vocabulary or block size differs from the target's."""
        draft_config = replace(config, model_id=config.speculative_model, revision=None, quantize=None,
                               speculate=0, speculative_model=None, block_size=target.block_size, extra={})
        runner = make_runner(draft_config)
        if runner.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model {config.speculative_model} has a vocabulary of {runner.vocab_size} "
                             f"tokens but the target has {target.vocab_size}: use a draft with the target's tokenizer")
        if runner.block_size != target.block_size:
            raise ValueError(f"the draft model's attention kernel needs block size {runner.block_size}, the "
                             f"target's {target.block_size}: set --block-size to one both accept")
        return runner

    @classmethod
    def create(cls, config: EngineConfig, runner: ModelRunner, num_blocks: int) -> DraftModelProposer:
        """The proposer on a loaded draft runner with `num_blocks` KV blocks of its own."""
        from textgen.core.engine.setup import step_limits

        runner.allocate_kv_cache(num_blocks)
        limits = step_limits(config, None)
        runner.prepare(limits)
        return cls(runner, num_blocks, limits.max_num_tokens, limits.max_num_requests)

    def describe(self) -> str:
        return f"draft model {self.runner.model_path} ({self.kv.num_blocks} KV blocks of its own)"

    # -- the Proposer protocol ------------------------------------------------------------

    def propose(self, queries: Sequence[DraftQuery]) -> dict[str, Draft]:
        live = {q.request.request_id for q in queries}
        for rid in [rid for rid in self.seqs if rid not in live]:
            self.kv.free(self.seqs.pop(rid))
        active = [q for q in queries if self._sync(q)]
        if not active:
            return {}
        tokens: dict[str, list[int]] = {q.request.request_id: [] for q in active}
        probs: dict[str, list[torch.Tensor]] = {q.request.request_id: [] for q in active}
        with self.runner.backend.inference_mode():
            logits = self._catch_up(active)
            for step in range(max(q.max_drafts for q in active)):
                rows = [q for q in active if q.max_drafts > step]
                if step:
                    logits = self._forward_last([self.seqs[q.request.request_id] for q in rows], tokens)
                self._draw(rows, logits, tokens, probs)
        return {rid: Draft(t, torch.stack(probs[rid]) if probs[rid] else None) for rid, t in tokens.items() if t}

    # -- steps ----------------------------------------------------------------------------

    def _sync(self, q: DraftQuery) -> bool:
        """Bring the sequence to the request's tokens and reserve KV for them and the drafts."""
        r = q.request
        seq = self.seqs.setdefault(r.request_id, DraftSequence(r.request_id))
        target = r.all_token_ids
        keep = 0
        limit = min(seq.num_computed_tokens, len(target) - 1)
        while keep < limit and seq.all_token_ids[keep] == target[keep]:
            keep += 1
        seq.all_token_ids, seq.num_computed_tokens = list(target), keep
        need = len(target) - keep + q.max_drafts - 1  # the drafts but the last have KV computed too
        return self.kv.allocate_slots(seq, need) is not None

    def _catch_up(self, queries: Sequence[DraftQuery]) -> torch.Tensor:
        """Run every sequence's missing tokens (chunked by the step budget); logits [R, V] at each
        sequence's last token, in query order."""
        pending = [self.seqs[q.request.request_id] for q in queries]
        last: dict[str, torch.Tensor] = {}
        while pending:
            rows, budget = [], self.max_step_tokens
            for seq in pending:
                if budget <= 0 or len(rows) == self.max_step_rows:
                    break
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                rows.append(self._row(seq, seq.all_token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]))
                budget -= n
            for row, logit in zip(rows, self._run(rows)):
                row.seq.num_computed_tokens += row.num_new_tokens
                if row.seq.num_computed_tokens == row.seq.num_tokens:
                    last[row.seq.request_id] = logit
            pending = [s for s in pending if s.num_computed_tokens < s.num_tokens]
        return torch.stack([last[q.request.request_id] for q in queries])

    def _forward_last(self, seqs: list[DraftSequence], tokens: dict[str, list[int]]) -> torch.Tensor:
        """Feed each sequence its latest draft; logits [R, V] for the next one."""
        rows = []
        for seq in seqs:
            seq.all_token_ids.append(tokens[seq.request_id][-1])
            rows.append(self._row(seq, [seq.all_token_ids[-1]]))
        logits = self._run(rows)
        for seq in seqs:
            seq.num_computed_tokens += 1
        return logits

    def _row(self, seq: DraftSequence, token_ids: list[int]) -> _Row:
        return _Row(seq, seq.num_computed_tokens, len(token_ids), token_ids, self.kv.get_block_ids(seq.request_id))

    def _run(self, rows: list[_Row]) -> torch.Tensor:
        hidden = self.runner.forward_step(rows)
        ends = torch.tensor([r.num_new_tokens for r in rows]).cumsum(0) - 1
        return self.runner.model.compute_logits(hidden.index_select(0, ends.to(hidden.device)))

    def _draw(self, queries: Sequence[DraftQuery], logits: torch.Tensor, tokens: dict[str, list[int]],
              probs: dict[str, list[torch.Tensor]]) -> None:
        """One draft per query: argmax for greedy requests, else a sample from q (kept)."""
        reqs = [q.request for q in queries]
        batch = SamplingBatch.build([r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
                                    [r.output_token_ids + tokens[r.request_id] for r in reqs],
                                    [q.generator for q in queries], logits.shape[-1], logits.device)
        scores = self.runner.sampler.process(logits, batch)
        greedy = scores.argmax(dim=-1).tolist()
        for i, q in enumerate(queries):
            rid = q.request.request_id
            if q.request.sampling_params.is_greedy:
                tokens[rid].append(greedy[i])
                continue
            dist = scores[i].softmax(dim=-1)
            tokens[rid].append(sample_from(dist, q.generator))
            probs[rid].append(dist)

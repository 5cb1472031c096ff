"""The model runner's sampling step when some rows carry draft tokens.

A row with k drafts computed k + 1 positions in the forward (its last known token, then the
drafts); each position becomes one row of an expanded SamplingBatch whose output tokens are the
request's output plus the drafts before that position, so penalties, watermark and the grammar
mask row (given by the engine in the same order) see exactly what a non-speculative step would.
The sampler's steps 1-7 run once over all expanded rows; `rejection.verify_drafts` then picks
each request's tokens. A row without drafts is one expanded row and gets the sampler's own
choice (argmax, or the exponential race with its generator), as without speculation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from textgen.core.sampling import Sampler, SamplingBatch
from textgen.core.sampling.sampler import top_tokens
from textgen.core.spec_decode.rejection import Verified, sample_from, verify_drafts

from textgen.core.engine.model_runner import SampledToken, fit_allowed_mask

if TYPE_CHECKING:
    from textgen.core.engine.model_runner import RowSampling
    from textgen.core.scheduler import ScheduledRequest


def expanded_positions(picked: list[tuple[int, ScheduledRequest]], starts: np.ndarray) -> list[int]:
    """Hidden-state rows to score: each draft row's last 1 + k positions, else its last one."""
    index: list[int] = []
    for i, s in picked:
        end = int(starts[i]) + s.num_new_tokens
        index.extend(range(end - 1 - len(s.spec_token_ids), end))
    return index


def sample_with_drafts(sampler: Sampler, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                       hidden: torch.Tensor, starts: np.ndarray, picked: list[tuple[int, ScheduledRequest]],
                       rows: dict[str, RowSampling], allowed: torch.Tensor | None) -> dict[str, SampledToken]:
    """`allowed` (bool [sum(1 + k), V]) rows follow the expanded rows' order."""
    index = torch.tensor(expanded_positions(picked, starts), device=hidden.device)
    logits = compute_logits(hidden.index_select(0, index))
    batch = _expanded_batch(picked, rows, logits)
    scores = sampler.process(logits, batch, fit_allowed_mask(allowed, logits))
    logprobs = torch.log_softmax(scores, dim=-1)
    top_ids, top_lps = top_tokens(logprobs, batch.max_top_n)
    result: dict[str, SampledToken] = {}
    first = 0
    for _, s in picked:
        r, k = rows[s.request.request_id], len(s.spec_token_ids)
        span = slice(first, first + k + 1)
        verified = _verify_row(scores[span], s.spec_token_ids, r)
        result[s.request.request_id] = _sampled(verified, first, logprobs, top_ids, top_lps,
                                                s.request.sampling_params.top_n_tokens)
        first += k + 1
    return result


def _verify_row(scores: torch.Tensor, drafts: list[int], row: RowSampling) -> Verified:
    greedy = row.params.is_greedy
    if drafts:
        return verify_drafts(scores, drafts, greedy, row.generator, row.draft_probs)
    if greedy:
        return Verified([int(scores[0].argmax())])
    return Verified([sample_from(scores[0].softmax(dim=-1), row.generator)])


def _expanded_batch(picked: list[tuple[int, ScheduledRequest]], rows: dict[str, RowSampling],
                    logits: torch.Tensor) -> SamplingBatch:
    params, prompts, outputs, generators = [], [], [], []
    for _, s in picked:
        req, row = s.request, rows[s.request.request_id]
        for j in range(len(s.spec_token_ids) + 1):
            params.append(row.params)
            prompts.append(req.prompt_token_ids)
            outputs.append(list(req.output_token_ids) + s.spec_token_ids[:j])
            generators.append(row.generator)
    return SamplingBatch.build(params, prompts, outputs, generators, logits.shape[-1], logits.device)


def _sampled(verified: Verified, first: int, logprobs: torch.Tensor, top_ids: torch.Tensor | None,
             top_lps: torch.Tensor | None, top_n: int) -> SampledToken:
    tokens = []
    for j, token in enumerate(verified.token_ids):
        row = first + j
        top = list(zip(top_ids[row, :top_n].tolist(), top_lps[row, :top_n].tolist())) if top_ids is not None and top_n else []
        tokens.append(SampledToken(token, float(logprobs[row, token]), top))
    last = tokens[-1]
    last.accepted = tokens[:-1]
    return last

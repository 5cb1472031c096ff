"""The model runner's sampling step when some rows carry draft tokens.

A row with k drafts computed k + 1 positions in the forward (its last known token, then the
drafts); each position becomes one row of an expanded SamplingBatch whose output tokens are the
request's output plus the drafts before that position, so penalties, watermark and the grammar
mask row (given by the engine in the same order) see exactly what a non-speculative step would.
The sampler's steps 1-7 run once over all expanded rows. Greedy rows are then verified all at
once on the device (`rejection.greedy_acceptance`: argmax at every position, compared with the
drafts, first mismatch per row by a cumulative product) and reach the host in one transfer;
sampled rows go through `rejection.verify_drafts` with their own generators. A row without
drafts is one expanded row and gets the sampler's own choice (argmax, or the exponential race
with its generator), as without speculation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from textgen.core.sampling import Sampler, SamplingBatch
from textgen.core.sampling.sampler import top_tokens
from textgen.core.spec_decode.rejection import Verified, greedy_acceptance, sample_from, verify_drafts

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
    """`allowed` (bool [sum(1 + k), V]) rows follow the expanded rows' order. Greedy rows are
    verified together (`greedy_acceptance`) and their tokens and logprobs reach the host in one
    transfer; sampled rows draw from their own generators row by row."""
    index = torch.tensor(expanded_positions(picked, starts), device=hidden.device)
    logits = compute_logits(hidden.index_select(0, index))
    batch = _expanded_batch(picked, rows, logits)
    scores = sampler.process(logits, batch, fit_allowed_mask(allowed, logits))
    logprobs = torch.log_softmax(scores, dim=-1)
    top_ids, top_lps = top_tokens(logprobs, batch.max_top_n)
    targets, accepted = greedy_acceptance(scores, [s.spec_token_ids for _, s in picked])
    n = targets.shape[0]
    target_lps = logprobs.gather(1, targets[:, None])[:, 0]
    host = torch.cat([targets.double(), target_lps.double(), accepted.double()]).tolist()
    tops = (top_ids.tolist(), top_lps.tolist()) if top_ids is not None else None
    tokens: dict[str, list[tuple[int, float]]] = {}
    firsts: dict[str, int] = {}
    sampled_rows: list[tuple[str, int, list[int]]] = []
    first = 0
    for r, (_, s) in enumerate(picked):
        rid, k = s.request.request_id, len(s.spec_token_ids)
        firsts[rid] = first
        if rows[rid].params.is_greedy:
            tokens[rid] = [(int(host[first + j]), host[n + first + j]) for j in range(int(host[2 * n + r]) + 1)]
        else:
            sampled_rows.append((rid, first, _verify_row(scores[first:first + k + 1], s.spec_token_ids, rows[rid]).token_ids))
        first += k + 1
    tokens.update(_with_logprobs(sampled_rows, logprobs))
    return {rid: _sampled(tokens[rid], firsts[rid], tops, s.request.sampling_params.top_n_tokens)
            for rid, s in ((s.request.request_id, s) for _, s in picked)}


def _verify_row(scores: torch.Tensor, drafts: list[int], row: RowSampling) -> Verified:
    """A sampled row: the rejection sampler with the request's generator."""
    if drafts:
        return verify_drafts(scores, drafts, False, row.generator, row.draft_probs)
    return Verified([sample_from(scores[0].softmax(dim=-1), row.generator)])


def _with_logprobs(sampled_rows: list[tuple[str, int, list[int]]],
                   logprobs: torch.Tensor) -> dict[str, list[tuple[int, float]]]:
    """The sampled rows' tokens with their logprobs, gathered in one transfer."""
    if not sampled_rows:
        return {}
    at = [(first + j, t) for _, first, ids in sampled_rows for j, t in enumerate(ids)]
    values = logprobs[torch.tensor([a for a, _ in at], device=logprobs.device),
                      torch.tensor([t for _, t in at], device=logprobs.device)].tolist()
    out, i = {}, 0
    for rid, _, ids in sampled_rows:
        out[rid] = list(zip(ids, values[i:i + len(ids)]))
        i += len(ids)
    return out


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


def _sampled(tokens: list[tuple[int, float]], first: int, tops: tuple[list, list] | None, top_n: int) -> SampledToken:
    """tokens[j] (id, logprob) came from expanded row first + j; the last is the target's own."""
    out = []
    for j, (token, logprob) in enumerate(tokens):
        top = list(zip(tops[0][first + j][:top_n], tops[1][first + j][:top_n])) if tops is not None and top_n else []
        out.append(SampledToken(token, logprob, top))
    last = out[-1]
    last.accepted = out[:-1]
    return last

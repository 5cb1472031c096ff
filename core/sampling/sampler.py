"""Sampler: logits [B, V] + SamplingBatch -> one token per row, its logprob and the top-n alternatives.

Order (TGI's HeterogeneousNextTokenChooser where TGI has the processor, transformers' otherwise):
  1. allowed_mask (grammar): disallowed -> -inf
  2. logit_bias (OpenAI; dense add)
  3. watermark (TGI applies it before the penalties; repetition_penalty is not additive, so the
     position matters)
  4. repetition_penalty over prompt + output (transformers' RepetitionPenaltyLogitsProcessor)
  5. tgi_frequency_penalty (TGI: count in prompt + output / length)
  6. frequency_penalty, presence_penalty (OpenAI: counts in the output)
  7. sampling rows only: temperature -> top_k -> top_p -> typical_p -> min_p
  8. greedy rows: argmax; sampling rows: exponential race argmax(softmax / Exp(1) noise), the noise
     drawn from the row's own generator (TGI's Sampling, draw for draw), so a seeded row gives the
     same tokens whatever else is in the batch; rows without a generator share torch's default one.

Logprobs follow TGI: log_softmax of the scores after step 7, i.e. after the penalties and after the
warpers including top_k/top_p truncation (a truncated token's logprob is -inf; a token kept alone
by top_k=1 has logprob 0). Greedy rows skip step 7, so theirs is log_softmax after the penalties.
top_n_tokens come from the same distribution, exactly n per row, most likely first (TGI also
returns tokens tied with the n-th; here ties are cut by torch.topk order).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from textgen.core.sampling import penalties, warpers
from textgen.core.sampling.batch import SamplingBatch
from textgen.core.sampling.watermark import WatermarkConfig, apply_watermark


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] float32, of the chosen token
    top_token_ids: torch.Tensor | None  # [B, K] long, K = max top_n_tokens in the batch; None when 0
    top_logprobs: torch.Tensor | None  # [B, K] float32, descending; row i uses its first top_n_tokens


class Sampler:
    def __init__(self, watermark: WatermarkConfig | None = None) -> None:
        self.watermark = watermark if watermark is not None else WatermarkConfig.from_env()

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch,
                 allowed_mask: torch.Tensor | None = None) -> SamplerOutput:
        scores = self.process(logits, batch, allowed_mask)
        logprobs = torch.log_softmax(scores, dim=-1)
        token_ids = choose_tokens(scores, batch)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        top_ids, top_logprobs = top_tokens(logprobs, batch.max_top_n)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    def process(self, logits: torch.Tensor, batch: SamplingBatch,
                allowed_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 1-7 on a float32 copy; the caller's logits are left untouched."""
        if logits.dim() != 2 or logits.shape != (batch.size, batch.vocab_size):
            raise ValueError(f"logits must be [{batch.size}, {batch.vocab_size}], got {list(logits.shape)}")
        scores = logits.to(torch.float32, copy=True)
        if allowed_mask is not None:
            penalties.apply_allowed_mask(scores, allowed_mask)
        if batch.logit_bias is not None:
            scores.add_(batch.logit_bias)
        if batch.watermark_rows:
            apply_watermark(scores, list(batch.watermark_rows), list(batch.watermark_prev_tokens), self.watermark)
        _apply_penalties(scores, batch)
        _apply_warpers(scores, batch)
        return scores


def _apply_penalties(scores: torch.Tensor, batch: SamplingBatch) -> None:
    if batch.repetition_penalty is not None:
        penalties.apply_repetition_penalty(scores, batch.repetition_penalty, batch.seen)
    if batch.tgi_frequency_penalty is not None:
        penalties.apply_tgi_frequency_penalty(scores, batch.tgi_frequency_penalty, batch.seen_frequency)
    if batch.output_counts is not None:
        penalties.apply_openai_penalties(scores, batch.frequency_penalty, batch.presence_penalty, batch.output_counts)


def _apply_warpers(scores: torch.Tensor, batch: SamplingBatch) -> None:
    if batch.temperature is not None:
        warpers.apply_temperature(scores, batch.temperature)
    if batch.top_k is not None:
        warpers.apply_top_k(scores, batch.top_k, batch.max_top_k)
    if batch.top_p_cutoff is not None:
        warpers.apply_top_p(scores, batch.top_p_cutoff, batch.top_p_enabled)
    if batch.typical_p is not None:
        warpers.apply_typical_p(scores, batch.typical_p, batch.typical_p_enabled)
    if batch.min_p is not None:
        warpers.apply_min_p(scores, batch.min_p)


def choose_tokens(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Argmax for every row, then the sampling rows overwritten by their exponential race."""
    token_ids = scores.argmax(dim=-1)
    if batch.sample_rows:
        rows = torch.tensor(batch.sample_rows, dtype=torch.long, device=scores.device)
        probs = scores.index_select(0, rows).softmax(dim=-1)
        noise = exponential_noise(probs.shape, [batch.generators[i] for i in batch.sample_rows], scores.device)
        token_ids.index_copy_(0, rows, probs.div_(noise).argmax(dim=-1))
    return token_ids


def exponential_noise(shape: torch.Size, generators: Sequence[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V]: row j from generators[j] (V draws, like a fresh [V] tensor), the rows
    without a generator in one draw from the default generator."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    shared = [j for j, g in enumerate(generators) if g is None]
    if shared:
        index = torch.tensor(shared, dtype=torch.long, device=device)
        noise.index_copy_(0, index, torch.empty((len(shared), shape[1]), device=device).exponential_(1))
    for j, generator in enumerate(generators):
        if generator is not None:
            noise[j].exponential_(1, generator=generator)
    return noise


def top_tokens(logprobs: torch.Tensor, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if n <= 0:
        return None, None
    values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]), dim=-1)
    return ids, values


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with a fresh random seed when None (read it
    back with `generator.initial_seed()` to report it, as TGI's details.seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def compute_prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """TGI's decoder_input_details: logits[t] (raw model logits, no processors) scores
    prompt_ids[t + 1]. Returns [min(T, len(prompt_ids) - 1)] float32, so a prompt of T tokens
    with its T logits rows gives T - 1 values (the first token has none)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=logits.device)
    n = min(logits.shape[0], ids.shape[0] - 1)
    if n <= 0:
        return torch.empty(0, dtype=torch.float32, device=logits.device)
    rows = logits[:n].to(torch.float32)
    picked = rows.gather(1, ids[1 : n + 1].unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(rows, dim=-1)

"""Logits processors that depend on the tokens seen so far, batched over rows. All work in place on
the sampler's own float32 copy of the logits; a row whose parameter is neutral (penalty 1.0 or
0.0, all-zero bias) comes out unchanged, so rows with different settings share one pass.
"""
from __future__ import annotations

import torch


def apply_repetition_penalty(scores: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> None:
    """HF RepetitionPenaltyLogitsProcessor over prompt + output: for every token seen at least once,
    a negative logit is multiplied by the penalty and a positive one divided by it.
    `penalty` [B, 1]; `seen` [B, V] bool."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    scores.copy_(torch.where(seen, penalized, scores))


def apply_tgi_frequency_penalty(scores: torch.Tensor, penalty: torch.Tensor, frequency: torch.Tensor) -> None:
    """TGI's HeterogeneousFrequencyPenaltyLogitsProcessor: logits -= penalty * frequency, where
    frequency = count of the token in prompt + output / that length. `penalty` [B, 1]; `frequency` [B, V]."""
    scores.sub_(frequency * penalty)


def apply_openai_penalties(scores: torch.Tensor, frequency_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                           output_counts: torch.Tensor) -> None:
    """OpenAI's frequency and presence penalties over the generated tokens only:
    logits -= frequency_penalty * count + presence_penalty * (count > 0)."""
    present = (output_counts > 0).to(scores.dtype)
    scores.sub_(output_counts * frequency_penalty + present * presence_penalty)


def apply_allowed_mask(scores: torch.Tensor, allowed: torch.Tensor) -> None:
    """Grammar constraint: a token that is not allowed gets -inf."""
    scores.masked_fill_(~allowed, float("-inf"))

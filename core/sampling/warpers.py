"""Logits warpers for sampling rows, batched with a per-row parameter. Each one equals the matching
transformers warper (min_tokens_to_keep=1, filter value -inf) applied to that row alone; a row
whose parameter is neutral (temperature 1, top_k 0, top_p 1, typical_p 1, min_p 0) is left
untouched, which is how greedy rows pass through. All work in place on float32 scores [B, V].
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> None:
    """TemperatureLogitsWarper; `temperature` [B, 1], strictly positive."""
    scores.div_(temperature)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """TopKLogitsWarper: keep the tokens at least as likely as the k-th; `top_k` [B] long, 0 = off.
    `max_top_k` is the largest k in the batch (a Python int, so no device sync here)."""
    vocab_size = scores.shape[-1]
    k_max = min(max_top_k, vocab_size)
    k = top_k.clamp(max=vocab_size)
    kth = torch.topk(scores, k_max, dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    remove = (scores < kth) & (k > 0).unsqueeze(1)
    scores.masked_fill_(remove, NEG_INF)


def apply_top_p(scores: torch.Tensor, cutoff: torch.Tensor, enabled: torch.Tensor) -> None:
    """TopPLogitsWarper: drop the least likely tokens whose cumulative probability is <= 1 - top_p,
    always keeping the most likely one. `cutoff` [B, 1] = 1 - top_p (computed in double before the
    float32 cast, as transformers compares); `enabled` [B, 1] bool (top_p < 1)."""
    sorted_logits, sorted_index = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= cutoff
    sorted_remove[:, -1] = False
    remove = sorted_remove.scatter(1, sorted_index, sorted_remove) & enabled
    scores.masked_fill_(remove, NEG_INF)


def apply_typical_p(scores: torch.Tensor, mass: torch.Tensor, enabled: torch.Tensor) -> None:
    """TypicalLogitsWarper: keep the tokens whose surprisal is closest to the entropy until their
    probability mass reaches `mass` [B, 1]; `enabled` [B, 1] bool (typical_p < 1)."""
    normalized = torch.log_softmax(scores, dim=-1)
    terms = normalized * normalized.exp()  # NaN where a token is masked (-inf * 0): it adds nothing
    # where + sum, not nansum: torch_xla has no nansum lowering and would run it on the host every step
    entropy = -torch.where(terms.isnan(), torch.zeros_like(terms), terms).sum(-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_shifted, sorted_index = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_index).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    sorted_remove = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))
    sorted_remove[:, :1] = False
    remove = sorted_remove.scatter(1, sorted_index, sorted_remove) & enabled
    scores.masked_fill_(remove, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> None:
    """MinPLogitsWarper: drop tokens less likely than min_p times the top token's probability.
    `min_p` [B, 1] in [0, 1]; the top token always survives, and min_p = 0 removes nothing."""
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    scores.masked_fill_(remove, NEG_INF)

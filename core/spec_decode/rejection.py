"""Verification of draft tokens against the target model's distributions (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding", algorithm 1).

For one request with drafts d_1..d_k, `scores[j]` are the target's processed scores at draft
position j (the sampler's steps 1-7: grammar mask, penalties, temperature, top-k/p... computed
with d_1..d_j appended to the output), so p_j = softmax(scores[j]) is exactly the distribution a
non-speculative step would sample from after the same tokens. Then, left to right:

- greedy: d_{j+1} is accepted while it equals argmax p_j; the first mismatch emits argmax p_j.
  The tokens are the non-speculative greedy tokens, position by position.
- sampling: d_{j+1} ~ q_j is accepted with probability min(1, p_j(d) / q_j(d)); on rejection
  the token is drawn from norm(max(p_j - q_j, 0)). For deterministic proposals (n-gram) q_j is a
  point mass on d. Every emitted token is then distributed exactly as p_j.
- all k accepted: one more token is drawn from p_k (greedy: its argmax).

Draws come from the request's own generator (uniforms for acceptance; the sampler's exponential
race for a token), so a seeded request stays reproducible for a given draft sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Verified:
    """token_ids[i] came from draft position i (scores row i); the tokens before the last are
    the accepted drafts, the last is the target's own choice."""

    token_ids: list[int]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify_drafts(scores: torch.Tensor, drafts: list[int], greedy: bool, generator: torch.Generator | None,
                  draft_probs: torch.Tensor | None = None) -> Verified:
    """`scores` [k + 1, V] processed target scores; `draft_probs` [>= k, V] the distributions the
    drafts were sampled from, or None for point masses (n-gram, greedy drafting)."""
    if scores.shape[0] != len(drafts) + 1:
        raise ValueError(f"scores has {scores.shape[0]} rows for {len(drafts)} drafts; expected drafts + 1")
    if greedy:
        return _verify_greedy(scores, drafts)
    probs = scores.softmax(dim=-1)
    accepted: list[int] = []
    for j, d in enumerate(drafts):
        p = probs[j]
        q_d = float(draft_probs[j, d]) if draft_probs is not None else 1.0
        p_d = float(p[d])
        if q_d > 0.0 and (p_d >= q_d or _uniform(generator) * q_d < p_d):
            accepted.append(d)
            continue
        residual = _residual(p, d, draft_probs[j] if draft_probs is not None else None)
        return Verified(accepted + [sample_from(residual, generator)])
    return Verified(accepted + [sample_from(probs[len(drafts)], generator)])


def _verify_greedy(scores: torch.Tensor, drafts: list[int]) -> Verified:
    targets, accepted = greedy_acceptance(scores, [drafts])
    return Verified(targets[: int(accepted[0]) + 1].tolist())


def greedy_acceptance(scores: torch.Tensor, drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of every row at once, on the scores' device without a host sync.
    `scores` [sum(k_r + 1), V]: row r's k_r + 1 positions in order; `drafts` row r's k_r drafts.
    Returns (targets [sum(k_r + 1)]: the argmax at every position, accepted [R]: how many of
    row r's drafts equal the argmax before them, up to the first mismatch). Row r then emits
    targets[start_r : start_r + accepted_r + 1] (its accepted drafts are those targets)."""
    targets = scores.argmax(dim=-1)
    device = targets.device
    lengths = torch.tensor([len(d) for d in drafts], dtype=torch.long)
    width = int(lengths.max()) if drafts else 0
    if width == 0:
        return targets, torch.zeros(len(drafts), dtype=torch.long, device=device)
    starts = (lengths + 1).cumsum(0) - (lengths + 1)
    offsets = torch.arange(width)
    valid = offsets[None, :] < lengths[:, None]
    positions = torch.where(valid, starts[:, None] + offsets[None, :], 0).to(device)
    padded = torch.tensor([d + [-1] * (width - len(d)) for d in drafts], dtype=targets.dtype, device=device)
    match = (targets[positions] == padded) & valid.to(device)
    return targets, match.to(torch.long).cumprod(dim=1).sum(dim=1)


def _residual(p: torch.Tensor, draft: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(p - q, 0)); q a point mass on `draft` when None. Positive whenever a rejection
    was possible (p(d) < q(d) implies mass elsewhere)."""
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q.to(p.dtype)).clamp_(min=0.0)
    total = float(residual.sum())
    return residual / total if total > 0.0 else p


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` [V] by the sampler's exponential race (argmax p / Exp(1))."""
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(1, generator=generator)
    return int((probs.to(torch.float32) / noise).argmax())

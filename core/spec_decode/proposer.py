"""Proposers: where draft tokens come from. The engine asks once per step, before scheduling."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from textgen.core.spec_decode.ngram import propose_ngram

if TYPE_CHECKING:
    from textgen.core.scheduler import Request


@dataclass(slots=True)
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), V] the drafts were sampled from; None = point masses


@dataclass(slots=True)
class DraftQuery:
    """One decoding request and the most drafts worth proposing for it."""

    request: Request
    max_drafts: int
    generator: torch.Generator | None


class Proposer(Protocol):
    name: str

    def propose(self, queries: Sequence[DraftQuery]) -> dict[str, Draft]:
        """Drafts for some of the queries (a missing id proposes nothing). Requests absent from
        `queries` that were asked before may be forgotten."""
        ...


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, queries: Sequence[DraftQuery]) -> dict[str, Draft]:
        drafts = {}
        for q in queries:
            tokens = propose_ngram(q.request.all_token_ids, q.max_drafts, self.max_ngram, self.min_ngram)
            if tokens:
                drafts[q.request.request_id] = Draft(tokens)
        return drafts

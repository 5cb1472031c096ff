"""Batched greedy verification (`greedy_acceptance`): every row's accepted drafts and emitted
tokens equal the left-to-right rule (accept while the draft is the argmax, then emit the argmax)
applied row by row."""
from __future__ import annotations

import torch

from textgen.core.spec_decode.rejection import greedy_acceptance


def left_to_right(scores: torch.Tensor, drafts: list[int]) -> list[int]:
    out = []
    for j, d in enumerate(drafts):
        target = int(scores[j].argmax())
        if target != d:
            return out + [target]
        out.append(d)
    return out + [int(scores[len(drafts)].argmax())]


def test_batched_acceptance_equals_the_row_by_row_rule():
    gen = torch.Generator().manual_seed(0)
    vocab = 7  # small: drafts often hit the argmax, so every acceptance length occurs
    for trial in range(200):
        lengths = torch.randint(0, 5, (torch.randint(1, 6, (1,), generator=gen).item(),), generator=gen).tolist()
        scores = torch.randn((sum(k + 1 for k in lengths), vocab), generator=gen)
        drafts, first = [], 0
        for k in lengths:
            argmax = scores[first:first + k].argmax(dim=-1)
            guess = torch.randint(0, vocab, (k,), generator=gen)
            drafts.append(torch.where(torch.rand(k, generator=gen) < 0.7, argmax, guess).tolist())
            first += k + 1
        targets, accepted = greedy_acceptance(scores, drafts)
        first = 0
        for r, k in enumerate(lengths):
            emitted = targets[first:first + int(accepted[r]) + 1].tolist()
            assert emitted == left_to_right(scores[first:first + k + 1], drafts[r]), (trial, r)
            first += k + 1
        assert targets.tolist() == scores.argmax(dim=-1).tolist()


def test_no_drafts_and_all_accepted():
    scores = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    targets, accepted = greedy_acceptance(scores, [[1, 0], []])
    assert targets.tolist() == [1, 0, 2, 1] and accepted.tolist() == [2, 0]
    targets, accepted = greedy_acceptance(scores[:2], [[], []])
    assert accepted.tolist() == [0, 0]

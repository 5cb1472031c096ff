"""Rejection sampling of draft tokens (core/spec_decode/rejection.py) keeps the target
distribution exactly: many seeded trials on a 6-token vocabulary, compared with the target by
chi-square and total variation, against a draft distribution far from the target (so a sampler
that accepted drafts blindly, or resampled from the wrong residual, fails). Deterministic: one
fixed seed."""
from __future__ import annotations

import pytest
import torch

from textgen.core.spec_decode.rejection import verify_drafts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, K, TRIALS = 6, 2, 8000
CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


def dist(values: list[float]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


P = torch.stack([dist([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]), dist([0.05, 0.05, 0.10, 0.20, 0.25, 0.35]),
                 dist([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])])  # target p_0, p_1 and the bonus position p_2
Q = torch.stack([dist([0.05, 0.10, 0.10, 0.15, 0.20, 0.40]), dist([0.50, 0.20, 0.10, 0.10, 0.05, 0.05])])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def run_trials(draft_probs: torch.Tensor | None, fixed_drafts: list[int] | None = None):
    gen = torch.Generator().manual_seed(1234)
    scores = P.log()
    first, second, accepted_first = torch.zeros(V), torch.zeros(V), 0
    sampled = torch.stack([torch.multinomial(Q[j], TRIALS, replacement=True, generator=gen) for j in range(K)], 1)
    for i in range(TRIALS):
        drafts = fixed_drafts if fixed_drafts is not None else sampled[i].tolist()
        out = verify_drafts(scores, drafts, greedy=False, generator=gen, draft_probs=draft_probs)
        first[out.token_ids[0]] += 1
        if len(out.token_ids) > 1:
            second[out.token_ids[1]] += 1
        accepted_first += out.num_accepted >= 1
    return first, second, accepted_first / TRIALS


@pytest.mark.parametrize("mode", ["draft model q", "point mass (n-gram)"])
def test_emitted_tokens_follow_the_target_distribution(mode):
    if mode == "draft model q":
        first, second, acceptance = run_trials(Q)
        expected_acceptance = float(torch.minimum(P[0], Q[0]).sum())  # sum_x min(p, q)
    else:
        first, second, acceptance = run_trials(None, fixed_drafts=[5, 0])
        expected_acceptance = float(P[0, 5])  # a point mass on 5 is accepted with p_0(5)
    assert chi_square(first, P[0]) < CHI2_DF5_P001
    assert chi_square(second, P[1]) < CHI2_DF5_P001  # given the first draft was accepted
    assert 0.5 * float((first / first.sum() - P[0]).abs().sum()) < 0.03
    assert abs(acceptance - expected_acceptance) < 0.02
    assert 0.5 * float((Q[0] - P[0]).abs().sum()) > 0.3  # the draft alone would fail these bounds


def test_blind_acceptance_would_fail_the_same_check():
    """The statistical check has teeth: the drafts' own distribution is rejected by it."""
    gen = torch.Generator().manual_seed(1234)
    counts = torch.bincount(torch.multinomial(Q[0], TRIALS, replacement=True, generator=gen), minlength=V).float()
    assert chi_square(counts, P[0]) > 100 * CHI2_DF5_P001


def test_greedy_accepts_while_drafts_equal_the_argmax():
    scores = P.log()  # argmax: 0, 5, 0
    assert verify_drafts(scores, [0, 5], greedy=True, generator=None).token_ids == [0, 5, 0]
    assert verify_drafts(scores, [0, 4], greedy=True, generator=None).token_ids == [0, 5]
    assert verify_drafts(scores, [3, 5], greedy=True, generator=None).token_ids == [0]


def test_a_draft_the_target_forbids_is_never_emitted():
    scores = P.log().clone()
    scores[0, 2] = float("-inf")  # e.g. masked by a grammar or cut by top-k
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = verify_drafts(scores, [2, 1], greedy=False, generator=gen)
        assert out.token_ids[0] != 2 and out.num_accepted == 0


def test_seeded_verification_is_reproducible():
    runs = [verify_drafts(P.log(), [1, 3], greedy=False, generator=torch.Generator().manual_seed(7), draft_probs=Q).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]

"""Scheduler with draft tokens (speculative decoding), on the paged toy model of test_scheduler.

`SpecPagedModel` writes every scheduled token, drafts included, into its KV slot through the
block table, then verifies greedily: the target token at each draft position is a function of the
context read back through the block table. A request whose rejected drafts' slots were not
rewritten before use, a wrong roll-back of num_computed_tokens, or a block published with draft
KV changes the tokens, so every run is compared with the same requests without drafts.
"""
from __future__ import annotations

import random

from textgen.core.scheduler import FinishReason, Request, Scheduler, SchedulerConfig, SchedulerOutput
from tests.unit.test_scheduler import EOS, PagedModel, assert_pool_fully_free, next_token, req


class SpecPagedModel(PagedModel):
    def __call__(self, out: SchedulerOutput) -> dict[str, list[int]]:
        sampled = {}
        for s in out.scheduled:
            start, k = s.num_computed_tokens, len(s.spec_token_ids)
            assert s.token_ids == s.request.all_token_ids[start:start + s.num_new_tokens - k] + s.spec_token_ids
            for pos, token in enumerate(s.token_ids, start=start):
                self.kv[self._slot(s.block_ids, pos)] = token
            if not s.sample:
                continue
            end = start + s.num_new_tokens
            tokens = []
            for p in range(end - k, end + 1):  # positions of the last real token, then each draft
                target = next_token([self.kv[self._slot(s.block_ids, q)] for q in range(p)])
                tokens.append(target)
                if p == end or s.spec_token_ids[p - (end - k)] != target:
                    break
            sampled[s.request.request_id] = tokens
        return sampled


def true_continuation(request: Request, n: int) -> list[int]:
    context = list(request.all_token_ids)
    for _ in range(n):
        context.append(next_token(context))
    return context[request.num_tokens:]


def propose(sched: Scheduler, rng: random.Random, k: int) -> None:
    """Drafts for decoding requests: the true continuation, sometimes corrupted at a random spot."""
    for r in sched.running:
        if r.num_tokens - r.num_computed_tokens != 1:
            continue
        drafts = true_continuation(r, rng.randint(1, k))
        if rng.random() < 0.5:
            drafts[rng.randrange(len(drafts))] += 1
        r.spec_token_ids = drafts


def check_kv(sched: Scheduler, model: PagedModel) -> None:
    """Computed positions hold the request's tokens; every published block holds what its hash says."""
    kv = sched.kv_manager
    for r in sched.running:
        ids = kv.get_block_ids(r.request_id)
        assert [model.kv[model._slot(ids, p)] for p in range(r.num_computed_tokens)] == r.all_token_ids[:r.num_computed_tokens]
        for i in range(kv._num_published.get(r.request_id, 0)):
            lo = i * kv.block_size
            assert [model.kv[ids[i] * kv.block_size + j] for j in range(kv.block_size)] == r.all_token_ids[lo:lo + kv.block_size]


def run(requests: list[Request], k: int, seed: int = 0, budget: int = 24, num_blocks: int = 64,
        block_size: int = 4) -> tuple[Scheduler, int]:
    sched = Scheduler(SchedulerConfig(budget, 8, 256, block_size, num_blocks, True))
    model = SpecPagedModel(block_size, num_blocks)
    rng, accepted, steps = random.Random(seed), 0, 0
    for r in requests:
        sched.add_request(r)
    while sched.has_unfinished():
        if k:
            propose(sched, rng, k)
        out = sched.schedule()
        updates = sched.update(out, model(out))
        accepted += sum(len(u.new_token_ids) - 1 for u in updates)
        check_kv(sched, model)
        steps += 1
        assert steps < 2000
    return sched, accepted


def make_requests(n: int = 12) -> list[Request]:
    rng = random.Random(7)
    return [req(f"r{i}", [rng.randrange(5, 900) for _ in range(rng.randint(3, 30))], max_new=rng.randint(1, 20))
            for i in range(n)]


def test_drafts_change_no_token_with_chunked_prefill_and_prefix_caching():
    plain = make_requests()
    run(plain, k=0)
    spec = make_requests()
    sched, accepted = run(spec, k=5)
    assert accepted > 20  # the accept path ran, not only rejections
    for a, b in zip(plain, spec):
        assert b.output_token_ids == a.output_token_ids and b.finish_reason == FinishReason.LENGTH
        assert len(b.output_token_ids) == b.sampling_params.max_new_tokens
    assert_pool_fully_free(sched)


def test_drafts_under_preemption():
    plain = make_requests()
    run(plain, k=0, num_blocks=14)
    spec = make_requests()
    sched, _ = run(spec, k=5, num_blocks=14)
    assert sched.stats().num_preemptions > 0
    assert [r.output_token_ids for r in spec] == [r.output_token_ids for r in plain]


def test_decode_step_with_drafts_allocates_their_slots_and_rolls_back():
    sched = Scheduler(SchedulerConfig(64, 8, 256, 4, 16, True))
    model = SpecPagedModel(4, 16)
    a = req("a", range(10, 16), max_new=10)
    sched.add_request(a)
    sched.update(out := sched.schedule(), model(out))
    truth = true_continuation(a, 4)
    a.spec_token_ids = [truth[0], truth[1], truth[2] + 1]  # the third draft is wrong
    out = sched.schedule()
    s = out.scheduled[0]
    assert (s.num_computed_tokens, s.num_new_tokens, s.block_ids, s.spec_token_ids) == (6, 4, [0, 1, 2], a.spec_token_ids)
    [u] = sched.update(out, model(out))
    assert u.new_token_ids == truth[:3] and a.output_token_ids[1:] == truth[:3]
    assert a.num_computed_tokens == 9  # the last real token and 2 accepted drafts; the wrong one's slot is stale
    assert a.spec_token_ids == []
    assert [b.block_id for b in sched.kv_manager.pool.blocks if b.block_hash is not None] == [0, 1]


def test_drafts_never_land_past_a_stop():
    for max_new, stop_at, reason in ((3, None, FinishReason.LENGTH), (10, 1, FinishReason.STOP_SEQUENCE)):
        sched = Scheduler(SchedulerConfig(64, 8, 256, 4, 16, True))
        model = SpecPagedModel(4, 16)
        probe = req("a", range(10, 16), max_new=max_new)
        sched.add_request(probe)
        sched.update(out := sched.schedule(), model(out))
        truth = true_continuation(probe, 4)
        if stop_at is not None:  # a stop token id among the accepted drafts
            probe.sampling_params.stop_token_ids = [truth[stop_at]]
        probe.spec_token_ids = truth
        out = sched.schedule()
        [u] = sched.update(out, model(out))
        expected = truth[:2] if stop_at is None else truth[:stop_at + 1]
        assert u.new_token_ids == expected and probe.output_token_ids[1:] == expected
        assert u.finished and u.finish_reason == reason and probe.is_finished
        assert_pool_fully_free(sched)


def test_drafts_skip_when_the_cache_has_no_room_and_never_preempt():
    sched = Scheduler(SchedulerConfig(64, 8, 256, 4, 3, True))
    model = SpecPagedModel(4, 3)
    a = req("a", range(10, 17), max_new=4)  # 7 tokens: 2 blocks, the 8th slot free
    sched.add_request(a)
    sched.update(out := sched.schedule(), model(out))
    sched.add_request(b := req("b", range(30, 33), max_new=1))
    sched.update(out := sched.schedule(), model(out))
    assert b.is_finished
    a.spec_token_ids = true_continuation(a, 4)  # would need 2 more blocks; 1 is free
    out = sched.schedule()
    assert [(s.num_new_tokens, s.spec_token_ids) for s in out.scheduled] == [(1, [])]
    assert out.preempted_ids == []

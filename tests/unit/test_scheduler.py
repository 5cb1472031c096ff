"""Scheduler: chunked prefill, decode/prefill mixing, batch limits, priorities, preemption by
recompute, skip-not-stall admission, aborts, prefix-hit accounting and stop checks.

The "model" is `PagedModel`: it writes every scheduled token into its KV slot (through the block
table the scheduler gave) and samples a token that is a fixed function of the context read back
through that block table. A wrong block table, a prefix hit on the wrong block, or a block reused
while still needed changes the sampled tokens, so comparing with a run alone checks all of them.
"""
from __future__ import annotations

import random

import pytest

from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import FinishReason, Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2


def next_token(context: list[int]) -> int:
    return sum((i + 7) * t for i, t in enumerate(context)) % 991 + 5  # never EOS


class PagedModel:
    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size = block_size
        self.kv: list[int | None] = [None] * (block_size * num_blocks)

    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def __call__(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for s in out.scheduled:
            start = s.num_computed_tokens
            assert s.token_ids == s.request.all_token_ids[start:start + s.num_new_tokens]
            for pos, token in enumerate(s.token_ids, start=s.num_computed_tokens):
                self.kv[self._slot(s.block_ids, pos)] = token
            if s.sample:
                end = s.num_computed_tokens + s.num_new_tokens
                context = [self.kv[self._slot(s.block_ids, p)] for p in range(end)]
                sampled[s.request.request_id] = next_token(context)
        return sampled


def make(budget: int = 64, batch: int | None = 8, max_len: int = 256, block_size: int = 4, num_blocks: int = 64,
         prefix_caching: bool = True) -> tuple[Scheduler, PagedModel]:
    cfg = SchedulerConfig(budget, batch, max_len, block_size, num_blocks, prefix_caching)
    return Scheduler(cfg), PagedModel(block_size, num_blocks)


def req(rid: str, prompt: list[int], max_new: int = 4, priority: int = 0, **params) -> Request:
    params.setdefault("ignore_eos", True)
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new, **params), frozenset({EOS}),
                   priority=priority)


def step(sched: Scheduler, model: PagedModel) -> SchedulerOutput:
    out = sched.schedule()
    sched.update(out, model(out))
    return out


def rows(out: SchedulerOutput) -> list[tuple]:
    return [(s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_ids, s.sample)
            for s in out.scheduled]


def run_all(sched: Scheduler, model: PagedModel, max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched, model))
        assert len(outs) < max_steps, "the scheduler stopped making progress"
    return outs


def alone(request: Request) -> list[int]:
    sched, model = make(budget=512, num_blocks=256, max_len=512, prefix_caching=False)
    fresh = req(request.request_id, request.prompt_token_ids, request.sampling_params.max_new_tokens)
    sched.add_request(fresh)
    run_all(sched, model)
    return fresh.output_token_ids


def assert_pool_fully_free(sched: Scheduler) -> None:
    kv = sched.kv_manager
    assert sorted(kv.free_block_ids()) == list(range(kv.num_blocks))
    assert [b.ref_cnt for b in kv.pool.blocks] == [0] * kv.num_blocks and kv.usage == 0.0


def test_chunked_prefill_splits_the_prompt_by_the_budget():
    sched, model = make(budget=16)
    a = req("a", range(100, 140), max_new=3)
    sched.add_request(a)
    outs = [step(sched, model)]
    published = [b.block_id for b in sched.kv_manager.pool.blocks if b.block_hash is not None]
    assert published == [0, 1, 2, 3]  # only the chunk whose KV was computed
    outs += run_all(sched, model)
    assert [rows(o) for o in outs] == [
        [("a", 0, 16, [0, 1, 2, 3], False)],
        [("a", 16, 16, [0, 1, 2, 3, 4, 5, 6, 7], False)],
        [("a", 32, 8, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True)],
        [("a", 40, 1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], True)],
        [("a", 41, 1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], True)],
    ]
    assert outs[2].scheduled[0].token_ids == list(range(132, 140))
    assert a.output_token_ids == alone(a) and a.finish_reason == FinishReason.LENGTH


def test_decode_and_prefill_chunks_share_one_step():
    sched, model = make(budget=16)
    sched.add_request(req("a", range(6), max_new=8))
    assert rows(step(sched, model)) == [("a", 0, 6, [0, 1], True)]
    sched.add_request(b := req("b", range(50, 80), max_new=2))
    out = step(sched, model)
    assert rows(out) == [("a", 6, 1, [0, 1], True), ("b", 0, 15, [2, 3, 4, 5], False)]
    assert out.num_scheduled_tokens == 16
    assert rows(step(sched, model)) == [("a", 7, 1, [0, 1], True), ("b", 15, 15, [2, 3, 4, 5, 6, 7, 8, 9], True)]
    assert rows(step(sched, model)) == [("a", 8, 1, [0, 1, 10], True), ("b", 30, 1, [2, 3, 4, 5, 6, 7, 8, 9], True)]
    assert b.is_finished and b.output_token_ids == alone(b)


def test_max_batch_size_caps_running_requests():
    sched, model = make(batch=2)
    for rid in "abc":
        sched.add_request(req(rid, [1, 2, 3], max_new=2))
    outs = run_all(sched, model)
    assert [[s.request.request_id for s in o.scheduled] for o in outs] == [["a", "b"], ["a", "b"], ["c"], ["c"]]
    assert outs[2].finished_ids == ["a", "b"]


def test_priority_then_arrival_order():
    sched, model = make(batch=1)
    for rid, priority in [("x", 1), ("y", 0), ("z", 1), ("w", 0)]:
        sched.add_request(req(rid, [1, 2, 3], max_new=1, priority=priority))
    outs = run_all(sched, model)
    assert [o.scheduled[0].request.request_id for o in outs] == ["y", "w", "x", "z"]


def test_preemption_by_recompute_when_blocks_run_out():
    sched, model = make(num_blocks=4)
    a, b = req("a", [1, 2, 3, 4, 5, 6], max_new=6), req("b", [9, 8, 7, 6, 5, 4], max_new=6)
    sched.add_request(a)
    sched.add_request(b)
    outs = run_all(sched, model)
    assert rows(outs[0]) == [("a", 0, 6, [0, 1], True), ("b", 0, 6, [2, 3], True)]
    # a needs a third block: b (latest arrival) is preempted, freed tail-first, and a gets block 3
    assert (rows(outs[3]), outs[3].preempted_ids) == ([("a", 8, 1, [0, 1, 3], True)], ["b"])
    assert b.num_preemptions == 1
    # b cannot come back while a holds 3 blocks (its hit [2] + 2 new > 1 free): it waits
    assert [o.scheduled[0].request.request_id for o in outs[4:6]] == ["a", "a"]
    # after a finishes, b recomputes prompt + its 3 outputs, reusing its first block from the cache
    assert rows(outs[6]) == [("b", 4, 5, [2, 3, 1], True)] and outs[6].finished_ids == ["a"]
    assert (a.output_token_ids, b.output_token_ids) == (alone(a), alone(b))
    assert (b.num_cached_tokens, len(b.output_token_ids)) == (0, 6)  # counted at its first schedule only
    stats = sched.stats()
    assert (stats.num_preemptions, stats.num_prompt_tokens_computed, stats.num_prompt_tokens_cached) == (1, 14, 4)
    assert sched.kv_manager.free_block_ids() == [0, 1, 3, 2]  # b released [2, 3, 1] tail-first after a
    assert_pool_fully_free(sched)


def test_request_preempts_itself_when_it_is_the_lowest():
    sched, model = make(num_blocks=4)
    sched.add_request(b := req("b", [9, 8, 7, 6, 5, 4, 3], max_new=4, priority=1))  # arrives first
    sched.add_request(a := req("a", [1, 2, 3, 4, 5, 6], max_new=4, priority=0))
    assert rows(step(sched, model)) == [("a", 0, 6, [0, 1], True), ("b", 0, 7, [2, 3], True)]
    step(sched, model)
    out = step(sched, model)  # b needs a third block, a does not: b gives up its own
    assert (rows(out), out.preempted_ids) == ([("a", 7, 1, [0, 1], True)], ["b"])
    assert b.status is RequestStatus.PREEMPTED and (b.num_computed_tokens, len(b.output_token_ids)) == (0, 2)
    run_all(sched, model)
    assert (a.output_token_ids, b.output_token_ids) == (alone(a), alone(b))
    assert_pool_fully_free(sched)


def test_many_requests_under_pressure_match_their_runs_alone():
    rng = random.Random(0)
    shared = [rng.randrange(5, 900) for _ in range(10)]
    sched, model = make(budget=16, batch=6, num_blocks=14)
    requests = []
    for i in range(12):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(5, 900) for _ in range(rng.randrange(1, 14))]
        requests.append(req(f"r{i}", prompt, max_new=rng.randrange(1, 16), priority=rng.randrange(3)))
    for r in requests[:8]:
        sched.add_request(r)
    outs = [step(sched, model) for _ in range(5)]
    for r in requests[8:]:
        sched.add_request(r)
    outs += run_all(sched, model)
    assert all(o.num_scheduled_tokens <= 16 and len(o.scheduled) <= 6 for o in outs)
    assert sched.stats().num_preemptions > 0 and sched.stats().prefix_cache_hits > 0
    for r in requests:
        assert r.output_token_ids == alone(r), r.request_id
        assert r.finish_reason == FinishReason.LENGTH
    stats = sched.stats()
    assert stats.num_prompt_tokens_computed == sum(  # prompt positions run, recomputations included
        max(0, min(s.num_computed_tokens + s.num_new_tokens, s.request.num_prompt_tokens) - s.num_computed_tokens)
        for o in outs for s in o.scheduled)
    total_prompt_tokens = sum(r.num_prompt_tokens for r in requests)
    assert stats.num_prompt_tokens_computed + stats.num_prompt_tokens_cached >= total_prompt_tokens
    assert_pool_fully_free(sched)


def test_waiting_request_without_room_is_skipped_not_stalling_others():
    sched, model = make(num_blocks=6)
    sched.add_request(r := req("r", range(100, 112), max_new=8))
    step(sched, model)  # r holds blocks 0-2 and has 13 tokens
    sched.add_request(big := req("big", range(200, 216), max_new=1))  # needs 4 blocks
    sched.add_request(small := req("small", [7, 8, 9], max_new=8))
    out = step(sched, model)
    assert rows(out) == [("r", 12, 1, [0, 1, 2, 3], True), ("small", 0, 3, [4], True)]
    assert sched.waiting == [big] and big.status is RequestStatus.WAITING
    outs = [step(sched, model) for _ in range(4)]
    assert [o.preempted_ids for o in outs] == [[], [], [], ["small"]]  # r needs a 5th block
    assert sched.waiting == [small, big]  # a preempted request goes back to the front
    run_all(sched, model)
    assert (big.output_token_ids, small.output_token_ids, r.output_token_ids) == (alone(big), alone(small), alone(r))


def test_no_lower_priority_admission_in_the_step_that_preempted():
    sched, model = make(num_blocks=5)
    sched.add_request(a := req("a", range(1, 8), max_new=6, priority=0))
    sched.add_request(b := req("b", range(11, 18), max_new=6, priority=1))
    step(sched, model)
    sched.add_request(c := req("c", range(21, 29), max_new=1, priority=2))  # 2 blocks, 1 free
    assert [s.request.request_id for s in step(sched, model).scheduled] == ["a", "b"]
    out = step(sched, model)  # a takes the last block, b preempts itself and frees 2
    assert (rows(out), out.preempted_ids) == ([("a", 8, 1, [0, 1, 4], True)], ["b"])
    assert sched.waiting == [b, c] and sched.kv_manager.num_free_blocks == 2  # c would fit: not now
    run_all(sched, model)
    assert [r.output_token_ids for r in (a, b, c)] == [alone(a), alone(b), alone(c)]
    assert_pool_fully_free(sched)


def test_abort_frees_blocks_now_and_is_reported_at_the_next_step():
    sched, model = make()
    for rid in ("a", "b", "w"):
        sched.add_request(req(rid, range(10, 20), max_new=20))
    sched.config.max_batch_size = 2  # keep w waiting
    step(sched, model)
    step(sched, model)
    assert sched.kv_manager.get_block_ids("a") == [0, 1, 2]
    assert sched.finish_requests(["a", "unknown", "w"], FinishReason.ABORTED) == ["a", "w"]
    assert sched.kv_manager.get_block_ids("a") == [] and sched.num_waiting == 0
    assert sched.get_request("a").status is RequestStatus.FINISHED_ABORTED
    out = step(sched, model)
    assert out.finished_ids == ["a", "w"] and [s.request.request_id for s in out.scheduled] == ["b"]
    assert sched.get_request("a") is None
    out = sched.schedule()
    assert sched.finish_requests("b", FinishReason.ABORTED) == ["b"]  # between schedule and update
    assert sched.update(out, model(out)) == []
    assert not sched.has_unfinished() and sched.schedule().finished_ids == ["b"]
    assert_pool_fully_free(sched)
    with pytest.raises(ValueError):
        sched.finish_requests(["b"], "bogus")


def test_shared_200_token_prefix_computes_only_new_tokens():
    rng = random.Random(1)
    prefix = [rng.randrange(5, 900) for _ in range(200)]
    sched, model = make(budget=512, block_size=16, num_blocks=40, max_len=512)
    first = req("first", prefix + [1, 2, 3, 4, 5])
    sched.add_request(first)
    run_all(sched, model)
    before = sched.stats()
    assert (before.num_prompt_tokens_computed, before.num_prompt_tokens_cached) == (205, 0)
    second = req("second", prefix + [6, 7, 8, 9, 10])
    sched.add_request(second)
    outs = run_all(sched, model)
    after = sched.stats()
    assert rows(outs[0])[0][1:3] == (192, 13) and outs[0].scheduled[0].token_ids == second.all_token_ids[192:205]
    assert second.num_cached_tokens == 192 and first.num_cached_tokens == 0
    assert after.num_prompt_tokens_computed - before.num_prompt_tokens_computed == 13
    assert after.num_prompt_tokens_cached == 192
    assert (after.prefix_cache_queries, after.prefix_cache_hits) == (410, 192)
    assert after.prefix_cache_hit_rate == pytest.approx(192 / 410)
    assert second.output_token_ids == alone(second)


def test_multi_turn_hits_generated_blocks():
    sched, model = make()
    sched.add_request(turn1 := req("t1", [1, 2, 3, 4, 5, 6], max_new=6))
    run_all(sched, model)  # 12 tokens, the last never computed: blocks 0 and 1 published
    sched.add_request(turn2 := req("t2", turn1.all_token_ids + [40, 41], max_new=1))
    out = step(sched, model)
    assert rows(out) == [("t2", 8, 6, [0, 1, 3, 4], True)]
    assert turn2.num_cached_tokens == 8


@pytest.mark.parametrize(("script", "params", "max_len", "expected"), [
    ([9, EOS, 9], {}, 64, ([9, EOS], FinishReason.EOS_TOKEN)),
    ([9, EOS, 9], {"ignore_eos": True}, 64, ([9, EOS, 9], FinishReason.LENGTH)),
    ([EOS, EOS, EOS], {"min_new_tokens": 3}, 64, ([EOS, EOS, EOS], FinishReason.EOS_TOKEN)),
    ([EOS, EOS, 9], {"min_new_tokens": 3}, 64, ([EOS, EOS, 9], FinishReason.LENGTH)),
    ([9, 77, 9], {"stop_token_ids": [77]}, 64, ([9, 77], FinishReason.STOP_SEQUENCE)),
    ([9, 9, 9], {}, 6, ([9, 9], FinishReason.LENGTH)),  # max_model_len: 4 + 2 tokens
])
def test_stop_checks(script, params, max_len, expected):
    sched, _ = make(max_len=max_len)
    r = Request("r", [1, 2, 3, 4], SamplingParams(max_new_tokens=3, **params), frozenset({EOS}))
    sched.add_request(r)
    updates = []
    while sched.has_unfinished():
        out = sched.schedule()
        updates += sched.update(out, {"r": script[len(r.output_token_ids)]})
    assert (r.output_token_ids, r.finish_reason) == expected
    assert [u.new_token_ids[0] for u in updates] == expected[0]
    assert [u.finished for u in updates] == [False] * (len(expected[0]) - 1) + [True]
    assert updates[-1].finish_reason == expected[1] and r.status is RequestStatus.finished(expected[1])
    assert_pool_fully_free(sched)


def test_add_request_rejects_what_can_never_run():
    sched, _ = make(max_len=16, num_blocks=3)
    sched.add_request(req("ok", range(8), max_new=5))  # 12 tokens computed at most = 3 blocks
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(req("ok", [1]))
    with pytest.raises(ValueError, match="maximum is 15"):
        sched.add_request(req("long", range(16)))
    with pytest.raises(ValueError, match="4 KV blocks"):
        sched.add_request(req("big", range(8), max_new=6))
    with pytest.raises(ValueError, match="max_batch_prefill_tokens"):
        SchedulerConfig(0, 8, 16, 4, 3)


def test_stats_snapshot():
    sched, model = make(batch=1)
    sched.add_request(req("a", range(5), max_new=2))
    sched.add_request(req("b", range(5), max_new=2))
    step(sched, model)
    stats = sched.stats()
    assert (stats.num_waiting, stats.num_running, stats.kv_cache_usage) == (1, 1, 2 / 64)
    assert sched.get_request("b").status is RequestStatus.WAITING

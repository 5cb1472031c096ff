"""Tensor-parallel plumbing without processes: flags and torchrun variables -> topology, and the
step diff rank 0 sends (a worker's copy of the requests follows the scheduler exactly)."""
from __future__ import annotations

import argparse

import pytest
import torch

from textgen.api.launcher_flags import add_flags, resolve
from textgen.api.shards import topology_for
from textgen.core.engine.model_runner import RowSampling
from textgen.core.engine.step_plan import PlanBuilder, WorkerRequests
from textgen.core.engine.topology import ShardTopology, TopologyError, resolve_topology, visible_devices_for
from textgen.core.sampling import make_generator
from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import Request, Scheduler, SchedulerConfig


def _options(argv: list[str], env: dict[str, str]) -> dict:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve(parser.parse_args(argv), env)


def test_tgi_flags_and_sagemaker_variable() -> None:
    o = _options([], {})
    assert (o["num_shard"], o["master_addr"], o["master_port"]) == (None, "localhost", 29500)
    assert topology_for(o, {}) is None  # one shard: no process group at all
    assert _options([], {"NUM_SHARD": "2", "SM_NUM_GPUS": "4"})["num_shard"] == 4  # TGI's entrypoint exports it
    assert _options(["--num-shard", "2"], {"SM_NUM_GPUS": "4"})["num_shard"] == 2
    o = _options(["--num-shard", "2", "--master-port", "29601"], {"MASTER_ADDR": "10.0.0.1"})
    assert topology_for(o, {}) == ShardTopology(2, (0, 1), "10.0.0.1", 29601)


def test_torchrun_variables() -> None:
    per_node = resolve_topology(2, "h", 1, {"WORLD_SIZE": "4", "NODE_RANK": "1"})
    assert (per_node.local_ranks, per_node.serves_http, per_node.per_process) == ((2, 3), False, False)
    per_process = resolve_topology(1, "h", 1, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"})
    assert (per_process.local_ranks, per_process.serves_http, per_process.per_process) == ((1,), False, True)
    assert resolve_topology(1, "h", 1, {"WORLD_SIZE": "2", "RANK": "0"}).serves_http
    assert ShardTopology(2, (0, 1), "h", 1).threads_per_rank(cpu_count=2) == 1
    for env, message in [({"WORLD_SIZE": "3"}, "WORLD_SIZE 3 is not a multiple of --num-shard 2"),
                         ({"WORLD_SIZE": "4", "NODE_RANK": "2"}, "NODE_RANK 2 with 2 ranks per node is outside"),
                         ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
                         ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK 2 must be in \[0, WORLD_SIZE=2\)"),
                         ({"NODE_RANK": "x"}, "NODE_RANK must be an integer")]:
        with pytest.raises(TopologyError, match=message):
            resolve_topology(2, "h", 1, env)


def test_each_local_rank_sees_its_own_device() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "4,5", "HIP_VISIBLE_DEVICES": "3"}
    assert visible_devices_for(1, env) == {"CUDA_VISIBLE_DEVICES": "5"}
    with pytest.raises(TopologyError, match="lists 2 devices; local rank 2 has none"):
        visible_devices_for(2, env)
    assert visible_devices_for(1, {}) == {"CUDA_VISIBLE_DEVICES": "1"}


def test_the_worker_copy_follows_the_scheduler_through_chunks_preemption_and_finishes() -> None:
    """Drive a real scheduler with a tiny cache; after every step the worker's rebuilt
    SchedulerOutput must equal rank 0's field by field, and the diffs stay small."""
    sched = Scheduler(SchedulerConfig(max_batch_prefill_tokens=8, max_batch_size=None, max_model_len=64,
                                      block_size=4, num_blocks=8))
    builder, worker = PlanBuilder(), WorkerRequests(torch.device("cpu"))
    rows = {}
    for i in range(3):
        params = SamplingParams(max_new_tokens=10, ignore_eos=True, do_sample=i == 1, seed=7 if i == 1 else None)
        sched.add_request(Request(f"r{i}", list(range(1 + i, 11 + i)), params))
        rows[f"r{i}"] = RowSampling(params, make_generator(7, torch.device("cpu")) if i == 1 else None)
    token, preempted, cached_sent = 100, 0, 0
    while sched.has_unfinished():
        out = sched.schedule()
        preempted += len(out.preempted_ids)
        if not out.scheduled:
            builder.forget(out)
            continue
        plan = builder.build(out, rows)
        cached_sent += sum(len(c.new_output_token_ids) for c in plan.cached)
        mirror, mirror_rows, wanted = worker.apply(plan)
        assert wanted == set()
        assert [(s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_ids, s.token_ids, s.sample)
                for s in mirror.scheduled] == [
               (s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_ids, s.token_ids, s.sample)
               for s in out.scheduled]
        for s, m in zip(out.scheduled, mirror.scheduled):
            assert m.request.prompt_token_ids == s.request.prompt_token_ids
            assert m.request.output_token_ids == s.request.output_token_ids
        assert (mirror_rows["r1"].generator.initial_seed() == 7) if "r1" in mirror_rows else True
        sampled = {s.request.request_id: (token := token + 1) for s in out.scheduled if s.sample}
        sched.update(out, sampled)
    assert preempted > 0, "the cache no longer forces a preemption"
    assert cached_sent > 0
    builder.forget(sched.schedule())  # the last finishes reach the workers with the next plan
    worker.apply(builder.build(sched.schedule(), rows))
    assert len(worker) == 0

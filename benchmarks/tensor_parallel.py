"""Tensor parallelism on CPU: decode tokens/s at 1 and 2 shards, and what the collectives cost.

    python benchmarks/tensor_parallel.py [--batch-sizes 1 8] [--new-tokens 32] [--repeats 2]

Same model files (the ~100M Llama of common.py), same script run: 1 shard in this process with
every core (and again with one thread, a shard's share: on a busy machine a thread team of 2 can
lose far more to scheduling than sharding costs), then 2 shards (two processes over gloo, the cores split between them). Decode time
is the total minus a 1-token run (the prefill), best of --repeats. On the 2-shard run, rank 0
also times one all-reduce of a decode step's [batch, hidden] activations and one step plan
broadcast (the control message), so the per-step overhead is their count times their cost:
2 all-reduces per layer + 1 for the vocab-parallel embedding, 1 logits all-gather, 1 plan.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_100M, build_random_llama, machine  # noqa: E402


def _config(path: str) -> dict:
    return dict(model_id=path, backend="cpu", dtype="float32", num_kv_blocks=512, max_batch_prefill_tokens=2048)


def _decode_tps(core, batch: int, new_tokens: int, repeats: int) -> float:
    from textgen.core.engine.types import EngineRequest
    from textgen.core.sampling_params import SamplingParams

    counter = iter(range(10**9))

    def run(n: int) -> float:
        sinks: list[list] = []
        for b in range(batch):
            sinks.append([])
            prompt = [1] + [(37 * b + 11 * j) % 8000 + 4 for j in range(31)]
            core.add_request(EngineRequest(f"r{next(counter)}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)),
                             sinks[-1].append)
        start = time.perf_counter()
        while core.has_work():
            core.step()
        return time.perf_counter() - start

    run(4)  # warm-up
    best = min(run(new_tokens) - run(1) for _ in range(repeats))
    return batch * (new_tokens - 1) / best


def _collective_costs(core, batch: int, iterations: int = 200) -> tuple[float, float]:
    """(one all-reduce of [batch, hidden], one step-plan broadcast) in microseconds, on rank 0."""
    import torch.distributed as dist

    from textgen.core.engine.step_plan import ScheduledRow, StepPlan

    x = torch.randn(batch, LLAMA_100M["hidden_size"])
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(x)
    all_reduce = (time.perf_counter() - start) / iterations
    plan = StepPlan(scheduled=[ScheduledRow(f"r{i}", 64, 1, True) for i in range(batch)])
    start = time.perf_counter()
    for _ in range(iterations):
        core.executor.channel.send(plan)
    return all_reduce * 1e6, (time.perf_counter() - start) / iterations * 1e6


def _rank(rank: int, port: int, path: str, args: argparse.Namespace, out: dict) -> None:
    from textgen.core.config import EngineConfig
    from textgen.core.engine.topology import ShardTopology, join_process_group
    from textgen.testing.paged_model import cpu_backend

    topology = ShardTopology(2, (0, 1), "127.0.0.1", port)
    torch.set_num_threads(topology.threads_per_rank())
    join_process_group(cpu_backend().communicator(), topology, rank)
    if rank == 0:
        from textgen.core.engine.engine_core import EngineCore

        core = EngineCore(EngineConfig(**_config(path)))
        out["tps"] = {b: _decode_tps(core, b, args.new_tokens, args.repeats) for b in args.batch_sizes}
        core.executor.shutdown()  # the worker leaves its loop; both then run the cost probes
        out["costs"] = {b: _collective_costs(core, b) for b in args.batch_sizes}
    else:
        import torch.distributed as dist

        from textgen.core.engine.executor import run_worker
        from textgen.core.engine.setup import build_engine_parts

        parts = build_engine_parts(EngineConfig(**_config(path)))
        run_worker(parts.runner, parts.executor.channel)  # the decode runs, until rank 0's stop
        for b in args.batch_sizes:  # mirror rank 0's probes: a barrier, the all-reduces, the plan broadcasts
            x = torch.randn(b, LLAMA_100M["hidden_size"])
            dist.barrier()
            for _ in range(200):
                dist.all_reduce(x)
            for _ in range(200):
                parts.executor.channel.receive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama100m"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(build_random_llama(args.model_dir))
    print(f"machine: {machine()}; load: {os.getloadavg()[0]:.2f} (1 min)")

    from textgen.core.config import EngineConfig
    from textgen.core.engine.engine_core import EngineCore

    core = EngineCore(EngineConfig(**_config(path)))
    threads = torch.get_num_threads()
    one = {b: _decode_tps(core, b, args.new_tokens, args.repeats) for b in args.batch_sizes}
    torch.set_num_threads(1)  # a shard's share of the cores: tells thread-team effects from sharding
    one_thread = {b: _decode_tps(core, b, args.new_tokens, args.repeats) for b in args.batch_sizes}
    torch.set_num_threads(threads)
    del core
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), path, args, out), nprocs=2, join=True)
        two, costs = dict(out["tps"]), dict(out["costs"])
    per_step = 2 * LLAMA_100M["num_hidden_layers"] + 2
    print(f"{'batch':>5} {'1 shard tok/s':>14} {'(1 thread)':>11} {'2 shards tok/s':>15} {'2/1':>6} "
          f"{'all-reduce us':>14} {'plan us':>8} {'collectives/step ms':>20} {'share of 2-shard step':>22}")
    for b in args.batch_sizes:
        all_reduce, plan = costs[b]
        overhead_ms = (per_step * all_reduce + plan) / 1e3
        step_ms = 1e3 * b / two[b]
        print(f"{b:>5} {one[b]:>14.1f} {one_thread[b]:>11.1f} {two[b]:>15.1f} {two[b] / one[b]:>6.2f} "
              f"{all_reduce:>14.0f} {plan:>8.0f} "
              f"{overhead_ms:>20.2f} {overhead_ms / step_ms:>21.0%}")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()

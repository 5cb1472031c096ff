"""The TPU backend's shape bucketing on torch_xla's CPU device (PJRT_DEVICE=CPU), not in CI.

Run through scripts/xla_cpu_check.sh (it builds the venv: torch 2.9.0 + torch-xla 2.9.0).
Checks, on the tiny Llama: the XLA engine (XLABackend, the TPU backend's graph rule and static
kernel, the static-shape sampler) serves 50 requests of mixed lengths and mixed sampling
parameters (greedy, greedy with a repetition penalty, seeded temperature / top-k / top-p /
repetition penalty / top-n); the greedy requests' tokens equal the CPU backend's, and torch_xla's
metrics show how many programs were compiled during warm-up and how many after it, split into the
model's bucket programs, the sampler's and the rest. Prints the figures; exits 1 when a greedy
request's tokens differ, a step ran outside the buckets, or any program compiled after warm-up.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402

from textgen.backends.tpu.backend import XLABackend  # noqa: E402
from textgen.backends.tpu.graphs import compile_count  # noqa: E402
from textgen.core.registry import STATIC_PAGED  # noqa: E402
from textgen.core.backend import BackendCandidate, MemoryInfo  # noqa: E402
from textgen.core.config import EngineConfig  # noqa: E402
from textgen.core.engine.engine_core import EngineCore  # noqa: E402
from textgen.core.engine.types import EngineRequest  # noqa: E402
from textgen.core.hookspecs import hookimpl  # noqa: E402
from textgen.core.plugins import PluginManager  # noqa: E402
from textgen.core.sampling.static import StaticSampler  # noqa: E402
from textgen.core.sampling_params import SamplingParams  # noqa: E402
from textgen.testing.tiny_models import make_tiny_model  # noqa: E402

NUM_REQUESTS = 50
BUDGETS = dict(dtype="float32", max_batch_size=8, max_total_tokens=256, max_batch_prefill_tokens=128,
               num_kv_blocks=256, block_size=16)


class HostXLABackend(XLABackend):
    """XLABackend on PJRT's CPU device, which reports no device memory: the host's is used."""

    name = "xla"

    def memory_info(self) -> MemoryInfo:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(pages, pages // 2)

    def wants_memory_profile(self, config: EngineConfig) -> bool:
        return False


class XLAOnCPUPlugin:
    @hookimpl
    def textgen_probe_backend(self, config):
        return BackendCandidate("xla", True, 1000, "torch_xla PJRT_DEVICE=CPU", "__main__:HostXLABackend")

    @hookimpl
    def textgen_attention_backends(self, backend):
        return [STATIC_PAGED]


def workload(seed: int = 0) -> list[tuple[list[int], int]]:
    """Prompts of 1 to 180 tokens (some longer than the largest prefill bucket: chunked) and 1 to
    24 new tokens each."""
    rng = random.Random(seed)
    return [([rng.randrange(3, 1000) for _ in range(rng.choice([rng.randint(1, 16), rng.randint(17, 180)]))],
             rng.randint(1, 24)) for _ in range(NUM_REQUESTS)]


MIXES = [  # request i gets MIXES[i % 6]; the first two are greedy
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(do_sample=True, temperature=0.8),
    dict(do_sample=True, top_k=20),
    dict(do_sample=True, temperature=0.9, top_p=0.9),
    dict(do_sample=True, top_k=40, top_p=0.95, repetition_penalty=1.1, top_n_tokens=3),
]
GREEDY = {i for i in range(NUM_REQUESTS) if i % len(MIXES) < 2}


def serve(engine: EngineCore, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Tokens per request (the sampled ones seeded by their index): 8 arrive at once, then one
    more every other step (so prefill chunks join decode steps), until all are served."""
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    queue, steps = list(enumerate(requests)), 0

    def admit(count: int) -> None:
        for i, (prompt, n) in queue[:count]:
            params = SamplingParams(max_new_tokens=n, ignore_eos=True, seed=1000 + i, **MIXES[i % len(MIXES)])
            engine.add_request(EngineRequest(str(i), prompt, params),
                               lambda e, sink=out[str(i)]: sink.append(e.token.id) if e.token else None)
        del queue[:count]

    admit(8)
    while queue or engine.has_work():
        if steps % 2 or not engine.has_work():
            admit(1)
        engine.step()
        steps += 1
    return [out[str(i)] for i in range(len(requests))]


class SamplerCompiles:
    """Counts the programs compiled inside the static sampler (its gather and its sampling)."""

    def __init__(self) -> None:
        self.count, self.keys = 0, []
        sample = StaticSampler.sample

        def counted(sampler, hidden, index, compute_logits, rows):
            before = compile_count()
            out = sample(sampler, hidden, index, compute_logits, rows)
            if compile_count() > before:
                self.keys.append((tuple(hidden.shape), len(index), [p.is_greedy for p in rows.params]))
            self.count += compile_count() - before
            return out

        StaticSampler.sample = counted


def main() -> int:
    folder = make_tiny_model(tempfile.mkdtemp(prefix="textgen-xla-"), "llama")
    requests = workload()
    cpu = EngineCore(EngineConfig(model_id=str(folder), backend="cpu", graph_batch_sizes=(), **BUDGETS))
    want = serve(cpu, requests)
    started, before = time.perf_counter(), compile_count()
    pm = PluginManager(allow={"cpu"})
    pm.register(XLAOnCPUPlugin(), "xla-on-cpu")
    xla = EngineCore(EngineConfig(model_id=str(folder), backend="xla", **BUDGETS), pm)
    warm = compile_count() - before
    print("\n".join(xla.startup_lines))
    print(f"startup {time.perf_counter() - started:.1f} s, {warm} XLA compilations during startup and warm-up")
    graphs = xla.runner.graphs
    replays_before, model_before = sum(graphs.replays.values()), graphs.runner.step_compiles
    sampler = SamplerCompiles()
    started, before = time.perf_counter(), compile_count()
    got = serve(xla, requests)
    after = compile_count() - before
    steps = sum(graphs.replays.values()) - replays_before
    model_compiles = graphs.runner.step_compiles - model_before
    greedy_equal = sum(got[i] == want[i] for i in GREEDY)
    sampled_equal = sum(got[i] == want[i] for i in range(NUM_REQUESTS) if i not in GREEDY)
    print(f"{NUM_REQUESTS} requests ({sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(len(t) for t in got)} generated) in {time.perf_counter() - started:.1f} s: {steps} bucketed steps, "
          f"{len(graphs.unbucketed)} unbucketed, {after} XLA compilations after warm-up: {model_compiles} in the "
          f"model's bucket programs, {sampler.count} in the sampler's, {after - model_compiles - sampler.count} "
          f"elsewhere; {len({s for s in graphs.replays})} distinct shapes used")
    if sampler.keys:
        print(f"sampler compilations (hidden shape, rows, greedy per row): {sampler.keys[:10]}")
    print(f"greedy requests equal to the CPU backend: {greedy_equal}/{len(GREEDY)}; seeded sampled requests "
          f"equal (same seeds, host noise; not required: logits differ in the last bits): "
          f"{sampled_equal}/{NUM_REQUESTS - len(GREEDY)}")
    print(met.short_metrics_report())
    return 0 if greedy_equal == len(GREEDY) and not graphs.unbucketed and after == 0 else 1


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    sys.exit(main())

"""The TPU backend's shape bucketing on torch_xla's CPU device (PJRT_DEVICE=CPU), not in CI.

Run through scripts/xla_cpu_check.sh (it builds the venv: torch 2.9.0 + torch-xla 2.9.0).
Checks, on the tiny Llama: the XLA engine (XLABackend, the TPU backend's graph rule and static
kernel) serves 50 requests of mixed lengths greedy-equal to the CPU backend, and torch_xla's
metrics show how many programs were compiled during warm-up and how many after it. Prints the
figures; exits 1 when the tokens differ, a step ran outside the buckets or a bucket's
program compiled after warm-up.
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


def serve(engine: EngineCore, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy tokens per request: 8 arrive at once, then one more every other step (so prefill
    chunks join decode steps), until all are served."""
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    queue, steps = list(enumerate(requests)), 0

    def admit(count: int) -> None:
        for i, (prompt, n) in queue[:count]:
            params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
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
    started, before = time.perf_counter(), compile_count()
    got = serve(xla, requests)
    after = compile_count() - before
    steps = sum(graphs.replays.values()) - replays_before
    model_compiles = graphs.runner.step_compiles - model_before
    equal = sum(a == b for a, b in zip(got, want))
    print(f"{NUM_REQUESTS} requests ({sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(len(t) for t in got)} generated) in {time.perf_counter() - started:.1f} s: {steps} bucketed steps, "
          f"{len(graphs.unbucketed)} unbucketed, {after} XLA compilations after warm-up, {model_compiles} of "
          f"them in the model's bucket programs (the rest: sampler and logits programs keyed by the number "
          f"of sampled rows), {len({s for s in graphs.replays})} distinct shapes used")
    print(f"greedy-equal to the CPU backend: {equal}/{NUM_REQUESTS}")
    print(met.short_metrics_report())
    return 0 if equal == NUM_REQUESTS and not graphs.unbucketed and model_compiles == 0 else 1


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    sys.exit(main())

"""`textgen bench`: prefill and decode latency/throughput over a grid of batch sizes and prompt
lengths, through the engine (EngineCore.step), so it measures any backend the same way
(text-generation-benchmark's figures, without a server).

One run of (batch B, sequence length S, decode length D): B requests of S random token ids
(greedy, ignore_eos, max_new_tokens D) are added together; the engine steps until every request
has its first token (the prefill: normally one step, since the prefill budget is set to fit the
largest B x S), then steps until all are finished (D - 1 decode steps, each producing B tokens).

- prefill latency: wall time of the prefill steps; prefill throughput: B x S prompt tokens / latency
- decode token latency: wall time of one decode step; decode throughput: B / token latency
Each step ends with the sampled ids on the host, so device work is included. Prefix caching is
off and every run draws new prompts, so nothing is reused between runs.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from textgen.api.bench_models import BenchModel, resolve_bench_model


@dataclass(slots=True)
class BenchSettings:
    model_id: str = "llama-100m"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    sequence_lengths: list[int] = field(default_factory=lambda: [10])
    decode_length: int = 8
    runs: int = 10
    warmups: int = 1
    backend: str | None = None
    dtype: str = "auto"
    load_format: str | None = None  # None: dummy for configurations, else the checkpoint's
    seed: int = 0

    def problems(self) -> list[str]:
        reasons = []
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            reasons.append("--batch-size values must be >= 1")
        if not self.sequence_lengths or min(self.sequence_lengths) < 1:
            reasons.append("--sequence-length values must be >= 1")
        if self.decode_length < 2:
            reasons.append("--decode-length must be >= 2 (one prefill token and at least one decode step)")
        if self.runs < 1 or self.warmups < 0:
            reasons.append("--runs must be >= 1 and --warmups >= 0")
        return reasons


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"avg": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def describe_machine() -> dict[str, Any]:
    """Where the figures were taken: CPU model, cores, torch build and threads, load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in load], "python": platform.python_version()}


class EngineBench:
    """Owns one EngineCore sized for the whole grid and times runs on it."""

    def __init__(self, settings: BenchSettings, model: BenchModel) -> None:
        from textgen.core.config import EngineConfig
        from textgen.core.engine.engine_core import EngineCore

        self.settings, self.model = settings, model
        max_b, max_s = max(settings.batch_sizes), max(settings.sequence_lengths)
        block = 16
        blocks_per_seq = -(-(max_s + settings.decode_length) // block)
        config = EngineConfig(
            model_id=str(model.path), backend=settings.backend, dtype=settings.dtype, load_format=model.load_format,
            seed=settings.seed, block_size=block, enable_prefix_caching=False,
            num_kv_blocks=max_b * blocks_per_seq + 1, max_batch_size=max_b,
            max_batch_prefill_tokens=max_b * max_s, max_total_tokens=max_s + settings.decode_length,
            max_input_tokens=max_s,
        )
        self.core = EngineCore(config)
        self.vocab_size = self.core.runner.vocab_size
        self.rng = np.random.default_rng(settings.seed)
        self._ids = 0

    def info(self) -> dict[str, Any]:
        runner = self.core.runner
        return {"id": self.settings.model_id, "source": self.model.source, "path": str(self.model.path),
                "load_format": self.model.load_format,
                "architecture": (getattr(runner.hf_config, "architectures", None) or ["?"])[0],
                "num_parameters": sum(p.numel() for p in runner.model.parameters()),
                "backend": self.core.backend.describe(), "attention": runner.attention_cls.name,
                "dtype": str(runner.dtype).removeprefix("torch.")}

    def run_once(self, batch: int, seq_len: int) -> tuple[float, list[float]]:
        """(prefill seconds, [seconds of each decode step])."""
        from textgen.core.engine.types import EngineRequest
        from textgen.core.sampling_params import SamplingParams

        params = SamplingParams(max_new_tokens=self.settings.decode_length, ignore_eos=True)
        counts: dict[str, int] = {}
        for row in self.rng.integers(0, self.vocab_size, size=(batch, seq_len)).tolist():
            rid = f"bench-{self._ids}"
            self._ids += 1
            counts[rid] = 0
            self.core.add_request(EngineRequest(rid, row, params), lambda ev, r=rid: counts.__setitem__(r, counts[r] + 1))
        start = time.perf_counter()
        while min(counts.values()) == 0:
            self._step()
        prefill = time.perf_counter() - start
        decode_steps = []
        while self.core.has_work():
            t = time.perf_counter()
            self._step()
            decode_steps.append(time.perf_counter() - t)
        if any(n != self.settings.decode_length for n in counts.values()):
            raise RuntimeError(f"expected {self.settings.decode_length} tokens per request, got {sorted(set(counts.values()))}")
        return prefill, decode_steps

    def _step(self) -> None:
        if not self.core.step():
            raise RuntimeError("the engine had nothing to schedule while requests were unfinished")

    def measure(self, batch: int, seq_len: int, tick: Callable[[], None]) -> dict[str, Any]:
        for _ in range(self.settings.warmups):
            self.run_once(batch, seq_len)
            tick()
        prefills, steps, totals = [], [], []
        for _ in range(self.settings.runs):
            prefill, decode = self.run_once(batch, seq_len)
            prefills.append(prefill)
            steps += decode
            totals.append(sum(decode))
            tick()
        return {
            "batch_size": batch, "sequence_length": seq_len, "decode_length": self.settings.decode_length,
            "runs": self.settings.runs,
            "prefill": {"latency_ms": summarize([x * 1e3 for x in prefills]),
                        "throughput_tokens_per_s": summarize([batch * seq_len / x for x in prefills])},
            "decode": {"token_latency_ms": summarize([x * 1e3 for x in steps]),
                       "throughput_tokens_per_s": summarize([batch / x for x in steps]),
                       "total_latency_ms": summarize([x * 1e3 for x in totals])},
            "samples": {"prefill_ms": [x * 1e3 for x in prefills], "decode_step_ms": [x * 1e3 for x in steps]},
        }


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure every (batch size, sequence length) pair; returns the JSON-ready report."""
    reasons = settings.problems()
    if reasons:
        raise ValueError("; ".join(reasons))
    model = resolve_bench_model(settings.model_id, settings.load_format)
    bench = EngineBench(settings, model)
    grid = [(b, s) for s in settings.sequence_lengths for b in settings.batch_sizes]
    bar = _progress(len(grid) * (settings.warmups + settings.runs), progress)
    results = []
    try:
        for batch, seq_len in grid:
            bar.set_description(f"batch {batch} seq {seq_len}")
            results.append(bench.measure(batch, seq_len, lambda: bar.update(1)))
    finally:
        bar.close()
    return {"model": bench.info(), "machine": describe_machine(), "settings": asdict(settings), "results": results}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", disable=not enabled, leave=False)


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per (batch, sequence length)."""
    m = report["model"]
    lines = [
        f"model {m['id']} ({m['architecture']}, {m['num_parameters'] / 1e6:.1f}M params, {m['load_format']} weights), "
        f"{m['dtype']}, {m['backend']}, attention {m['attention']}",
        "",
        "| batch | seq len | prefill p50 ms | prefill p90 ms | prefill avg ms | prefill tok/s | "
        "decode p50 ms/tok | decode p90 ms/tok | decode avg ms/tok | decode tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        p, d = r["prefill"], r["decode"]
        lines.append(
            f"| {r['batch_size']} | {r['sequence_length']} | {p['latency_ms']['p50']:.2f} | {p['latency_ms']['p90']:.2f} | "
            f"{p['latency_ms']['avg']:.2f} | {p['throughput_tokens_per_s']['avg']:.1f} | "
            f"{d['token_latency_ms']['p50']:.2f} | {d['token_latency_ms']['p90']:.2f} | {d['token_latency_ms']['avg']:.2f} | "
            f"{d['throughput_tokens_per_s']['avg']:.1f} |")
    return "\n".join(lines)

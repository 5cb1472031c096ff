"""CPU Backend: device facts for the host CPU."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from textgen.backends.cpu.host_memory import keep_freed_memory
from textgen.core.backend import Backend, BackendCandidate, MemoryInfo, MemoryProfile

if TYPE_CHECKING:
    from textgen.core.backend import DenseLinearKernel
    from textgen.core.config import EngineConfig
    from textgen.core.graphs import GraphRunner


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" field of a /proc file (meminfo, self/status) in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _meminfo_bytes(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def _status_bytes(key: str) -> int | None:
    """VmRSS, VmHWM of this process."""
    return _proc_bytes("/proc/self/status", key)


def _cgroup_limit_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        super().__init__(config, candidate)
        self.allocator = keep_freed_memory()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def default_dtype(self) -> torch.dtype:
        """bfloat16 where the CPU multiplies it natively (AMX tiles or AVX512-BF16: on a Sapphire
        Rapids core a batch-64 GEMM ran 3.8x faster than float32), float32 elsewhere (AVX2
        converts bf16 in software and is slower than float32)."""
        return torch.bfloat16 if native_bf16() else torch.float32

    def memory_info(self) -> MemoryInfo:
        total = _meminfo_bytes("MemTotal") or 8 << 30
        available = _meminfo_bytes("MemAvailable") or total // 2
        limit = _cgroup_limit_bytes()
        if limit is not None:
            total, available = min(total, limit), min(available, limit)
        return MemoryInfo(total, available)

    def distributed_backend(self) -> str:
        return "gloo"

    def wants_memory_profile(self, config: EngineConfig) -> bool:
        return config.memory_fraction is not None

    def kv_cache_budget_bytes(self, config: EngineConfig, profile: MemoryProfile) -> int:
        """Host memory is shared with everything else: unless `--cuda-memory-fraction` is given
        (then the profiled rule of every backend applies), cap the KV cache at
        TEXTGEN_CPU_KV_CACHE_GB (default 4 GiB, as vLLM's CPU backend does) and 90% of free memory."""
        if config.memory_fraction is not None:
            return super().kv_cache_budget_bytes(config, profile)
        cap = int(float(os.environ.get("TEXTGEN_CPU_KV_CACHE_GB", "4")) * 2**30)
        return min(cap, int(profile.free_bytes * 0.9))

    def reset_peak_memory(self) -> None:
        """Linux resets the resident-set peak (VmHWM) when "5" is written to clear_refs."""
        self._rss_at_reset = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._rss_at_reset = None

    def peak_memory_bytes(self) -> int | None:
        peak, base = _status_bytes("VmHWM"), getattr(self, "_rss_at_reset", None)
        return None if peak is None or base is None else max(0, peak - base)

    def graph_runner(self, config: EngineConfig) -> GraphRunner | None:
        from textgen.backends.cpu.graphs import CPUCompiledDecode

        return CPUCompiledDecode()

    def dense_linear(self, dtype: torch.dtype) -> DenseLinearKernel | None:
        """oneDNN on weights prepacked once (backends/cpu/dense_linear.py), except in graph mode
        (inductor packs its compiled graphs itself) or where packing cannot run."""
        from textgen.backends.cpu.dense_linear import OneDNNPackedLinear, packing_problem

        if self.config is not None and self.config.graph_batch_sizes:
            return None
        return None if packing_problem(dtype) else OneDNNPackedLinear()

    def describe(self) -> str:
        threads = torch.get_num_threads()
        bf16 = ", native bf16" if native_bf16() else ""
        return (f"cpu: {self.candidate.reason}, {threads} torch threads, {torch.backends.cpu.get_cpu_capability()}"
                f"{bf16}, {self.allocator}")


def native_bf16() -> bool:
    """AMX tiles or AVX512-BF16, as torch sees them (torch.backends.cpu.get_cpu_capability() says
    only "AVX512" on such CPUs)."""
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check() for check in checks if check is not None)


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

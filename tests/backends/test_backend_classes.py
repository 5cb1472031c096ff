"""Backend classes' own logic that runs without their device: dtype rules, config refusals and
memory reports, with the device facts (capability, architecture, runtime report) given."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from types import SimpleNamespace

import pytest
import torch

from textgen.backends.cuda.backend import CUDABackend
from textgen.backends.inferentia.backend import InferentiaBackend
from textgen.backends.rocm.backend import ROCmBackend
from textgen.backends.tpu.backend import xla_memory
from textgen.core.backend import BackendCandidate, MemoryInfo
from textgen.core.config import EngineConfig

GiB = 2**30


def _backend(cls: type, name: str):
    return cls(None, BackendCandidate(name, True, 100, "test", f"{cls.__module__}:{cls.__name__}"))


@pytest.fixture
def turing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def test_cuda_before_ampere_defaults_to_fp16_and_refuses_bf16(turing: None) -> None:
    backend = _backend(CUDABackend, "cuda")
    assert backend.device == torch.device("cuda", 0)
    assert backend.default_dtype() == torch.float16
    assert backend.supported_dtypes() == (torch.float16, torch.float32)
    config = EngineConfig(model_id="m", dtype="bfloat16", attention_backend="flash_attn")
    assert backend.config_reasons(config) == [
        "--dtype bfloat16 needs compute capability >= 8.0 (Tesla T4 is 7.5); use --dtype float16",
    ]


def test_cuda_ampere_and_later_default_to_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("LOCAL_RANK", "3")
    backend = _backend(CUDABackend, "cuda")
    assert (backend.device, backend.default_dtype(), backend.distributed_backend()) == (
        torch.device("cuda", 3), torch.bfloat16, "nccl"
    )
    config = EngineConfig(model_id="m", dtype="bfloat16", attention_backend="flash_attn", block_size=256)
    assert backend.config_reasons(config) == []


@pytest.mark.parametrize(
    ("arch", "bf16"),
    [("gfx942:sramecc+:xnack-", True), ("gfx90a:sramecc+:xnack-", True), ("gfx906:sramecc+", False)],
)
def test_rocm_bf16_follows_the_gpu_architecture(monkeypatch: pytest.MonkeyPatch, arch: str, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(gcnArchName=arch))
    backend = _backend(ROCmBackend, "rocm")
    assert backend.default_dtype() == (torch.bfloat16 if bf16 else torch.float16)
    assert backend.distributed_backend() == "nccl"
    reasons = backend.config_reasons(EngineConfig(model_id="m", dtype="bfloat16"))
    expected = [] if bf16 else ["--dtype bfloat16 needs bf16 matrix instructions (gfx906 has none); use --dtype float16"]
    assert reasons == expected


def test_xla_memory_reports_of_both_torch_xla_generations() -> None:
    assert xla_memory({"bytes_limit": 16 * GiB, "bytes_used": GiB, "peak_bytes_used": 2 * GiB}) == MemoryInfo(
        16 * GiB, 15 * GiB
    )
    assert xla_memory({"kb_total": 1024, "kb_free": 512}) == MemoryInfo(1024 * 1024, 512 * 1024)
    assert xla_memory({}) is None


def test_inferentia_memory_without_a_runtime_report(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(device: object) -> dict:
        raise RuntimeError("UNIMPLEMENTED: GetMemoryStats")

    backend = InferentiaBackend.__new__(InferentiaBackend)  # __init__ would import torch_neuronx
    backend._xm, backend._device = SimpleNamespace(get_memory_info=unsupported), "xla:0"
    assert backend.memory_info() == MemoryInfo(16 * GiB, 4 * GiB)
    monkeypatch.setenv("TEXTGEN_NEURON_KV_CACHE_GB", "2.5")
    assert backend.memory_info() == MemoryInfo(16 * GiB, int(2.5 * GiB))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt and mallinfo2 are Linux-only")
def test_cpu_backend_keeps_large_tensors_in_the_heap() -> None:
    """After the CPU backend starts, a 64 MiB tensor no longer gets an mmap of its own (glibc's
    default above 32 MiB), so freeing and allocating it again costs no page faults."""
    from textgen.backends.cpu.backend import CPUBackend

    backend = CPUBackend(None, BackendCandidate("cpu", True, 0, "test", "textgen.backends.cpu.backend:CPUBackend"))
    assert backend.allocator == "malloc keeps freed memory" and backend.allocator in backend.describe()
    before = _mmapped_bytes()
    big = torch.empty(16 << 20, dtype=torch.float32)
    assert _mmapped_bytes() - before < 1 << 20
    del big


def test_cpu_malloc_tuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen.backends.cpu.host_memory import keep_freed_memory

    monkeypatch.setenv("TEXTGEN_CPU_MALLOC_TUNING", "0")
    assert keep_freed_memory() == "glibc malloc defaults (TEXTGEN_CPU_MALLOC_TUNING=0)"


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (True, True, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_cpu_default_dtype_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool,
                                               expected: torch.dtype) -> None:
    from textgen.backends.cpu.backend import CPUBackend

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    backend = CPUBackend(None, BackendCandidate("cpu", True, 0, "test", "textgen.backends.cpu.backend:CPUBackend"))
    assert backend.default_dtype() == expected
    assert ("native bf16" in backend.describe()) == (expected == torch.bfloat16)

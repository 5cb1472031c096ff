"""The backend contract end to end: kernel negotiation (block size, rejected kernels, a forced
kernel that cannot run), memory-profile KV sizing, and the fp8 KV cache — through real engines on
the CPU, with in-process backend plugins where a device fact must be reported."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from textgen.backends.cpu.backend import CPUBackend
from textgen.backends.cuda import attention as fa
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import AttentionSelectionError, negotiate
from textgen.core.backend import BackendCandidate, MemoryInfo
from textgen.core.config import EngineConfig
from textgen.core.engine.engine_core import EngineCore
from textgen.core.hookspecs import hookimpl
from textgen.core.plugins import PluginManager
from textgen.core.registry import AttentionBackendInfo
from tests.backends.test_flash_attention import _flash_attn_semantics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLASH = AttentionBackendInfo("flash_attn", "textgen.backends.cuda.attention:FlashAttentionPaged", 10)
TORCH = AttentionBackendInfo("torch_paged", "textgen.core.layers.paged_attention:TorchPagedAttention", 0)
GiB = 1 << 30


@pytest.fixture
def flash_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn "installed" as its documented semantics in torch, and no device objection: the
    kernel's own constraints (block size multiple of 256, half dtypes) still apply."""
    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(flash_attn_varlen_func=_flash_attn_semantics))
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 7, 4))
    monkeypatch.setattr(fa, "_device_reasons", lambda: [])


class _DeviceBackend(CPUBackend):
    """A CUDA-like backend on the host: it reports fixed device memory and a measured peak, as a
    GPU backend does through torch.cuda, and wants the profile run."""

    name = "fakegpu"
    total, free, peak = 2 * GiB, 1536 << 20, 300 << 20

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(self.total, self.free)

    def wants_memory_profile(self, config: EngineConfig) -> bool:
        return True

    def reset_peak_memory(self) -> None:
        self.resets = getattr(self, "resets", 0) + 1

    def peak_memory_bytes(self) -> int | None:
        return self.peak if getattr(self, "resets", 0) else None

    def kv_cache_budget_bytes(self, config, profile):  # the contract's default rule, not the CPU's
        return super(CPUBackend, self).kv_cache_budget_bytes(config, profile)


class _FakeGPUPlugin:
    @hookimpl
    def textgen_probe_backend(self, config):
        return BackendCandidate("fakegpu", True, 1000, "1 x fake GPU", f"{__name__}:_DeviceBackend")

    @hookimpl
    def textgen_attention_backends(self, backend):
        return [FLASH, TORCH]


def _engine(path: str, **config) -> EngineCore:
    pm = PluginManager(allow={"cpu"})
    pm.register(_FakeGPUPlugin(), "fakegpu")
    return EngineCore(EngineConfig(model_id=path, backend="fakegpu", **config), pm)


def _spec(dtype: torch.dtype = torch.bfloat16, **extra) -> AttentionSpec:
    return AttentionSpec(8, 2, 64, dtype, 0.125, **extra)


def test_flash_constraints_set_the_block_size_and_win(flash_on_this_cpu) -> None:
    choice = negotiate([TORCH, FLASH], [_spec()] * 3, None, None)
    assert (choice.kernel_cls.name, choice.block_size, choice.rejected) == ("flash_attn", 256, ())
    assert {s.block_size for s in choice.specs} == {256}


def test_a_user_block_size_the_kernel_refuses_falls_back_with_the_reason(flash_on_this_cpu) -> None:
    choice = negotiate([TORCH, FLASH], [_spec()] * 2, 16, None)
    assert (choice.kernel_cls.name, choice.block_size) == ("torch_paged", 16)
    assert choice.describe() == ["attention kernel torch_paged (block size 16)",
                                 "attention kernel not used: flash_attn: block_size 16 is not a multiple of 256"]


def test_per_layer_reasons_name_the_layers(flash_on_this_cpu) -> None:
    specs = [_spec(), _spec(alibi_slopes=(0.5,) * 8), _spec(), _spec(alibi_slopes=(0.5,) * 8)]
    choice = negotiate([FLASH, TORCH], specs, None, None)
    assert choice.kernel_cls.name == "torch_paged"
    assert choice.rejected[0].describe() == "flash_attn: ALiBi is not supported (layers 1, 3)"


def test_forced_kernel_that_cannot_run_names_every_reason(flash_on_this_cpu) -> None:
    with pytest.raises(AttentionSelectionError) as err:
        negotiate([TORCH, FLASH], [_spec(torch.float32)], 16, None, forced="flash_attn")
    assert str(err.value) == ("attention backend flash_attn: block_size 16 is not a multiple of 256; dtype "
                              "torch.float32 is not supported (flash-attn computes in float16 or bfloat16)")
    with pytest.raises(AttentionSelectionError, match=r"'nope' is not offered by this backend \(offered: "
                                                      r"torch_paged, flash_attn\)"):
        negotiate([TORCH, FLASH], [_spec()], None, None, forced="nope")


def test_engine_on_a_cuda_like_backend_picks_flash_at_256_and_profiles_memory(flash_on_this_cpu, tiny_llama) -> None:
    engine = _engine(tiny_llama, dtype="bfloat16", max_batch_prefill_tokens=512, max_batch_size=8,
                     max_total_tokens=512, max_concurrent_requests=100_000)
    lines = engine.startup_lines
    assert lines[1] == "attention kernel flash_attn (block size 256)"
    assert engine.config.block_size == 256 and engine.scheduler.config.block_size == 256
    # the budget is the reported free memory minus the measured peak (fraction 1.0 reserves nothing)
    budget = _DeviceBackend.free - _DeviceBackend.peak
    assert lines[2] == "memory: 1536.0 MiB free of 2048.0 MiB after the weights; profile run peak 300.0 MiB"
    assert f"budget {budget / 2**20:.1f} MiB)" in lines[3]
    per_block = int(lines[3].split("(")[1].split(" bytes per block")[0])
    assert engine.scheduler.config.num_blocks == budget // per_block
    assert engine.backend.resets == 1
    # the flash kernel's semantics serve real requests: greedy tokens equal the CPU backend's
    from textgen.core.llm import LLM

    cpu = LLM(tiny_llama, backend="cpu", dtype="bfloat16").generate_ids([[5, 6, 7, 8, 9]], max_new_tokens=6)
    ours = _generate(engine, [5, 6, 7, 8, 9], 6)
    assert ours == cpu[0].token_ids


def test_memory_fraction_reserves_its_share(flash_on_this_cpu, tiny_llama) -> None:
    engine = _engine(tiny_llama, dtype="bfloat16", memory_fraction=0.9, max_concurrent_requests=100_000,
                     max_batch_prefill_tokens=512, max_total_tokens=512)
    budget = _DeviceBackend.free - int(_DeviceBackend.total * (1 - 0.9)) - _DeviceBackend.peak
    assert f"budget {budget / 2**20:.1f} MiB)" in engine.startup_lines[3]


def test_forced_impossible_kernel_stops_the_engine(flash_on_this_cpu, tiny_llama) -> None:
    with pytest.raises(AttentionSelectionError, match="attention backend flash_attn: block_size 16 is not a multiple "
                                                      "of 256; dtype torch.float32 is not supported"):
        _engine(tiny_llama, dtype="float32", block_size=16, attention_backend="flash_attn")


def test_serve_exits_2_for_a_kernel_the_backend_does_not_offer(tiny_llama, capsys) -> None:
    from textgen.api.cli import main

    code = main(["serve", "--model-id", tiny_llama, "--backend", "cpu", "--attention-backend", "flash_attn"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert last == ("textgen serve: error: attention backend 'flash_attn' is not offered "
                    "by this backend (offered: cpu_fused, cpu_paged)")


def _generate(engine: EngineCore, prompt: list[int], n: int) -> list[int]:
    from textgen.core.engine.types import EngineRequest
    from textgen.core.sampling_params import SamplingParams

    events = []
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_new_tokens=n, temperature=0.0)), events.append)
    while engine.has_work():
        engine.step()
    return [e.token.id for e in events if e.token is not None]


def test_fp8_kv_cache_halves_the_bytes_and_keeps_greedy_output(tiny_model_factory) -> None:
    from textgen.core.llm import LLM
    from textgen.demo import DEMO_MODEL_PATH

    prompts = ["def fib(n):", "import os\nimport sys\n", "class Stack:", "for i in range(10):"]
    plain = LLM(DEMO_MODEL_PATH, backend="cpu", dtype="bfloat16")
    fp8 = LLM(DEMO_MODEL_PATH, backend="cpu", dtype="bfloat16", kv_cache_dtype="fp8_e4m3fn")
    kv_plain = next(line for line in plain.engine.startup_lines if line.startswith("KV cache"))
    kv_fp8 = next(line for line in fp8.engine.startup_lines if line.startswith("KV cache"))
    per_block = lambda line: int(line.split("(")[1].split(" bytes per block")[0])  # noqa: E731
    assert "in bfloat16" in kv_plain and "in float8_e4m3fn" in kv_fp8
    assert per_block(kv_fp8) * 2 == per_block(kv_plain)
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    a = plain.generate(prompts, max_new_tokens=8, temperature=0.0)
    b = fp8.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_cpu_profiles_only_when_a_memory_fraction_is_given(tiny_llama) -> None:
    from textgen.core.llm import LLM

    plain = LLM(tiny_llama, backend="cpu", dtype="float32").engine.startup_lines[2]
    assert plain.endswith("no profile run (the backend's budget rule needs none)")
    # a high fraction: the rule reserves total * (1 - fraction), and a busy machine may have half its memory in use
    profiled = LLM(tiny_llama, backend="cpu", dtype="float32", memory_fraction=0.95, max_batch_prefill_tokens=256)
    line = profiled.engine.startup_lines[2]
    assert "; profile run peak " in line  # measured from the process's resident-set peak (VmHWM)

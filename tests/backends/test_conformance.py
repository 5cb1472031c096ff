"""The conformance kit passes for the CPU backend and the third-party acme plugin, and fails with a
readable report for a backend whose kernel is subtly wrong."""
from __future__ import annotations

import pytest
import torch

from textgen.core.backend import BackendCandidate
from textgen.core.hookspecs import hookimpl
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.core.plugins import PluginManager
from textgen.core.registry import AttentionBackendInfo
from textgen.testing.conformance import run_conformance
from tests.plugins.install import plugin_distributions  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_cpu_backend_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from textgen.api.cli import main

    assert main(["check-backend", "cpu"]) == 0
    out = capsys.readouterr().out
    # the C++ kernel (no fp8 cache: an fp8 cache negotiates the portable kernel, checked through acme's)
    assert out.startswith("conformance of backend 'cpu' (attention kernel cpu_fused):")
    for check in ("kernel gqa", "kernel sliding-window", "kernel soft-cap", "kernel alibi", "logits", "engine"):
        assert f"  PASS  {check}: " in out
    assert out.rstrip().endswith("6 passed, 0 failed")


@pytest.mark.usefixtures("plugin_distributions")
def test_third_party_acme_backend_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen_acme.backend import DENSE_CALLS

    monkeypatch.setenv("TEXTGEN_ACME_AVAILABLE", "1")
    before = DENSE_CALLS[0]
    report = run_conformance("acme")
    assert report.passed, report.render()
    assert report.kernel == "torch_paged" and len(report.results) == 8
    assert DENSE_CALLS[0] > before  # the model's linears ran on the backend's own GEMM (Backend.dense_linear)


class ForgetfulAttention(TorchPagedAttention):
    """Right on a step that is one fresh prefill, off by 0.01 on steps with cached prefixes or
    several requests (the class of bug a kernel has when it special-cases its fast path)."""

    name = "forgetful"

    def forward(self, q, k, v, kv_cache, meta):
        out = super().forward(q, k, v, kv_cache, meta)
        if meta.max_query_len > 1 and not meta.fresh_prefill:
            out = out + 0.01 * torch.ones_like(out)
        return out


class _ShoddyPlugin:
    @hookimpl
    def textgen_probe_backend(self, config):
        return BackendCandidate("shoddy", True, 1, "shoddy device", "textgen.backends.cpu.backend:CPUBackend")

    @hookimpl
    def textgen_attention_backends(self, backend):
        return [AttentionBackendInfo("forgetful", f"{__name__}:ForgetfulAttention", 5)]


def test_broken_kernel_fails_with_a_readable_report() -> None:
    def make() -> PluginManager:
        pm = PluginManager(allow={"cpu"})
        pm.register(_ShoddyPlugin(), "shoddy")
        return pm

    report = run_conformance("shoddy", make)
    text = report.render()
    assert not report.passed
    lines = text.splitlines()
    assert lines[0] == "conformance of backend 'cpu' (attention kernel forgetful):"
    gqa = next(line for line in lines if "kernel gqa" in line)
    assert gqa.startswith("  FAIL  kernel gqa: step 0 ({'cached': [9, 0, 12, 5], 'query': [7, 11, 1, 1]}): "
                          "max |error| 0.01")
    assert " > 0.0001 at token row " in gqa  # tolerance and where, so a vendor can look
    assert any(line.startswith("  FAIL  logits: ") for line in lines)
    assert lines[-1].endswith("failed") and not lines[-1].endswith(" 0 failed")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA backend's GPU tests)")
def test_cuda_backend_passes() -> None:
    report = run_conformance("cuda")
    assert report.passed, report.render()

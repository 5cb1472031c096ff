"""FlashInferPaged: check() reasons, negotiation against flash-attn with a fake device report, the
page table it plans from, and its call contract (a documented-semantics stand-in for FlashInfer's
wrappers on CPU; the real kernel against the portable one where a CUDA GPU and flashinfer run)."""
from __future__ import annotations

import sys
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from textgen.backends.cuda import attention as fa
from textgen.backends.cuda import flashinfer as fi
from textgen.backends.cuda.flashinfer import FlashInferPaged, page_table
from textgen.backends.cuda.plugin import FLASH_ATTN, FLASHINFER
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import negotiate
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.core.registry import TORCH_PAGED
from textgen.testing.steps import StepRow, fill_step, kernel_metadata


def _spec(**overrides: object) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16, block_size=16, scale=128**-0.5)
    fields.update(overrides)
    return AttentionSpec(**fields)


def test_check_names_every_reason_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fi, "installed_version", lambda: None)
    monkeypatch.setattr(fi, "_device_reasons", lambda: ["no CUDA device is visible to torch"])
    assert FlashInferPaged.check(_spec(dtype=torch.float32, head_size=80, alibi_slopes=(1.0,) * 8)) == [
        "ALiBi is not supported",
        "flashinfer is not installed (pip install 'flashinfer-python>=0.2.5')",
        "dtype torch.float32 is not supported (FlashInfer computes in float16 or bfloat16)",
        "head_size 80 is unsupported (FlashInfer: 64, 128, 256)",
        "no CUDA device is visible to torch",
    ]
    monkeypatch.setattr(fi, "installed_version", lambda: (0, 2, 3))
    assert FlashInferPaged.check(_spec())[0] == "flashinfer 0.2.3 has no plan()/run() wrappers (needs >= 0.2.5)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_check_on_this_machine_names_what_is_missing() -> None:
    reasons = FlashInferPaged.check(_spec())
    assert reasons[-1] == "no CUDA device is visible to torch"
    if find_spec("flashinfer") is None:
        assert reasons[0].startswith("flashinfer is not installed")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A device report of an Ampere GPU with both kernels installed (flash-attn optionally not)."""
    monkeypatch.setattr(fi, "installed_version", lambda: (0, 2, 14))
    monkeypatch.setattr(fi, "_device_reasons", lambda: [])
    monkeypatch.setattr(fa, "_device_reasons", lambda: [])
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 7, 4))
    return monkeypatch


def test_negotiation_prefers_flash_attn_at_256_and_flashinfer_for_other_block_sizes(fake_gpu) -> None:
    kernels, specs = [TORCH_PAGED, FLASHINFER, FLASH_ATTN], [_spec()]
    assert negotiate(kernels, specs, None, None).kernel_cls.name == "flash_attn"
    choice = negotiate(kernels, specs, 16, torch.float8_e4m3fn)
    assert (choice.kernel_cls, choice.block_size) == (FlashInferPaged, 16)
    assert [r.describe() for r in choice.rejected] == [
        "flash_attn: block_size 16 is not a multiple of 256; KV cache dtype torch.float8_e4m3fn is not supported"]
    fake_gpu.setattr(fa, "installed_version", lambda: None)
    choice = negotiate(kernels, specs, None, None)
    assert (choice.kernel_cls.name, choice.block_size) == ("flashinfer", 16)


def test_page_table_is_flashinfers_csr_layout() -> None:
    indptr, indices, last = page_table(torch.tensor([20, 16, 1], dtype=torch.int32),
                                       torch.tensor([[4, 7, 9], [2, 0, 0], [5, 0, 0]], dtype=torch.int32), 16)
    assert indptr.tolist() == [0, 2, 3, 4] and indices.tolist() == [4, 7, 2, 5] and last.tolist() == [4, 16, 1]


class _Wrapper:
    """FlashInfer's paged wrappers as documented (docs.flashinfer.ai, flashinfer.decode /
    flashinfer.prefill): `plan` takes the CSR page table and the layer facts; `run(q, (k, v))`
    attends each request's query rows (decode: row b; prefill: qo_indptr[b]:qo_indptr[b+1]) to
    its (pages - 1) * page_size + last_page_len keys, causal aligned bottom-right, a key visible
    when i + kv - q - window_left <= j (window_left -1: all), logits soft-capped as
    cap * tanh(scale * q.k / cap). A stand-in for the CUDA kernel: it pins our call contract."""

    plans: list[dict] = []

    def __init__(self, workspace: torch.Tensor, layout: str, prefill: bool) -> None:
        assert layout == "NHD" and workspace.dtype == torch.uint8
        self.prefill = prefill

    def plan(self, *args, **kw) -> None:
        if self.prefill:
            qo_indptr, *args = args
            assert kw.pop("causal") is True
        indptr, indices, last, heads, kv_heads, head_dim, page_size = args
        self.p = dict(kw, qo=qo_indptr if self.prefill else None, indptr=indptr, indices=indices, last=last,
                      page_size=page_size, heads=heads, kv_heads=kv_heads)
        _Wrapper.plans.append(self.p)

    def run(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        p, (k_cache, v_cache) = self.p, kv
        assert q.dtype == p["q_data_type"] and k_cache.dtype == p["kv_data_type"] and q.shape[1] == p["heads"]
        outs = []
        for b in range(len(p["indptr"]) - 1):
            pages = p["indices"][p["indptr"][b]: p["indptr"][b + 1]].long()
            kv_len = (len(pages) - 1) * p["page_size"] + int(p["last"][b])
            keys = k_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(p["heads"] // p["kv_heads"], 1)
            values = v_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(p["heads"] // p["kv_heads"], 1)
            rows = q[p["qo"][b]: p["qo"][b + 1]] if self.prefill else q[b: b + 1]
            i, j = torch.arange(len(rows))[:, None], torch.arange(kv_len)[None, :]
            allowed = (j <= i + kv_len - len(rows)) & (j >= i + kv_len - len(rows) - p["window_left"]
                                                       if p["window_left"] >= 0 else True)
            scores = torch.einsum("qhd,khd->hqk", rows.float(), keys) * p["sm_scale"]
            if p["logits_soft_cap"] is not None:
                scores = p["logits_soft_cap"] * torch.tanh(scores / p["logits_soft_cap"])
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype))
        return torch.cat(outs)


@pytest.fixture
def flashinfer_semantics(monkeypatch: pytest.MonkeyPatch):
    _Wrapper.plans = []
    monkeypatch.setitem(sys.modules, "flashinfer", SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=lambda ws, layout: _Wrapper(ws, layout, prefill=False),
        BatchPrefillWithPagedKVCacheWrapper=lambda ws, layout: _Wrapper(ws, layout, prefill=True)))
    monkeypatch.setattr(fi, "WORKSPACE_BYTES", 1024)


MIXED = [StepRow(20, 30, [3, 1, 6, 7]), StepRow(40, 1, [0, 5, 8]), StepRow(0, 5, [2])]
DECODE = [StepRow(20, 1, [3, 1]), StepRow(40, 1, [0, 5, 8]), StepRow(3, 1, [2])]


def _run_both(spec: AttentionSpec, rows: list[StepRow], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=generator).to(spec.dtype)  # noqa: E731
    cache = randn(*FlashInferPaged.kv_cache_shape(9, 16, spec.num_kv_heads, spec.head_size, spec.dtype))
    cache = cache.to(spec.cache_dtype)
    step = fill_step(rows, spec.block_size, device)
    tokens = step.input_ids.numel()
    q = randn(tokens, spec.num_heads, spec.head_size)
    k, v = randn(tokens, spec.num_kv_heads, spec.head_size), randn(tokens, spec.num_kv_heads, spec.head_size)
    reference = cache.clone()
    out = FlashInferPaged(spec).forward(q, k, v, cache, kernel_metadata(FlashInferPaged, [spec], step, device))
    want = TorchPagedAttention(spec).forward(q, k, v, reference, kernel_metadata(TorchPagedAttention, [spec], step, device))
    assert torch.equal(cache.view(torch.uint8), reference.view(torch.uint8))
    return out, want


@pytest.mark.parametrize("rows", [MIXED, DECODE], ids=["mixed-prefill-wrapper", "decode-wrapper"])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 24}, {"logits_soft_cap": 5.0},
                                   {"kv_cache_dtype": torch.float8_e4m3fn}], ids=["plain", "window", "softcap", "fp8"])
def test_forward_keeps_flashinfers_paged_contract(flashinfer_semantics, rows, extra) -> None:
    spec = _spec(dtype=torch.float32, head_size=16, scale=0.25, **extra)
    out, want = _run_both(spec, rows)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    (plan,) = _Wrapper.plans  # planned once for the step, read by every layer
    assert (plan["qo"] is None) == (rows is DECODE)


@pytest.mark.skipif(not torch.cuda.is_available() or find_spec("flashinfer") is None,
                    reason="needs a CUDA device and flashinfer-python")
@pytest.mark.parametrize("rows", [MIXED, DECODE], ids=["mixed", "decode"])
def test_matches_torch_paged_attention_on_the_gpu(rows) -> None:
    spec = _spec()
    assert FlashInferPaged.check(spec) == []
    out, want = _run_both(spec, rows, "cuda")
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)

"""CUDAKernels: availability reasons, the fallback, and the torch._scaled_mm call contract.

On CPU the fp8 path runs against a stand-in for `torch._scaled_mm` (installed only here) that
checks the documented preconditions (float8_e4m3fn operands, row-major first / column-major
second operand, K and N multiples of 16, float32 scales shaped per the scaling mode, bfloat16
output for row-wise scales) and computes the documented result in float64; the layer goes through
textgen's real Fp8 quantizer and CUDAKernels code. Where a CUDA GPU of capability 8.9+ exists, the
real kernel runs against dequantize + GEMM.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from textgen.backends.cuda import quant_kernels as qk
from textgen.backends.cuda.plugin import CUDA_KERNELS, textgen_quantizers
from textgen.backends.cuda.quant_kernels import CUDAKernels
from textgen.core.layers.linear import Linear
from textgen.core.quantization.fp8 import FP8, Fp8, quantize_fp8_channels


class ScaledMMStandIn:
    """torch._scaled_mm's documented semantics: out = (A * scale_a) @ (B * scale_b) in out_dtype."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, a: torch.Tensor, b: torch.Tensor, *, scale_a: torch.Tensor, scale_b: torch.Tensor,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
        assert a.dtype == FP8 and b.dtype == FP8, (a.dtype, b.dtype)
        assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]
        assert a.stride(1) == 1, "first operand must be row-major"
        assert b.stride(0) == 1 and b.stride(1) == b.shape[0], "second operand must be column-major"
        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        assert k % 16 == 0 and n % 16 == 0, (k, n)
        assert scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32
        if scale_a.numel() == 1 and scale_b.numel() == 1:
            self.calls.append(f"tensorwise->{out_dtype}")
        else:
            assert scale_a.shape == (m, 1) and scale_b.shape == (1, n), (scale_a.shape, scale_b.shape)
            assert out_dtype == torch.bfloat16, "row-wise scaling writes bfloat16 only"
            self.calls.append("rowwise")
        out = (a.double() * scale_a.double()) @ (b.double() * scale_b.double())
        return out.to(out_dtype)


@pytest.fixture
def scaled_mm(monkeypatch: pytest.MonkeyPatch) -> ScaledMMStandIn:
    stand_in = ScaledMMStandIn()
    monkeypatch.setattr(torch, "_scaled_mm", stand_in)
    monkeypatch.setattr(qk, "fp8_device_reasons", lambda device: [])  # as on an sm89+ device
    return stand_in


def _fp8_layer(weight: torch.Tensor, dtype: torch.dtype, per_tensor: bool = False) -> Linear:
    """A checkpoint-style fp8 layer loaded through the Fp8 quantizer with CUDAKernels."""
    n, k = weight.shape
    layer = Linear(k, n, bias=False, dtype=dtype, quantizer=Fp8({"quant_method": "fp8"}, CUDAKernels()))
    codes, scales = quantize_fp8_channels(weight)
    if per_tensor:
        scale = scales.max()
        codes, scales = (weight.float() / scale).clamp(-448, 448).to(FP8), scale.reshape(1)
    layer.weight.weight_loader(layer.weight, codes)
    layer.weight_scale.weight_loader(layer.weight_scale, scales)
    layer.process_after_loading()
    return layer


def _reference(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize + GEMM in float64: the weight the layer holds, unquantized activations."""
    return F.linear(x.double(), layer.quantizer.kernels.dense_weight(layer, torch.float64))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_device_reasons_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qk.fp8_device_reasons(torch.device("cpu")) == ["the weight is on cpu, not on a CUDA device"]
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert qk.fp8_device_reasons(cuda) == [
        "CUDA compute capability 8.0 is below 8.9 (fp8 GEMM needs Ada, Hopper or later)"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert qk.fp8_device_reasons(cuda) == []
    monkeypatch.delattr(torch, "_scaled_mm")
    assert qk.fp8_device_reasons(cuda) == [
        f"torch {torch.__version__} has no torch._scaled_mm (fp8 GEMM needs torch >= 2.5)"]


def test_shape_reasons_name_each_unaligned_dimension() -> None:
    assert qk.fp8_shape_reasons(64, 32) == []
    assert qk.fp8_shape_reasons(40, 24) == ["output size 40 is not a multiple of 16",
                                            "input size 24 is not a multiple of 16"]


def test_plugin_offers_every_builtin_method_on_cuda_kernels() -> None:
    infos = textgen_quantizers(backend=SimpleNamespace(name="cuda"))
    assert {info.name for info in infos} >= {"fp8", "gptq", "awq", "int4", "int8"}
    assert {info.kernels for info in infos} == {CUDA_KERNELS}
    assert textgen_quantizers(backend=SimpleNamespace(name="cpu")) is None


@pytest.mark.parametrize(("dtype", "per_tensor", "path"), [
    (torch.bfloat16, False, "rowwise"),
    (torch.bfloat16, True, "tensorwise->torch.bfloat16"),
    (torch.float16, True, "tensorwise->torch.float16"),
    (torch.float16, False, "tensorwise->torch.float32"),
])
def test_scaled_mm_path_matches_dequantize_and_gemm(scaled_mm: ScaledMMStandIn, dtype: torch.dtype,
                                                    per_tensor: bool, path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen) * torch.linspace(0.1, 3.0, 48).unsqueeze(-1)
    layer = _fp8_layer(weight, dtype, per_tensor)
    assert layer.weight_format == "fp8_scaled_mm" and layer.fp8_per_tensor is per_tensor
    x = (torch.randn(2, 5, 64, generator=gen) * torch.linspace(0.5, 4.0, 5).unsqueeze(-1)).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    out = layer.quantizer.apply(layer, x, bias)
    assert scaled_mm.calls == [path]
    assert out.dtype == dtype and out.shape == (2, 5, 48)
    # e4m3 activations carry 3 mantissa bits: a few percent of error, not the 100% of a wrong scale
    assert _relative_error(out - bias, _reference(layer, x)) < 0.04


def test_per_token_scales_keep_small_rows_accurate(scaled_mm: ScaledMMStandIn) -> None:
    """A row 1000x smaller than its neighbour keeps its precision on the row-wise path."""
    gen = torch.Generator().manual_seed(1)
    layer = _fp8_layer(torch.randn(32, 32, generator=gen), torch.bfloat16)
    x = torch.randn(2, 32, generator=gen)
    x[1] *= 1e-3
    x = x.to(torch.bfloat16)
    out = layer.quantizer.apply(layer, x, None)
    assert _relative_error(out[1:], _reference(layer, x)[1:]) < 0.04


def test_unaligned_or_float32_layers_fall_back_with_the_reason_once(
        scaled_mm: ScaledMMStandIn, caplog: pytest.LogCaptureFixture) -> None:
    qk.report_fallback.cache_clear()
    gen = torch.Generator().manual_seed(2)
    with caplog.at_level(logging.WARNING, logger=qk.__name__):
        layers = [_fp8_layer(torch.randn(40, 64, generator=gen), torch.bfloat16) for _ in range(2)]
    assert [layer.weight_format for layer in layers] == ["fp8", "fp8"]
    assert [r.getMessage() for r in caplog.records] == [
        "fp8 40x64 weight: dequantize + GEMM instead of torch._scaled_mm: output size 40 is not a multiple of 16"]
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    weight = layers[0].fp8_weight.to(torch.bfloat16) * layers[0].fp8_scales.to(torch.bfloat16).unsqueeze(-1)
    assert torch.equal(layers[0].quantizer.apply(layers[0], x, None), F.linear(x, weight))
    aligned = _fp8_layer(torch.randn(32, 64, generator=gen), torch.float32)
    assert torch.allclose(aligned.quantizer.apply(aligned, x.float(), None), _reference(aligned, x.float()).float(),
                          atol=1e-5)
    assert scaled_mm.calls == []  # float32 activations: dequantize + GEMM


def test_without_a_cuda_device_the_layer_keeps_the_portable_layout() -> None:
    qk.report_fallback.cache_clear()
    layer = _fp8_layer(torch.randn(32, 32), torch.bfloat16)
    assert layer.weight_format == "fp8"
    assert layer.quantizer.describe() == f"fp8 e4m3 per-channel scales, from the checkpoint (kernels: {CUDAKernels.name})"


def _sm89() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= qk.FP8_MIN_CAPABILITY


@pytest.mark.skipif(not _sm89(), reason="needs a CUDA GPU of compute capability 8.9+ (torch._scaled_mm fp8)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_real_scaled_mm_matches_dequantize_and_gemm_on_gpu(dtype: torch.dtype, per_tensor: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(256, 512, generator=gen)
    x = torch.randn(7, 512, generator=gen)
    with torch.device("cuda"):
        layer = _fp8_layer(weight.cuda(), dtype, per_tensor)
    assert layer.weight_format == "fp8_scaled_mm"
    out = layer.quantizer.apply(layer, x.to("cuda", dtype), None)
    assert out.dtype == dtype
    assert _relative_error(out.cpu(), _reference(layer, x.cuda()).cpu()) < 0.04

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
    described = layer.quantizer.describe()
    assert described == f"fp8 e4m3 per-channel scales, from the checkpoint (kernels: {CUDAKernels.name})"


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


# --- int4 on Marlin ---------------------------------------------------------------------------

def _fragment_order() -> list[int]:
    """Marlin's documented order of a 16x64 block (4 tiles of 16x16, 256 apart): warp thread t
    takes column t // 4 of rows 2(t%4), 2(t%4)+1, 2(t%4)+8, 2(t%4)+9 for columns c and c + 8;
    then each run of 8 is stored as nibbles 0 2 4 6 1 3 5 7."""
    order = []
    for t in range(32):
        rows = (2 * (t % 4), 2 * (t % 4) + 1, 2 * (t % 4) + 8, 2 * (t % 4) + 9)
        run = [16 * r + t // 4 + c for c in (0, 8) for r in rows]
        for tile in range(4):
            order += [v + 256 * tile for v in run]
    return [run[i] for start in range(0, 1024, 8) for run in [order[start:start + 8]] for i in (0, 2, 4, 6, 1, 3, 5, 7)]


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    return ((words.long().unsqueeze(-1) >> (4 * torch.arange(8))) & 15).reshape(words.shape[0], -1)


def _reference_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Element (n, k) of a Marlin int32 [K/16, 2N] weight: row of tiles k // 16, tile n // 16 at
    256 * (n // 16) + 16 * (k % 16) + n % 16 in natural order, stored at the fragment position."""
    rows, n = qweight.shape[0], qweight.shape[1] // 2
    stored = _nibbles(qweight)
    natural = torch.empty_like(stored)
    order = torch.tensor(_fragment_order())
    for chunk in range(0, 16 * n, 1024):
        natural[:, chunk + order] = stored[:, chunk:chunk + 1024]
    nn_, kk = torch.meshgrid(torch.arange(n), torch.arange(rows * 16), indexing="ij")
    return natural[kk // 16, 256 * (nn_ // 16) + 16 * (kk % 16) + nn_ % 16]


def _reference_scales(stored: torch.Tensor, single_group: bool) -> torch.Tensor:
    """Grouped: each 64 columns stored as i + 8j for i, j < 8; one group: each 32 as
    2i + {0, 1, 8, 9, 16, 17, 24, 25} for i < 4."""
    order = ([i + 8 * j for i in range(8) for j in range(8)] if not single_group
             else [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])
    natural = torch.empty_like(stored)
    for start in range(0, stored.shape[1], len(order)):
        natural[:, start + torch.tensor(order)] = stored[:, start:start + len(order)]
    return natural


def _reference_zero_points(words: torch.Tensor) -> torch.Tensor:
    stored = _nibbles(words).reshape(-1, 8)
    deinterleaved = torch.empty_like(stored)
    deinterleaved[:, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])] = stored
    return _reference_scales(deinterleaved.reshape(words.shape[0], -1), single_group=False)


def _gptq_int4(n: int, k: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Canonical int4 as a GPTQ/AWQ checkpoint gives it: integer zero points zp, z = (8 - zp) * s."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=gen) * 0.02 + 0.001
    zero_points = torch.randint(0, 16, scales.shape, generator=gen)
    return codes, scales, (8 - zero_points) * scales, zero_points


@pytest.mark.parametrize(("k", "group_size"), [(256, 128), (128, 128), (256, 32)])
def test_marlin_repack_reads_back_through_the_documented_layout(k: int, group_size: int) -> None:
    from textgen.backends.cuda import quant_marlin as marlin

    codes, scales, _, zero_points = _gptq_int4(128, k, group_size)
    qweight = marlin.marlin_weight(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (k // 16, 256)
    assert torch.equal(_reference_codes(qweight), codes.long())
    single = group_size == k
    stored_scales = marlin.marlin_scales(scales.t().contiguous(), single)
    assert torch.equal(_reference_scales(stored_scales, single), scales.t())
    words = marlin.marlin_zero_points(zero_points.t().contiguous().to(torch.int32))
    assert words.dtype == torch.int32 and words.shape == (k // group_size, 16)
    assert torch.equal(_reference_zero_points(words), zero_points.t())
    assert torch.equal(marlin.unmarlin_weight(qweight), codes.long())


def test_marlin_zero_points_must_be_integers() -> None:
    from textgen.backends.cuda import quant_marlin as marlin
    from textgen.core.quantization.kernels import quantize_int4_groups

    _, scales, zeros, zero_points = _gptq_int4(64, 128, 64)
    assert torch.equal(marlin.integer_zero_points(scales, zeros), zero_points.to(torch.int32))
    scales[0, 0], zeros[0, 0] = 0.0, 0.0  # a dead group: W = 0 whatever the zero point
    assert int(marlin.integer_zero_points(scales, zeros)[0, 0]) == 8
    _, min_max_scales, min_max_zeros = quantize_int4_groups(torch.randn(64, 128), 64)
    assert marlin.integer_zero_points(min_max_scales, min_max_zeros) is None


def test_marlin_reasons_name_package_device_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen.backends.cuda import quant_marlin as marlin

    monkeypatch.setattr(marlin, "find_spec", lambda name: None)
    assert marlin.package_reasons() == [
        "the kernels package is not installed (pip install 'kernels>=0.17'; it fetches "
        "kernels-community/quantization from the Hugging Face Hub)"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert marlin.device_reasons(torch.device("cuda", 0)) == [
        "CUDA compute capability 7.5 is below 8.0 (Marlin needs Ampere or later)"]
    assert marlin.shape_reasons(96, 192, 16, torch.float32) == [
        "a 96x192 weight: Marlin needs the input size a multiple of 128 and the output size of 64",
        "group size 16 is not one of (32, 64, 128) or the whole row",
        "compute dtype torch.float32 is not float16 or bfloat16"]
    assert marlin.shape_reasons(64, 256, 256, torch.bfloat16) == []


class MarlinOpsStandIn:
    """The hub kernel's `gptq_marlin_gemm` with its documented semantics: out = a @ W.T with
    W = (q - zero) * scale read from Marlin's layout (uint4 with zero points)."""

    scalar_types = SimpleNamespace(uint4="uint4", uint4b8="uint4b8")

    def __init__(self) -> None:
        self.calls = 0

    def gptq_marlin_gemm(self, a, c, b_q_weight, b_scales, global_scale, b_zeros, g_idx, perm,  # noqa: ANN001
                         workspace, b_q_type, size_m, size_n, size_k, is_k_full=True, use_atomic_add=False,
                         use_fp32_reduce=False, is_zp_float=False) -> torch.Tensor:
        assert a.is_contiguous() and a.shape == (size_m, size_k) and a.dtype == b_scales.dtype
        assert c is None and global_scale is None and not is_zp_float
        assert b_q_weight.dtype == torch.int32 and b_q_weight.shape == (size_k // 16, size_n * 2)
        groups = b_scales.shape[0]
        assert b_scales.shape == (groups, size_n) and b_zeros.dtype == torch.int32
        assert b_zeros.shape == (groups, size_n // 8)
        assert g_idx.numel() == 0 and perm.numel() == 0 and is_k_full and b_q_type == "uint4"
        assert workspace.dtype == torch.int32 and workspace.numel() >= size_n // 64 * 16
        self.calls += 1
        scales = _reference_scales(b_scales, single_group=groups == 1).double().t()
        zeros = _reference_zero_points(b_zeros).double().t()
        size = size_k // groups
        weight = (_reference_codes(b_q_weight).double() - zeros.repeat_interleave(size, 1)) * \
            scales.repeat_interleave(size, 1)
        return (a.double() @ weight.t()).to(a.dtype)


@pytest.fixture
def marlin_ops(monkeypatch: pytest.MonkeyPatch) -> MarlinOpsStandIn:
    from textgen.backends.cuda import quant_marlin as marlin

    stand_in = MarlinOpsStandIn()
    monkeypatch.setattr(marlin, "load_ops", lambda: stand_in)
    monkeypatch.setattr(marlin, "package_reasons", lambda: [])
    monkeypatch.setattr(marlin, "device_reasons", lambda device: [])  # as on an sm80+ device
    return stand_in


@pytest.mark.parametrize(("k", "group_size"), [(256, 128), (128, 128)])
def test_marlin_path_matches_dequantize_and_gemm(marlin_ops: MarlinOpsStandIn, k: int, group_size: int) -> None:
    from textgen.core.quantization.kernels import dequantize_int4

    codes, scales, zeros, _ = _gptq_int4(192, k, group_size, seed=4)
    layer = nn_layer(torch.float16)
    kernels = CUDAKernels()
    kernels.pack_int4(layer, codes, scales, zeros, group_size)
    assert layer.weight_format == "int4_marlin"
    reference = dequantize_int4(codes, scales, zeros, torch.float64)
    assert torch.allclose(kernels.dense_weight(layer, torch.float64), reference, atol=1e-3)
    x = torch.randn(3, 2, k, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    bias = torch.randn(192).to(torch.float16)
    out = kernels.apply(layer, x, bias)
    assert marlin_ops.calls == 1 and out.shape == (3, 2, 192) and out.dtype == torch.float16
    assert _relative_error(out - bias, F.linear(x.double(), reference)) < 2e-3


def test_marlin_falls_back_for_min_max_zeros_with_the_reason(
        marlin_ops: MarlinOpsStandIn, caplog: pytest.LogCaptureFixture) -> None:
    from textgen.core.quantization.kernels import quantize_int4_groups

    qk.report_fallback.cache_clear()
    codes, scales, zeros = quantize_int4_groups(torch.randn(64, 128), 64)
    layer = nn_layer(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=qk.__name__):
        CUDAKernels().pack_int4(layer, codes, scales, zeros, 64)
    assert layer.weight_format == "int4" and marlin_ops.calls == 0
    assert [r.getMessage() for r in caplog.records] == [
        "int4 64x128 weight: dequantize + GEMM instead of Marlin: its zero points are not integers (on-the-fly "
        "int4's min/max zeros); Marlin takes integer zero points (GPTQ / AWQ checkpoints)"]


def nn_layer(dtype: torch.dtype) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.compute_dtype = dtype
    return layer


def _marlin_gpu() -> bool:
    from importlib.util import find_spec

    return find_spec("kernels") is not None and torch.cuda.is_available() and \
        torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _marlin_gpu(), reason="needs a CUDA GPU of compute capability 8.0+ and the kernels package "
                    "(with kernels-community/quantization on the Hub or in its cache)")
def test_real_marlin_matches_dequantize_and_gemm_on_gpu() -> None:
    from textgen.core.quantization.kernels import dequantize_int4

    codes, scales, zeros, _ = _gptq_int4(256, 512, 128, seed=6)
    layer = nn_layer(torch.float16)
    kernels = CUDAKernels()
    kernels.pack_int4(layer, codes.cuda(), scales.cuda(), zeros.cuda(), 128)
    assert layer.weight_format == "int4_marlin"
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7)).to("cuda", torch.float16)
    reference = F.linear(x.double(), dequantize_int4(codes, scales, zeros, torch.float64).cuda())
    assert _relative_error(kernels.apply(layer, x, None).cpu(), reference.cpu()) < 2e-3

"""The CPU backend's C++ int8 / int4 GEMV kernels (backends/cpu/quant_gemv.py) against a float64
reference computed here from the same codes, scales and zeros.

Tolerance, from how the kernels sum (csrc/quant_gemv.cpp): every product is exact in fp32 (codes
have at most 8 significant bits, activations are bf16 or fp32 and products of the bf16 path are
exact by construction), then at most K fp32 additions per output, whose rounding errors are
bounded by K * 2^-24 times the sum of the magnitudes they add. Those magnitudes are the
|codes + c| * |s| terms the kernel sums (c = 128 on the bf16 path, which adds 128 to every code,
0 on fp32 and int8) plus |z - c' s| * sum |x| per group (c' = 136 / 8). A bf16 output is then
rounded once more (half an ulp: 2^-8 relative, bf16 keeping 8 significant bits). An error in the layout (a nibble or block out of
order, a wrong group) moves outputs by the size of the outputs themselves, far above the bound.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from textgen.backends.cpu import quant_gemv
from textgen.backends.cpu.quant_kernels import GEMV_ROWS, MAX_PACKED_ROWS, CPUKernels
from textgen.core.quantization.kernels import quantize_int4_groups, quantize_int8_channels

pytestmark = pytest.mark.skipif(not quant_gemv.available(), reason=f"GEMV kernels: {quant_gemv.build_problem()}")

U32 = 2.0 ** -24
ROWS = [1, 2, 3, 4, 5, 7, 8, 13, 16]
# (N, K, group): N not a multiple of 16 (the thread grain) or of any block, block 32 (group 32, 96)
# and 64 (64, 128, 256), a single group, K from 64 to 2048
INT4_SHAPES = [(1, 64, 32), (77, 96, 32), (130, 320, 64), (33, 192, 96), (50, 512, 256), (257, 768, 128),
               (19, 2048, 128)]
# int8 K tails: not a multiple of 32 (the unrolled step) nor of 16 (the masked step)
INT8_SHAPES = [(1, 7, None), (77, 100, None), (130, 333, None), (257, 768, None), (40, 2050, None)]


def _int4(n: int, k: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros = quantize_int4_groups(torch.randn(n, k, generator=gen) * 0.05, group)
    sz_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    sz = torch.stack((scales, zeros), dim=-1).to(sz_dtype).contiguous()
    return codes, sz


def _bound(x: torch.Tensor, magnitudes: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-output error bound: K fp32 roundings of the summed magnitudes, plus bf16's last rounding."""
    k = x.shape[-1]
    bound = k * U32 * (x.double().abs() @ magnitudes.t())
    return bound + (2.0 ** -8 * ref.abs() if dtype == torch.bfloat16 else 0) + 1e-30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", INT4_SHAPES)
def test_int4_gemv_matches_the_dequantized_weight(dtype, n, k, group):
    codes, sz = _int4(n, k, group, dtype, seed=n * k)
    packed = quant_gemv.pack_int4(codes, group)
    assert packed.shape == (n, k // 2) and torch.equal(quant_gemv.unpack_int4(packed, group), codes)
    s, z = sz[..., 0].double().repeat_interleave(group, 1), sz[..., 1].double().repeat_interleave(group, 1)
    dense = (codes.double() - 8) * s + z
    offset, base = (128, 136) if dtype == torch.bfloat16 else (0, 8)
    magnitudes = (codes.double() + offset) * s.abs() + (z - base * s).abs()
    for m in ROWS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        ref = x.double() @ dense.t()
        out = quant_gemv.int4_linear(x, packed, sz, group)
        assert out.dtype == dtype and out.shape == (m, n)
        assert ((out.double() - ref).abs() <= _bound(x, magnitudes, ref, dtype)).all(), (m, (out.double() - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,_", INT8_SHAPES)
def test_int8_gemv_matches_the_dequantized_weight(dtype, n, k, _):
    gen = torch.Generator().manual_seed(n + k)
    codes, scales = quantize_int8_channels(torch.randn(n, k, generator=gen))
    scales = scales.to(dtype)
    dense = codes.double() * scales.double().unsqueeze(-1)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = x.double() @ dense.t()
        out = quant_gemv.int8_linear(x, codes, scales)
        assert out.dtype == dtype and out.shape == (m, n)
        assert ((out.double() - ref).abs() <= _bound(x, dense.abs(), ref, dtype)).all(), (m, (out.double() - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_ops_write_the_weight(dtype):
    """(q - 8) * s + z computed as one fp32 FMA q * s + (z - 8 s): within 2 fp32 roundings of the
    magnitudes, then one rounding to the output dtype."""
    for n, k, group in INT4_SHAPES:
        codes, sz = _int4(n, k, group, torch.bfloat16, seed=k)
        s, z = sz[..., 0].double().repeat_interleave(group, 1), sz[..., 1].double().repeat_interleave(group, 1)
        ref = (codes.double() - 8) * s + z
        out = quant_gemv.int4_dequantize(quant_gemv.pack_int4(codes, group), sz, group, torch.empty(n, k, dtype=dtype))
        last = 2.0 ** -8 if dtype == torch.bfloat16 else U32
        bound = 3 * U32 * (codes.double() * s.abs() + (z - 8 * s).abs()) + last * ref.abs()
        assert ((out.double() - ref).abs() <= bound).all()
    codes8, scales8 = quantize_int8_channels(torch.randn(77, 100))
    out8 = quant_gemv.int8_dequantize(codes8, scales8, torch.empty(77, 100, dtype=dtype))
    ref8 = codes8.double() * scales8.double().unsqueeze(-1)
    last = 2.0 ** -8 if dtype == torch.bfloat16 else U32
    assert ((out8.double() - ref8).abs() <= last * ref8.abs()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_kernels_take_the_gemv_and_the_large_m_paths(dtype):
    """CPUKernels packs int4 in the GEMV layout and gives the same products below and above the
    GEMV row limit (GEMV, then dequantize + GEMM; int8 also torch's packed kernel above 512)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 320, generator=gen) * 0.05
    layer = torch.nn.Module()
    layer.compute_dtype = dtype
    kernels = CPUKernels()
    kernels.pack_int4(layer, *quantize_int4_groups(weight, 64), 64)
    assert layer.weight_format == "int4_gemv"
    dense = kernels.dense_weight(layer, torch.float64)
    int8 = torch.nn.Module()
    int8.compute_dtype = dtype
    kernels.pack_int8(int8, *quantize_int8_channels(weight))
    dense8 = kernels.dense_weight(int8, torch.float64)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for rows in (1, GEMV_ROWS["int4_gemv"], GEMV_ROWS["int4_gemv"] + 1, GEMV_ROWS["int8"] + 1, MAX_PACKED_ROWS + 1):
        x = torch.randn(2, rows, 320, generator=gen).to(dtype)[:, :, :]  # 3-d input, as a layer sees it
        bias = torch.randn(96, generator=gen).to(dtype)
        for lay, ref_w in ((layer, dense), (int8, dense8)):
            out = kernels.apply(lay, x, bias)
            assert out.shape == (2, rows, 96) and out.dtype == dtype
            assert torch.allclose(out.double(), x.double() @ ref_w.t() + bias.double(), atol=tol), rows
    assert "GEMV" in kernels.describe()


def test_ops_trace_under_torch_compile():
    codes, sz = _int4(64, 256, 128, torch.bfloat16, seed=0)
    packed = quant_gemv.pack_int4(codes, 128)
    codes8, scales8 = quantize_int8_channels(torch.randn(64, 256))
    scales8 = scales8.bfloat16()

    def step(x):
        return quant_gemv.int4_linear(x, packed, sz, 128) + quant_gemv.int8_linear(x, codes8, scales8)

    x = torch.randn(3, 256).bfloat16()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


def test_switched_off_the_layers_keep_torchs_packed_kernels(tmp_path):
    script = (
        "import torch\n"
        "from torch import nn\n"
        "from textgen.backends.cpu import quant_gemv\n"
        "from textgen.backends.cpu.quant_kernels import CPUKernels\n"
        "from textgen.core.quantization.kernels import quantize_int4_groups\n"
        "layer = nn.Module(); layer.compute_dtype = torch.bfloat16\n"
        "CPUKernels().pack_int4(layer, *quantize_int4_groups(torch.randn(64, 256), 128), 128)\n"
        "print(layer.weight_format, '|', quant_gemv.build_problem(), '|', CPUKernels().describe())\n"
    )
    env = {**os.environ, "TEXTGEN_CPU_QUANT_GEMV": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("int4_cpu | disabled by TEXTGEN_CPU_QUANT_GEMV=0 | cpu packed int4/int8 up to "
                                  "512 rows (GEMV kernel off: disabled by TEXTGEN_CPU_QUANT_GEMV=0)")

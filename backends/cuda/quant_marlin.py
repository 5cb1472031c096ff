"""int4 GPTQ / AWQ weights on the Marlin GEMM (IST-DASLab's kernel as maintained in vLLM), from the
`kernels` package's hub kernel `kernels-community/quantization` (the build TGI loads).

Why that package: `pip install kernels` is pure Python and fetches a prebuilt kernel matching the
installed torch and CUDA from the Hugging Face Hub (or its local cache) at first use; vLLM pins its
own torch build and gptqmodel compiles CUDA at install, neither fits next to textgen's torch.
The call (the kernel-builder `quantization` kernel's Python API; older builds, which TGI called
positionally, had a `has_zp` flag and no `c` / `global_scale`: keywords make such a mismatch fail
loudly instead of binding wrong arguments):
    gptq_marlin_gemm(a=[M, K], c=None, b_q_weight, b_scales=[G, N], global_scale=None, b_zeros,
                     g_idx, perm, workspace, b_q_type, size_m, size_n, size_k, is_k_full,
                     use_atomic_add, use_fp32_reduce, is_zp_float) -> [M, N]
with b_q_type `scalar_types.uint4` (W = (q - zero) * scale, integer zero points). `kernels` (0.17)
requires a kernel version: `HUB_KERNEL_VERSION`, not verified against the Hub from here.
Requirements: compute capability 8.0+, float16 / bfloat16 activations, K a multiple of 128 and N of
64, group size 32, 64, 128 or the whole row, zero points that are integers (GPTQ / AWQ checkpoints;
on-the-fly int4's min/max zeros are not).

Layout (Marlin's documented tensor-core tiling, the one `gptq_marlin_repack` writes): codes as
[K, N] are cut into 16x16 tiles laid out row of tiles by row of tiles ([K/16, N*16]), each 1024
values permuted by `WEIGHT_PERM` (the mma.m16n8k16 fragment order, nibbles interleaved
0 2 4 6 1 3 5 7) and packed 8 per int32, the i-th at bits 4i: [K/16, 2N]. Scales [G, N] are
permuted in blocks of 64 (`SCALE_PERM`, grouped) or 32 (`SCALE_PERM_SINGLE`, one group); zero points
like grouped scales, then interleaved 0 2 4 6 1 3 5 7 per 8 columns and packed 8 per int32: [G, N/8].
The repack is plain torch, so it runs (and is tested) on CPU.
"""
from __future__ import annotations

import functools
from importlib.util import find_spec
from types import ModuleType

import torch

HUB_KERNEL = "kernels-community/quantization"
HUB_KERNEL_VERSION = 1  # the kernel's major API version (kernels >= 0.17 requires one)
MIN_CAPABILITY = (8, 0)
TILE = 16
MIN_K, MIN_N = 128, 64
GROUP_SIZES = (32, 64, 128)  # or the whole row
INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)
ZERO_POINT_TOLERANCE = 1e-3  # (8 - z / s) within this of an integer is that integer


def _weight_perm() -> torch.Tensor:
    """The order of one 16x64 block's 1024 codes: thread i of a warp reads column i // 4 and rows
    2(i%4), 2(i%4)+1, 2(i%4+4), 2(i%4+4)+1 of two 8-column halves, for 4 tiles 256 apart."""
    order = []
    for thread in range(32):
        fragment = [16 * row + thread // 4 + 8 * half for half in (0, 1)
                    for row in (2 * (thread % 4), 2 * (thread % 4) + 1, 2 * (thread % 4 + 4), 2 * (thread % 4 + 4) + 1)]
        order.extend(value + 256 * tile for tile in range(4) for value in fragment)
    return torch.tensor(order).reshape(-1, 8)[:, list(INTERLEAVE)].reshape(-1)


WEIGHT_PERM = _weight_perm()
SCALE_PERM = torch.tensor([i + 8 * j for i in range(8) for j in range(8)])
SCALE_PERM_SINGLE = torch.tensor([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])


def package_reasons() -> list[str]:
    """Why the Marlin kernel cannot be loaded here (empty = it can be tried)."""
    if find_spec("kernels") is None:
        return ["the kernels package is not installed (pip install 'kernels>=0.17'; it fetches "
                f"{HUB_KERNEL} from the Hugging Face Hub)"]
    return []


def device_reasons(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return [f"the weight is on {device.type}, not on a CUDA device"]
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return [f"CUDA compute capability {major}.{minor} is below 8.0 (Marlin needs Ampere or later)"]
    return []


def shape_reasons(n: int, k: int, group_size: int, dtype: torch.dtype) -> list[str]:
    reasons = []
    if k % MIN_K or n % MIN_N:
        reasons.append(f"a {n}x{k} weight: Marlin needs the input size a multiple of {MIN_K} and the output "
                       f"size of {MIN_N}")
    if group_size not in GROUP_SIZES and group_size != k:
        reasons.append(f"group size {group_size} is not one of {GROUP_SIZES} or the whole row")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"compute dtype {dtype} is not float16 or bfloat16")
    return reasons


def integer_zero_points(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor | None:
    """Canonical float zeros z = (8 - zp) * s back to integer zp [N, G], None when they are not."""
    scales = scales.float()
    zp = torch.where(scales == 0, 8.0, 8 - zeros.float() / scales.masked_fill(scales == 0, 1))  # s = 0: any zp
    rounded = zp.round()
    if not bool(((zp - rounded).abs() <= ZERO_POINT_TOLERANCE).all()) or rounded.min() < 0 or rounded.max() > 15:
        return None
    return rounded.to(torch.int32)


def workspace_size(n: int, device: torch.device) -> int:
    """int32 lock slots the kernel's parallel reduction needs: 16 per 64 output columns (the
    original Marlin) and at least 4 per SM (newer builds size it by the SM count)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    return max(n // MIN_N * 16, 4 * sms)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] in 0..15 -> int32 [R, C / 8], column 8c + i at bits 4i of word c."""
    shifts = torch.arange(8, device=values.device, dtype=torch.int64) * 4
    words = (values.to(torch.int64).reshape(values.shape[0], -1, 8) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """`pack_columns` reversed: int32 [R, C] -> int64 [R, 8C] in 0..15."""
    shifts = torch.arange(8, device=words.device, dtype=torch.int64) * 4
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1)


def marlin_weight(codes: torch.Tensor) -> torch.Tensor:
    """Canonical codes uint8 [N, K] -> Marlin's int32 [K / 16, 2N] (see the module docstring)."""
    n, k = codes.shape
    tiles = codes.t().reshape(k // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(k // TILE, n * TILE)
    perm = WEIGHT_PERM.to(codes.device)
    permuted = tiles.reshape(-1, perm.numel())[:, perm].reshape(k // TILE, n * TILE)
    return pack_columns(permuted)


def marlin_scales(scales: torch.Tensor, single_group: bool) -> torch.Tensor:
    """scales [G, N] -> the same shape in Marlin's order."""
    perm = (SCALE_PERM_SINGLE if single_group else SCALE_PERM).to(scales.device)
    return scales.reshape(-1, perm.numel())[:, perm].reshape(scales.shape).contiguous()


def marlin_zero_points(zero_points: torch.Tensor) -> torch.Tensor:
    """Integer zero points [G, N] -> Marlin's int32 [G, N / 8]."""
    groups, n = zero_points.shape
    permuted = zero_points.reshape(-1, SCALE_PERM.numel())[:, SCALE_PERM.to(zero_points.device)]
    interleaved = permuted.reshape(-1, 8)[:, list(INTERLEAVE)].reshape(groups, n)
    return pack_columns(interleaved)


@functools.cache
def load_ops() -> ModuleType:
    """The hub kernel's module (downloaded or read from the Hub cache once per process)."""
    from kernels import get_kernel

    return get_kernel(HUB_KERNEL, version=HUB_KERNEL_VERSION)


def unmarlin_weight(qweight: torch.Tensor) -> torch.Tensor:
    """`marlin_weight` reversed: int32 [K / 16, 2N] -> codes [N, K] (the dequantize fallback)."""
    rows, n = qweight.shape[0], qweight.shape[1] // 2
    inverse = torch.argsort(WEIGHT_PERM).to(qweight.device)
    tiles = unpack_columns(qweight).reshape(-1, inverse.numel())[:, inverse].reshape(rows, n // TILE, TILE, TILE)
    return tiles.permute(0, 2, 1, 3).reshape(rows * TILE, n).t()


def unmarlin_scales(scales: torch.Tensor, single_group: bool) -> torch.Tensor:
    inverse = torch.argsort(SCALE_PERM_SINGLE if single_group else SCALE_PERM).to(scales.device)
    return scales.reshape(-1, inverse.numel())[:, inverse].reshape(scales.shape)


def unmarlin_zero_points(words: torch.Tensor) -> torch.Tensor:
    groups, n = words.shape[0], words.shape[1] * 8
    values = unpack_columns(words).reshape(-1, 8)[:, torch.argsort(torch.tensor(INTERLEAVE))]
    inverse = torch.argsort(SCALE_PERM).to(words.device)
    return values.reshape(-1, inverse.numel())[:, inverse].reshape(groups, n)

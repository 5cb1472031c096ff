"""The CPU backend's GEMM for unquantized linear layers and the LM head (`Backend.dense_linear`).

Up to `MAX_GEMV_ROWS` rows (decode steps of a few requests) a linear layer is a stream over its
weight; csrc/gemv.cpp streams it at memory speed where oneDNN's GEMV behind `F.linear` does not
(on a 2-core AMD EPYC, ~100M Llama, bf16: 21 ms of `aten::mm` in a 25 ms batch-1 step, ~9 GB/s of
~35 GB/s). Above it, or for a dtype the build has no vector path for, `F.linear` (oneDNN's
blocked GEMM) serves: the kernel holds every input row in registers per weight chunk, and from a
few rows on the GEMM's blocking wins. The crossover comes from `python benchmarks/gemv.py`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from textgen.backends.cpu import cpp_build

# Rows up to which the kernel runs (the op takes at most 8); measured by benchmarks/gemv.py
MAX_GEMV_ROWS = 4


@functools.cache
def build_problem() -> str | None:
    """None once the op is loaded (built if needed); else why it cannot be."""
    problem = cpp_build.build_problem("textgen_cpu_gemv", "gemv.cpp", "TEXTGEN_CPU_GEMV")
    if problem is None:
        _register_fake()
    return problem


def _register_fake() -> None:
    """Shapes for torch.compile's tracing (the CPU graph mode traces through linear layers)."""

    @torch.library.register_fake("textgen_cpu_gemv::small_m_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])


@functools.cache
def native_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes this build of the kernel has a vector path for (none where it cannot build)."""
    if build_problem() is not None:
        return ()
    native = torch.ops.textgen_cpu_gemv.native
    return tuple(d for d in (torch.bfloat16, torch.float32) if native(torch.empty(0, dtype=d)))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's contract; the kernel for few rows. Attached only to models of a dtype in
    `native_dtypes()` (the backend's `dense_linear`)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= MAX_GEMV_ROWS and x.dtype == weight.dtype and weight.is_contiguous():
        flat = x.reshape(rows, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = torch.ops.textgen_cpu_gemv.small_m_linear(flat, weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)

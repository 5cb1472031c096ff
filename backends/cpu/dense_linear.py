"""The CPU backend's GEMM for unquantized linear layers: oneDNN with weights prepacked once.

`F.linear` on a plain [N, K] weight makes oneDNN reorder the weight into its blocked layout on
every call, which at decode batch sizes costs as much as the multiplication. On this project's
2-core AMD EPYC (AVX512-BF16), ~100M Llama, CPU time of one thread per pass over every weight
(`python benchmarks/dense_linear.py --threads 1 --clock cpu`, load average 8): bf16 M=1 26.8 ms
plain vs 16.6 ms prepacked (1.61x), M=4 1.82x, M=64 82.4 vs 65.9 (1.25x); float32 M=1 1.01x,
M=4 2.00x, M=64 195.6 vs 135.4 (1.45x). A hand-written AVX512-BF16 GEMV streaming the plain
weight (tried first) was no faster than the prepacked inner product at M=1 and slower from M=4.
So after loading, each unquantized layer's weight is reordered once
(`mkldnn._reorder_linear_weight`, what inductor's freezing pass does for a compiled model) and
every call runs `mkldnn._linear_pointwise` on it: the same oneDNN inner product, without the
per-call reorder. bf16 results are bit-identical to F.linear; float32 ones differ in summation
order only.

The packed weight replaces the plain one as the layer's `weight` parameter (same `.shape` and
name, no second copy; its values read back through `.to_dense()`). Not packed: a weight
another module shares (an LM head tied to the embedding, which looks rows up in it), dtypes other
than float32/bfloat16, bfloat16 on a CPU oneDNN has no bf16 path for, CPU graph mode (dynamo does
not trace oneDNN's opaque tensors; inductor packs compiled graphs itself), and
TEXTGEN_CPU_ONEDNN_PACK=0.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.backend import DenseLinearKernel

# Rows oneDNN is told to expect when it picks the packed layout. Decode steps (1-64 rows) are
# where packing pays; measured, the hint moved no figure beyond the noise.
PACK_ROWS_HINT = 64
PACKABLE = (torch.float32, torch.bfloat16)


def packing_problem(dtype: torch.dtype) -> str | None:
    """None when weights of `dtype` can be prepacked here; else why not."""
    if os.environ.get("TEXTGEN_CPU_ONEDNN_PACK", "1") == "0":
        return "disabled by TEXTGEN_CPU_ONEDNN_PACK=0"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if dtype not in PACKABLE:
        return f"{dtype} weights are not prepacked (float32 and bfloat16 are)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 path on this CPU"
    return None


class OneDNNPackedLinear(DenseLinearKernel):
    name: ClassVar[str] = "oneDNN prepacked"

    def prepare(self, layer: nn.Module, shared: bool) -> None:
        weight = layer.weight
        if shared or weight.dim() != 2 or packing_problem(weight.dtype) is not None:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)
        layer.weight = nn.Parameter(packed, requires_grad=False)  # still a parameter: counts, names, bytes
        layer.onednn_packed = True

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not getattr(layer, "onednn_packed", False):
            return F.linear(x, layer.weight, bias)
        weight = layer.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0:
            return x.new_zeros(*x.shape[:-1], weight.shape[0])
        flat = x.reshape(rows, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])

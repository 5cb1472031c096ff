"""AcmeBackend: a complete Backend implementation that runs on the host CPU."""
from __future__ import annotations

import torch

from textgen.core.backend import Backend, DenseLinearKernel, MemoryInfo

ACME_MEMORY_BYTES = 1 << 30  # the emulated device has 1 GiB
DENSE_CALLS = [0]  # how often the model's unquantized linears went through AcmeLinear


class AcmeLinear(DenseLinearKernel):
    """The emulated device's GEMM: weights kept transposed ([K, N], its "native layout"), float32
    accumulation, one rounding to the activation dtype."""

    name = "acme gemm"

    def prepare(self, layer: torch.nn.Module, shared: bool) -> None:
        layer.acme_weight_t = layer.weight.detach().t().contiguous()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        DENSE_CALLS[0] += 1
        out = x.float() @ layer.acme_weight_t.float()
        return (out if bias is None else out + bias.float()).to(x.dtype)


class AcmeBackend(Backend):
    name = "acme"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(ACME_MEMORY_BYTES, ACME_MEMORY_BYTES)

    def distributed_backend(self) -> str:
        return "gloo"

    def dense_linear(self, dtype: torch.dtype) -> DenseLinearKernel:
        return AcmeLinear()

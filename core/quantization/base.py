"""The quantization contract: a method (one per model) that owns the weights of linear layers.

Two halves, so that one on-disk format runs on several devices:
- `Quantizer`: a weight *format* (GPTQ, AWQ, fp8, on-the-fly int4...). It registers the tensors a
  checkpoint holds on each linear layer, and after loading turns them into canonical quantized
  weights handed to the kernels (or keeps them as they are when it computes itself).
- `WeightKernels`: a backend's kernels for the canonical forms (int4 grouped with float zeros,
  int8 per output channel, fp8 e4m3 per output channel, dense). The backend offers them through
  `textgen_quantizers` (`QuantizerInfo.kernels`); the portable ones dequantize and call `F.linear`.

Per model, before any weight: the loader passes the checkpoint's (name, tensor) stream through
`rename_checkpoint_tensors`, for formats whose tensor names are not parameter names (bitsandbytes'
`weight.absmax`).
Per linear layer, in call order (core/layers/linear.py calls these):
1. `create_weights(layer, in_features, out_features, dtype)` registers the checkpoint's tensors,
   each a Parameter with `weight_loader` set by the layer (or by the quantizer), `output_dim` /
   `input_dim` naming the sharded axes, and `packed_dim` / `packed_factor` when several values
   share one stored element along an axis (the layer divides fused offsets by the factor).
2. the loader calls each parameter's `weight_loader(param, tensor, shard_id)`;
3. `process_after_loading(layer)` repacks into the kernel's layout (frees the loaded tensors);
4. `apply(layer, x, bias)`, every forward; the kernels pick their GEMM by the number of rows M.
MoE expert weights go through `moe_method()` (see `textgen.core.quantization.moe`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator

if TYPE_CHECKING:
    import torch

    from textgen.core.backend import Backend
    from textgen.core.quantization.moe import FusedMoEMethod


class QuantizationError(ValueError):
    """A quantization method cannot be chosen or loaded; the message says what to change."""


class WeightKernels(ABC):
    """A backend's kernels for canonical quantized weights. `pack_*` replace `layer.weight` by
    the kernel's own buffers; `apply` computes `x @ W.T + bias` from them."""

    name: ClassVar[str]

    @abstractmethod
    def pack_int4(self, layer: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> None:
        """codes uint8 [N, K] in 0..15; scales, zeros [N, K / group_size]; W = (codes - 8) * s + z."""

    @abstractmethod
    def pack_int8(self, layer: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """codes int8 [N, K]; scales [N]; W = codes * s."""

    @abstractmethod
    def pack_fp8(self, layer: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """codes float8_e4m3fn [N, K]; scales float32 [N] (equal rows for a per-tensor scale); W = codes * s."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output from the buffers a `pack_*` call left on it."""

    def describe(self) -> str:
        return self.name


class Quantizer(ABC):
    """A quantization method, registered by Hugging Face `quant_method` name (see
    `textgen.core.quantization.selection`); one instance serves every layer of one model."""

    name: ClassVar[str]
    quantizes_vocab: ClassVar[bool] = False  # the LM head (and a tied embedding) too: core/quantization/vocab.py

    def __init__(self, quant_config: dict[str, Any], kernels: WeightKernels) -> None:
        self.quant_config = quant_config
        self.kernels = kernels

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        """Reasons this method cannot run this config on `backend` (empty = fine)."""
        return []

    def rename_checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]
                                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors under the names of the parameters `create_weights` registers
        (default: unchanged); may drop tensors the format stores but the layers do not need."""
        return iter(weights)

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the checkpoint's parameters on `layer`."""

    def process_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack loaded weights for the kernel (default: nothing to do)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Return the layer's output for input x (default: the kernels' packed weights)."""
        return self.kernels.apply(layer, x, bias)

    def moe_method(self) -> FusedMoEMethod | None:
        """The method for stacked MoE expert weights; None when this format has none."""
        return None

    def describe(self) -> str:
        """One phrase for startup lines and /info, e.g. "gptq 4-bit group 128 (kernels: cpu)"."""
        return f"{self.name} (kernels: {self.kernels.describe()})"

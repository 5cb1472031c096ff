"""The Quantizer interface: a weight format (and its kernels) for linear layers."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class Quantizer(ABC):
    """A quantization method, registered by HF `quant_method` name through `textgen_quantizers`.

    Contract for vendors, in call order:
    1. `check(quant_config, dtype)` returns reasons the method cannot run here (empty = fine).
    2. `create_weights(layer, in_features, out_features, dtype)` registers the parameters the
       checkpoint holds for one linear layer (each with a `weight_loader` attribute).
    3. `process_after_loading(layer)` repacks the loaded tensors into the kernel's layout.
    4. `apply(layer, x, bias)` computes `x @ W.T (+ bias)` with the quantized weights.
    """

    name: ClassVar[str]

    def __init__(self, quant_config: dict[str, Any]) -> None:
        self.quant_config = quant_config

    @classmethod
    def check(cls, quant_config: dict[str, Any], dtype: torch.dtype) -> list[str]:
        return []

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the checkpoint's parameters on `layer`."""

    def process_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack loaded weights for the kernel (default: nothing to do)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Return the layer's output for input x."""

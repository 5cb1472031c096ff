"""Registries fed by backend hooks: attention kernels and quantizers, chosen by lazy class path."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

PORTABLE_KERNELS = "textgen.core.quantization.kernels:PortableKernels"


@dataclass(frozen=True, slots=True)
class AttentionBackendInfo:
    """One attention kernel a backend offers; the highest priority whose `check` passes wins."""

    name: str
    class_path: str  # "package.module:Class", imported only when chosen
    priority: int = 0


@dataclass(frozen=True, slots=True)
class QuantizerInfo:
    """A quantization method a backend runs, keyed by Hugging Face's `quant_method` name ("fp8",
    "gptq", "awq", "compressed-tensors", "bitsandbytes") or textgen's own ("int8", "int4").

    `class_path` names the `Quantizer` (the weight format); `kernels` the `WeightKernels` class
    that computes with the canonical weights it produces (the backend's own, or the portable
    dequantize + matmul ones)."""

    name: str
    class_path: str
    kernels: str = PORTABLE_KERNELS


# The portable paged-attention kernel, which any backend whose device runs plain torch can offer.
TORCH_PAGED = AttentionBackendInfo("torch_paged", "textgen.core.layers.paged_attention:TorchPagedAttention", 0)
# Its static-shape sibling, for devices that compile every shape (XLA, HPU, Neuron; see core.bucketing).
STATIC_PAGED = AttentionBackendInfo("static_paged", "textgen.core.layers.static_paged_attention:StaticPagedAttention", 5)


def load_class(class_path: str) -> Any:
    """Import "package.module:Name" (or "package.module.Name") and return the attribute."""
    module_name, sep, attr = class_path.partition(":")
    if not sep:
        module_name, _, attr = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)

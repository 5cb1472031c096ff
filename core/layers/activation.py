"""Activations by Hugging Face name, and gated activations for fused gate/up projections."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x = [gate | up] on the last axis -> silu(gate) * up (HF's act(gate_proj(x)) * up_proj(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


# Hugging Face activation names (ACT2FN) -> torch functions; only the exact equivalents
_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
}


def activation(name: str):
    """The torch function of a Hugging Face activation name; ValueError for others."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported natively "
                         f"(supported: {', '.join(sorted(_ACTIVATIONS))})") from None


class ActAndMul(nn.Module):
    """x = [gate | up] -> act(gate) * up for any supported HF activation name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.fn = name, activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.fn(gate) * up

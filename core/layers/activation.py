"""Gated activations for fused gate/up projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x = [gate | up] on the last axis -> silu(gate) * up (HF's act(gate_proj(x)) * up_proj(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

"""int32 token bitmasks (llguidance's layout) -> bool allowed masks, vectorised in torch.

Layout: bit `j % 32` of word `j // 32` of a row is token j; -1 (all bits set) allows everything.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _bit_values(device: torch.device) -> torch.Tensor:
    """1 << j as int32 for j < 32; bit 31 is the sign bit, hence the negative last value."""
    return torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [B, W] -> bool [B, vocab_size] (vocab_size <= 32 * W), on the bitmask's device."""
    bits = _bit_values(bitmask.device)
    return (bitmask.unsqueeze(-1) & bits).ne(0).view(bitmask.shape[0], -1)[:, :vocab_size]


def apply_token_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Sets disallowed logits to -inf in place; `allowed` is bool [B, V] on the logits' device."""
    return logits.masked_fill_(~allowed, float("-inf"))

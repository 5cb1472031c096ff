"""int32 token bitmasks (llguidance's layout) -> bool allowed masks.

Layout: bit `j % 32` of word `j // 32` of a row is token j; -1 (all bits set) allows everything.
On the CPU numpy's `unpackbits` does it (40x faster than the broadcast `&` at a 128k vocabulary:
about 1 ms instead of 33 ms for 32 rows); on an accelerator the packed mask is unpacked in torch
where it already is.
"""
from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=8)
def _bit_values(device: torch.device) -> torch.Tensor:
    """1 << j as int32 for j < 32; bit 31 is the sign bit, hence the negative last value."""
    return torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [B, W] -> bool [B, vocab_size] (vocab_size <= 32 * W), on the bitmask's device."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        # little-endian int32 words as bytes, bits least significant first: token order exactly
        bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab_size].view(np.bool_))
    bits = _bit_values(bitmask.device)
    return (bitmask.unsqueeze(-1) & bits).ne(0).view(bitmask.shape[0], -1)[:, :vocab_size]


def apply_token_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Sets disallowed logits to -inf in place; `allowed` is bool [B, V] on the logits' device."""
    return logits.masked_fill_(~allowed, float("-inf"))

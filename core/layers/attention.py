"""The Attention layer: owns an AttentionSpec and the chosen kernel instance."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from textgen.core.attention import AttentionSpec

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext


class Attention(nn.Module):
    """Paged attention for layer `layer_idx`: reads/writes `ctx.kv_caches[layer_idx]`.

    q [T, H*D], k/v [T, Hkv*D] (flat, as the projections give them) -> [T, H*D].
    """

    def __init__(self, spec: AttentionSpec, layer_idx: int, attention_cls: type) -> None:
        super().__init__()
        reasons = attention_cls.check(spec)
        if reasons:
            raise ValueError(f"attention kernel {attention_cls.name!r} cannot serve layer {layer_idx}: "
                             + "; ".join(reasons))
        self.spec, self.layer_idx = spec, layer_idx
        self.impl = attention_cls(spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        spec = self.spec
        q = q.view(-1, spec.num_heads, spec.head_size)
        k = k.view(-1, spec.num_kv_heads, spec.head_size)
        v = v.view(-1, spec.num_kv_heads, spec.head_size)
        return self.impl.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn)

"""The Attention layer: states its AttentionSpec, and runs the kernel the engine binds to it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from textgen.core.attention import AttentionSpec

if TYPE_CHECKING:
    from textgen.core.attention import AttentionBackend
    from textgen.core.forward_context import ForwardContext


class Attention(nn.Module):
    """Paged attention for layer `layer_idx`: reads/writes `ctx.kv_caches[layer_idx]`.

    Built with the layer's own facts (`spec`, block size and KV dtype unset); the engine
    negotiates the kernel over every layer's spec and calls `bind` before the first forward.
    q [T, H*D], k/v [T, Hkv*D] (flat, as the projections give them) -> [T, H*D].
    """

    def __init__(self, spec: AttentionSpec, layer_idx: int) -> None:
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.impl: AttentionBackend | None = None
        self._eager = False

    def bind(self, kernel_cls: type[AttentionBackend], spec: AttentionSpec) -> None:
        """Use `kernel_cls` with the completed `spec` (this layer's, with block size and KV dtype)."""
        self.spec = spec
        self.impl = kernel_cls(spec)

    def keep_kernel_eager(self) -> None:
        """Run the kernel outside any torch.compile region (a graph break around it): for graph
        rules that compile the rest of the step while the kernel's metadata varies per step."""
        self._eager = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.impl is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no kernel bound (the engine binds one at load)")
        spec = self.spec
        q = q.view(-1, spec.num_heads, spec.head_size)
        k = k.view(-1, spec.num_kv_heads, spec.head_size)
        v = v.view(-1, spec.num_kv_heads, spec.head_size)
        if self._eager:
            return _run_eager(self.impl, q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn)
        return self.impl.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn)


@torch.compiler.disable
def _run_eager(impl: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: object) -> torch.Tensor:
    return impl.forward(q, k, v, kv_cache, meta)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers in layer order (their `layer_idx`)."""
    layers = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_idx)
    if [m.layer_idx for m in layers] != list(range(len(layers))):
        raise ValueError("attention layer indices must be 0 .. N-1, each once")
    return layers

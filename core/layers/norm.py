"""RMSNorm exactly as Hugging Face's LlamaRMSNorm, with an optional fused residual add."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back before the
    weight multiply (HF's order, which matters in bf16)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `residual`, returns (norm(x + residual), x + residual): the pre-norm block's
        new residual stream and the normalised input of the next sub-layer."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole checkpoint tensor into a replicated parameter."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = (x / rms(x)) * (1 + weight), all in float32, cast back at the end
    (the checkpoint stores weight - 1; built as zeros, the identity, as transformers builds it)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__(hidden_size, eps, dtype)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.Module):
    """torch LayerNorm (optionally without bias) with the same fused residual add as RMSNorm."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class PerHeadLayerNorm(nn.Module):
    """LayerNorm without bias over each head of a flat [T, H*D] tensor, head h scaled by its own
    weight row `weight[h]` (StableLM's `norms.h.weight` one shard per head; Cohere's [H, D] whole)."""

    def __init__(self, num_heads: int, head_size: int, eps: float, dtype: torch.dtype, first_head: int = 0) -> None:
        """`first_head`: the global index of this rank's first head (tensor parallelism)."""
        super().__init__()
        self.head_size, self.eps, self.first_head = head_size, eps, first_head
        self.weight = nn.Parameter(torch.ones(num_heads, head_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load
        self.weight.required_shards = frozenset(range(first_head, first_head + num_heads))

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        num_heads = param.shape[0]
        if shard_id is None:  # all heads in one tensor: this rank's rows
            if loaded.dim() == 2 and loaded.shape[0] > num_heads:
                loaded = loaded.narrow(0, self.first_head, num_heads)
            default_weight_loader(param, loaded)
        elif 0 <= int(shard_id) - self.first_head < num_heads:  # another rank's head: not ours
            default_weight_loader(param.data[int(shard_id) - self.first_head], loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.view(x.shape[0], -1, self.head_size)
        return (torch.nn.functional.layer_norm(heads, (self.head_size,), eps=self.eps) * self.weight).view(x.shape)

"""StableLM (StableLM 2, StableLM-3B-4E1T, StableCode): Llama's gated SiLU MLP and attention with
LayerNorms (with bias), partial rotary (`partial_rotary_factor`, 0.25 by default), a q/k/v bias
with `use_qkv_bias`, optional per-head q/k LayerNorms (one weight per head, `qk_layernorm`) and
optionally the parallel residual x + attn(ln(x)) + mlp(ln(x)) (one norm, shared)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.norm import LayerNorm, PerHeadLayerNorm
from textgen.core.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from textgen.core.models.weights import LLAMA_STACKED, PatternShard, WeightMap

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class StableLmAttention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.q_layernorm = self.k_layernorm = None
        if getattr(cfg, "qk_layernorm", False):
            spec = self.attn.spec
            self.q_layernorm = PerHeadLayerNorm(spec.num_heads, self.head_size, cfg.layer_norm_eps, build.dtype,
                                            build.tp_rank * spec.num_heads)
            self.k_layernorm = PerHeadLayerNorm(spec.num_kv_heads, self.head_size, cfg.layer_norm_eps, build.dtype,
                                            build.tp_rank // self.qkv_proj.kv_replicas * spec.num_kv_heads)

    def biases(self, cfg: Any) -> tuple[bool, bool]:
        return bool(getattr(cfg, "use_qkv_bias", False)), False

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class StableLmDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.parallel = bool(getattr(cfg, "use_parallel_residual", False))
        self.self_attn = StableLmAttention(cfg, layer_idx, build, sliding_window)
        self.mlp = LlamaMLP(cfg, build)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, None]:
        normed = self.input_layernorm(hidden)
        attn = self.self_attn(normed, cos_sin, rotary, ctx)
        if self.parallel:
            return hidden + attn + self.mlp(normed), None
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), None


class StableLmModel(LlamaModel):
    layer_cls = StableLmDecoderLayer
    norm_cls = LayerNorm


class StableLmForCausalLM(LlamaForCausalLM):
    model_cls = StableLmModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers

    @property
    def weight_map(self) -> WeightMap:
        per_head = PatternShard(r"_layernorm\.norms\.(\d+)\.weight$", "_layernorm.weight", lambda m: int(m.group(1)))
        return WeightMap(stacked=LLAMA_STACKED, patterns=(per_head,),
                         tied_lm_head="lm_head." if self.tie_word_embeddings else None)

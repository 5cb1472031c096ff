"""Llama-family causal LMs (Llama, Mistral, Qwen2) in plain torch over the paged KV cache.

Parameter names follow Hugging Face's except for the fused projections (`qkv_proj` from
q/k/v_proj, `gate_up_proj` from gate/up_proj), which the shared `WeightMap` maps through each
parameter's own `weight_loader`.

The classes are also the base of the Llama-like families (Qwen3, Mixtral, Granite, ...): each
layer class names its sub-layer classes (`attention_cls`, `mlp_cls`, `layer_cls`, `model_cls`)
and the attention splits its math into `project` (q, k, v before rotary) and `spec_scale`, so a
family overrides only what differs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.activation import ActAndMul, SiluAndMul
from textgen.core.layers.attention import Attention
from textgen.core.layers.embedding import LMHead, VocabEmbedding
from textgen.core.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from textgen.core.layers.norm import RMSNorm
from textgen.core.layers.rotary import RotaryEmbedding, get_rope
from textgen.core.model import Model
from textgen.core.models.weights import WeightMap, load_weights

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


def head_size_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "layer_norm_epsilon")


def norm_eps(cfg: Any) -> float:
    """The config's norm epsilon, under whichever name the family gives it."""
    return next(getattr(cfg, f) for f in _EPS_FIELDS if getattr(cfg, f, None) is not None)


def layer_sliding_windows(cfg: Any) -> list[int | None]:
    """Per-layer sliding window, as each HF architecture applies it.

    Mistral: `sliding_window` for every layer. Qwen2: only with `use_sliding_window`, on the
    layers `layer_types` marks "sliding_attention" (by default those >= `max_window_layers`).
    Llama: none.
    """
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "model_type", "") == "llama" or window is None:
        return [None] * n
    if getattr(cfg, "model_type", "") != "qwen2":
        return [window] * n
    if not getattr(cfg, "use_sliding_window", False):
        return [None] * n
    return typed_sliding_windows(cfg)


def typed_sliding_windows(cfg: Any) -> list[int | None]:
    """`sliding_window` on the layers `layer_types` marks "sliding_attention" (transformers 5
    configs derive `layer_types` from their own rule when the checkpoint lacks it)."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None) or [
        "sliding_attention" if i >= cfg.max_window_layers else "full_attention" for i in range(n)]
    return [window if t == "sliding_attention" else None for t in types]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        head_size, tp = head_size_of(cfg), build.tp_size
        self.head_size = head_size
        num_heads, num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv_bias, attention_bias = self.biases(cfg)
        self.qkv_proj = QKVLinear(cfg.hidden_size, head_size, num_heads, num_kv_heads, qkv_bias, build.dtype,
                                  build.quantizer, build.tp_rank, tp)
        self.o_proj = RowLinear(num_heads * head_size, cfg.hidden_size, attention_bias, build.dtype,
                                build.quantizer, build.tp_rank, tp)
        local_heads, local_kv = num_heads // tp, max(1, num_kv_heads // tp)
        self.sizes = [local_heads * head_size, local_kv * head_size, local_kv * head_size]
        spec = AttentionSpec(local_heads, local_kv, head_size, build.dtype, scale=self.spec_scale(cfg, head_size),
                             sliding_window=sliding_window, logits_soft_cap=self.spec_soft_cap(cfg))
        self.attn = Attention(spec, layer_idx)

    def biases(self, cfg: Any) -> tuple[bool, bool]:
        """(q/k/v projections have a bias, o_proj has one)."""
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = getattr(cfg, "qkv_bias", None)  # Qwen2-MoE names it; Qwen2 always has one
        if qkv_bias is None:
            qkv_bias = attention_bias or getattr(cfg, "model_type", "") == "qwen2"
        return bool(qkv_bias), attention_bias

    def spec_scale(self, cfg: Any, head_size: int) -> float:
        return head_size ** -0.5

    def spec_soft_cap(self, cfg: Any) -> float | None:
        return None

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H*D], k and v [T, Hkv*D] before rotary."""
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        return q, k, v

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project(hidden)
        q, k = rotary(q, k, *cos_sin)
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused; the activation is the config's
    `hidden_act` (`activation_key` names another field, e.g. Gemma 2's "hidden_activation")."""

    activation_key = "hidden_act"

    def __init__(self, cfg: Any, build: ModelBuildContext, intermediate_size: int | None = None) -> None:
        super().__init__()
        act = getattr(cfg, self.activation_key, None) or "silu"
        bias = bool(getattr(cfg, "mlp_bias", False))
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [size, size], bias, build.dtype,
                                               build.quantizer, build.tp_rank, build.tp_size)
        self.down_proj = RowLinear(size, cfg.hidden_size, bias, build.dtype, build.quantizer,
                                   build.tp_rank, build.tp_size)
        self.act_fn = SiluAndMul() if act == "silu" else ActAndMul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = LlamaAttention
    mlp_cls: type[nn.Module] = LlamaMLP
    norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx, build, sliding_window)
        self.mlp = self.make_mlp(cfg, layer_idx, build)
        self.input_layernorm = self.norm_cls(cfg.hidden_size, norm_eps(cfg), build.dtype)
        self.post_attention_layernorm = self.norm_cls(cfg.hidden_size, norm_eps(cfg), build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block; returns (sub-layer output, residual stream) with the add deferred to
        the next norm (fused add + norm)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, rotary, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def make_mlp(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> nn.Module:
        return self.mlp_cls(cfg, build)


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer
    norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, cfg: Any, build: ModelBuildContext, windows: list[int | None]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype, build.tp_rank, build.tp_size)
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, build, windows[i]) for i in range(cfg.num_hidden_layers))
        self.norm = self.make_norm(cfg, build)
        self.rotary_emb = get_rope(cfg, head_size_of(cfg))

    def make_norm(self, cfg: Any, build: ModelBuildContext) -> nn.Module:
        return self.norm_cls(cfg.hidden_size, norm_eps(cfg), build.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos_sin, self.rotary_emb, ctx)
        # layers that add their residual themselves (StableLM, ...) return residual None
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class LlamaForCausalLM(Model):
    """LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM."""

    model_cls: type[nn.Module] = LlamaModel

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.config = hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.model = self.model_cls(hf_config, build, self.sliding_windows(hf_config))
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, build.dtype, tied_to=tied,
                              tp_rank=build.tp_rank, tp_size=build.tp_size)

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return layer_sliding_windows(cfg)

    @property
    def weight_map(self) -> WeightMap:
        return WeightMap(tied_lm_head="lm_head." if self.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Returns the parameters filled completely (a fused one only once all its parts came).
        Raises ValueError for checkpoint tensors that match no parameter."""
        return load_weights(self, weights, self.weight_map)

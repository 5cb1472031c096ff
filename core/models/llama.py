"""Llama-family causal LMs (Llama, Mistral, Qwen2) in plain torch over the paged KV cache.

Parameter names follow Hugging Face's except for the fused projections (`qkv_proj` from
q/k/v_proj, `gate_up_proj` from gate/up_proj), which `load_weights` maps through each
parameter's own `weight_loader`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.activation import SiluAndMul
from textgen.core.layers.attention import Attention
from textgen.core.layers.embedding import LMHead, VocabEmbedding
from textgen.core.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from textgen.core.layers.norm import RMSNorm
from textgen.core.layers.rotary import RotaryEmbedding, get_rope
from textgen.core.model import Model

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext

# (fused parameter part, checkpoint part, shard id)
_STACKED = (
    (".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1),
)
_FUSED_SHARDS = {".qkv_proj.": {"q", "k", "v"}, ".gate_up_proj.": {0, 1}}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def head_size_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


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
    types = getattr(cfg, "layer_types", None) or [
        "sliding_attention" if i >= cfg.max_window_layers else "full_attention" for i in range(n)]
    return [window if t == "sliding_attention" else None for t in types]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        head_size, tp = head_size_of(cfg), build.tp_size
        num_heads, num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = attention_bias or getattr(cfg, "model_type", "") == "qwen2"
        self.qkv_proj = QKVLinear(cfg.hidden_size, head_size, num_heads, num_kv_heads, qkv_bias, build.dtype,
                                  build.quantizer, build.tp_rank, tp)
        self.o_proj = RowLinear(num_heads * head_size, cfg.hidden_size, attention_bias, build.dtype,
                                build.quantizer, build.tp_rank, tp)
        local_heads, local_kv = num_heads // tp, max(1, num_kv_heads // tp)
        self.sizes = [local_heads * head_size, local_kv * head_size, local_kv * head_size]
        spec = AttentionSpec(local_heads, local_kv, head_size, build.dtype, scale=head_size ** -0.5,
                             sliding_window=sliding_window)
        self.attn = Attention(spec, layer_idx)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q, k = rotary(q, k, *cos_sin)
        return self.o_proj(self.attn(q, k, v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported by the native Llama model (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [size, size], bias, build.dtype,
                                               build.quantizer, build.tp_rank, build.tp_size)
        self.down_proj = RowLinear(size, cfg.hidden_size, bias, build.dtype, build.quantizer,
                                   build.tp_rank, build.tp_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, build, sliding_window)
        self.mlp = LlamaMLP(cfg, build)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype)

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


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype)
        windows = layer_sliding_windows(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, build, windows[i]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype)
        self.rotary_emb = get_rope(cfg, head_size_of(cfg))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos_sin, self.rotary_emb, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(Model):
    """LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM."""

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.config = hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.model = LlamaModel(hf_config, build)
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, build.dtype, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Returns the parameters filled completely (a fused one only once all its parts came).
        Raises ValueError for checkpoint tensors that match no parameter."""
        params = dict(self.named_parameters())
        shards: dict[str, set[object]] = {}
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            target, shard_id = _map_name(name)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            param.weight_loader(param, tensor, shard_id)
            shards.setdefault(target, set()).add(shard_id)
        if unexpected:
            raise ValueError(f"checkpoint tensors match no parameter of {type(self).__name__}: "
                             f"{', '.join(sorted(unexpected)[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        return {name for name, got in shards.items() if _complete(name, got)}


def _map_name(name: str) -> tuple[str, object]:
    for fused, part, shard_id in _STACKED:
        if part in name:
            return name.replace(part, fused), shard_id
    return name, None


def _complete(name: str, got: set[object]) -> bool:
    if None in got:
        return True
    return next((got >= need for fused, need in _FUSED_SHARDS.items() if fused in name), False)

"""Rotary position embedding (NeoX / HF-Llama "rotate_half" style, or GPT-J's interleaved pairs)
with HF's scaling types.

Inverse frequencies follow transformers' `modeling_rope_utils` exactly (float32 throughout):
default, linear, llama3, yarn and longrope. "dynamic" NTK is refused: its frequencies depend on the
longest sequence of the batch, which a continuous-batching server cannot reproduce per request.
longrope (Phi-3 128k) is applied per position: `short_factor` below
`original_max_position_embeddings`, `long_factor` from there on. transformers switches every
position of a forward to the long factors once the sequence passes that length; the two agree up
to it (what the parity test covers) and differ beyond (vLLM's and TGI's per-position rule).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope dict of a config in either format: transformers 5 `rope_parameters` (rope_theta
    inside) or v4 top-level `rope_theta` + `rope_scaling` (where "type" may stand for "rope_type")."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    if params["rope_type"] == "su":  # Phi-3's old name
        params["rope_type"] = "longrope"
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        original = getattr(hf_config, "original_max_position_embeddings", None)  # Phi-3 keeps it outside
        params.setdefault("original_max_position_embeddings", original or hf_config.max_position_embeddings)
    return params


def inv_freq_and_scaling(params: dict[str, Any], rotary_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], factor applied to cos and sin)."""
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, rotary_dim) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(params, base, rotary_dim), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, base, rotary_dim, max_position)
    if rope_type == "longrope":
        raise ValueError("longrope has two sets of frequencies: use longrope_inv_freqs")
    raise ValueError(f"rope type {rope_type!r} is not supported natively (supported: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)})")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(params: dict[str, Any], base: float, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(params: dict[str, Any], base: float, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def longrope_inv_freqs(params: dict[str, Any], rotary_dim: int, max_position: int
                       ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(short inverse frequencies, long ones, factor applied to cos and sin), as transformers'
    `_compute_longrope_parameters`."""
    base, original = float(params["rope_theta"]), params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim

    def inv(factors: list[float]) -> torch.Tensor:
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** shape)

    return inv(params["short_factor"]), inv(params["long_factor"]), attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin cache [max_position, rotary_dim / 2] in float32; applied to the first
    `rotary_dim` features of each head of flat [T, H*D] tensors, by position.

    Positions must be < max_position (the config's max_position_embeddings).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, params: dict[str, Any],
                 interleaved: bool = False) -> None:
        super().__init__()
        self.head_size, self.rotary_dim, self.interleaved = head_size, rotary_dim, interleaved
        positions = torch.arange(max_position, dtype=torch.float32)[:, None]
        if params["rope_type"] == "longrope":
            short, long, scaling = longrope_inv_freqs(params, rotary_dim, max_position)
            inv_freq = torch.where(positions < params["original_max_position_embeddings"], short, long)
        else:
            inv_freq, scaling = inv_freq_and_scaling(params, rotary_dim, max_position)
            inv_freq = inv_freq[None, :].float()
        freqs = positions * inv_freq
        self.register_buffer("cos_cache", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary_dim / 2] for the step's positions, computed once per step."""
        cos = self.cos_cache.index_select(0, positions).to(dtype)[:, None, :]
        sin = self.sin_cache.index_select(0, positions).to(dtype)[:, None, :]
        return cos, sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_to(q, cos, sin), self.apply_to(k, cos, sin)

    def apply_to(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H*D] -> rotated copy. With x = [x1 | x2] halves of the rotary part:
        [x1*cos - x2*sin | x2*cos + x1*sin], bit-identical to HF's x*cos + rotate_half(x)*sin."""
        shape = x.shape
        x = x.view(shape[0], -1, self.head_size)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.interleaved:  # GPT-J / Cohere: pairs (x[2i], x[2i+1]) rotate together
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if rest.shape[-1]:
            rotated = torch.cat((rotated, rest), dim=-1)
        return rotated.reshape(shape)


def get_rope(hf_config: Any, head_size: int, interleaved: bool = False) -> RotaryEmbedding:
    params = rope_parameters(hf_config)
    rotary_dim = int(head_size * params.get("partial_rotary_factor", 1.0))
    return RotaryEmbedding(head_size, rotary_dim, int(hf_config.max_position_embeddings), params, interleaved)

"""Phi-3: Llama math with q/k/v and gate/up already fused in the checkpoint (`qkv_proj`,
`gate_up_proj`, loaded whole into the fused layers), optional partial rotary
(`partial_rotary_factor` in the rope parameters) and `sliding_window` on every layer.
"longrope" scaling (Phi-3 128k) is applied per position by the rotary layer (see rotary.py)."""
from __future__ import annotations

from typing import Any

from textgen.core.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers

"""Hugging Face architecture name -> native model class (lazy "module:Class" paths)."""
from __future__ import annotations

from typing import Any

from textgen.core.registry import load_class

_LLAMA = "textgen.core.models.llama:LlamaForCausalLM"

_M = "textgen.core.models."

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _M + "qwen3:Qwen3ForCausalLM",
    "GemmaForCausalLM": _M + "gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": _M + "gemma:Gemma2ForCausalLM",
    "GPTNeoXForCausalLM": _M + "gpt_neox:GPTNeoXForCausalLM",
    "StableLmForCausalLM": _M + "stablelm:StableLmForCausalLM",
    "Starcoder2ForCausalLM": _M + "starcoder2:Starcoder2ForCausalLM",
    "GraniteForCausalLM": _M + "granite:GraniteForCausalLM",
    "Olmo2ForCausalLM": _M + "olmo2:Olmo2ForCausalLM",
    "PhiForCausalLM": _M + "phi:PhiForCausalLM",
    "CohereForCausalLM": _M + "cohere:CohereForCausalLM",
    "GPT2LMHeadModel": _M + "gpt2:GPT2LMHeadModel",
    "GPTBigCodeForCausalLM": _M + "gpt2:GPT2LMHeadModel",
    "BloomForCausalLM": _M + "bloom:BloomForCausalLM",
    "FalconForCausalLM": _M + "falcon:FalconForCausalLM",
    "Gemma3ForCausalLM": _M + "gemma:Gemma3ForCausalLM",
    "Phi3ForCausalLM": _M + "phi3:Phi3ForCausalLM",
    "MixtralForCausalLM": _M + "mixtral:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": _M + "mixtral:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": _M + "mixtral:Qwen3MoeForCausalLM",
}


def resolve_model_class(hf_config: Any, extra: dict[str, str] | None = None) -> type:
    """The class for the first of `hf_config.architectures` that is known; plugin entries in
    `extra` override the built-in ones. Raises ValueError naming what is unsupported."""
    known = {**ARCHITECTURES, **(extra or {})}
    requested = list(getattr(hf_config, "architectures", None) or [])
    for arch in requested:
        if arch in known:
            return load_class(known[arch])
    shown = ", ".join(requested) if requested else "none listed in config.json"
    raise ValueError(f"model architecture not supported: {shown}. Supported architectures: "
                     f"{', '.join(sorted(known))}")

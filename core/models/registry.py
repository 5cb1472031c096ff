"""Hugging Face architecture name -> native model class (lazy "module:Class" paths)."""
from __future__ import annotations

import os
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


MODEL_IMPL_ENV = "TEXTGEN_MODEL_IMPL"  # "auto" (default), "native" or "transformers"
FALLBACK = "textgen.core.models.transformers_fallback:TransformersCausalLM"


def resolve_model_class(hf_config: Any, extra: dict[str, str] | None = None, model_impl: str | None = None) -> type:
    """The class for the first of `hf_config.architectures` that is known natively (plugin entries
    in `extra` override the built-in ones), else the transformers fallback when transformers'
    class accepts custom attention functions. `model_impl` (default: env `TEXTGEN_MODEL_IMPL`,
    else "auto") forces "native" or "transformers". Raises ValueError naming what is unsupported
    and why."""
    impl = (model_impl or os.environ.get(MODEL_IMPL_ENV) or "auto").lower()
    if impl not in ("auto", "native", "transformers"):
        raise ValueError(f"{MODEL_IMPL_ENV}={impl!r}: use auto, native or transformers")
    known = {**ARCHITECTURES, **(extra or {})}
    requested = list(getattr(hf_config, "architectures", None) or [])
    if impl != "transformers":
        for arch in requested:
            if arch in known:
                return load_class(known[arch])
    if impl == "native":
        raise ValueError(unsupported_message(requested, "no native module", known))
    from textgen.core.models.transformers_fallback import transformers_class

    cls, reason = transformers_class(hf_config)
    if cls is None:
        raise ValueError(unsupported_message(requested, f"no native module, and {reason}", known))
    return load_class(FALLBACK)


def model_path_name(model_cls: type) -> str:
    """"native" or "transformers fallback", for the startup line."""
    return "transformers fallback" if model_cls.__name__ == "TransformersCausalLM" else "native"


def unsupported_message(requested: list[str], reason: str, known: dict[str, str] | None = None) -> str:
    shown = ", ".join(requested) if requested else "none listed in config.json"
    return (f"model architecture not supported: {shown} ({reason}). Supported: the native architectures "
            f"{', '.join(sorted(known or ARCHITECTURES))}; any other transformers causal LM whose class accepts "
            "custom attention functions runs through the transformers fallback")

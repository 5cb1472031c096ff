"""Tiny PEFT LoRA adapters for the tests, made with `peft` itself on a tiny base model.

`make_lora_adapter` wraps the base model with `get_peft_model` with random (non-zero) A and B
(`init_lora_weights=False`: PEFT's default B = 0 would make an adapter indistinguishable from
the base model) and saves it with `save_pretrained`: adapter_config.json + adapter_model.safetensors.
`peft_reference` loads it back the way a user would (unmerged PeftModel, or merged).
"""
from __future__ import annotations

import os
from pathlib import Path

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(base: str | os.PathLike, out: str | os.PathLike, rank: int, alpha: float,
                      targets: tuple[str, ...] = ALL_LINEARS, use_rslora: bool = False, seed: int = 0) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(str(out))
    return str(Path(out))


def peft_reference(base: str | os.PathLike, adapter: str | os.PathLike | None, merged: bool = False):
    """transformers' model with the adapter applied by peft (None: the base model), in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
        if merged:
            model = model.merge_and_unload()
    return model.eval()

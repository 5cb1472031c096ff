"""Multi-LoRA serving: PEFT adapters on disk (`adapter`), batched LoRA on the model's linear
layers (`layers`), and which adapters are registered and resident (`manager`)."""
from textgen.core.lora.adapter import AdapterSource, AdapterSpec, LoraError, lora_reasons, parse_adapter_list

# `manager` and `layers` import torch: import them from their modules (the API layer does not)
__all__ = ["AdapterSource", "AdapterSpec", "LoraError", "lora_reasons", "parse_adapter_list"]

"""Multi-LoRA serving: PEFT adapters on disk (`adapter`), batched LoRA on the model's linear
layers (`layers`), and which adapters are registered and resident (`manager`)."""
from textgen.core.lora.adapter import AdapterSource, AdapterSpec, LoraError, parse_adapter_list
from textgen.core.lora.manager import LoraManager

__all__ = ["AdapterSource", "AdapterSpec", "LoraError", "LoraManager", "parse_adapter_list"]

"""Tiny random-weight models in the real Hugging Face format, built by the tests themselves.

`make_tiny_model(path, arch)` writes config.json, model.safetensors (via transformers'
save_pretrained), tokenizer.json, tokenizer_config.json and a chat template, so every loader path
(textgen's and transformers') reads the same files. Weights are seeded and therefore identical
across runs.
"""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tokenizer(out: str | os.PathLike, vocab_size: int = 1000) -> None:
    """Byte-level BPE trained on 60 stdlib files, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE,
    ).save_pretrained(str(out))


def _config(arch: str, vocab: int, **overrides: object):
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls, common = transformers.MistralConfig, {**common, "sliding_window": 32}
    elif arch == "qwen2":
        cls, common = transformers.Qwen2Config, {**common, "tie_word_embeddings": True}
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    common.update(overrides)
    return cls(**common)


def make_tiny_model(out: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Write a tiny random `arch` model (llama | mistral | qwen2) with its tokenizer to `out`."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    config = _config(arch, 1000, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    return out

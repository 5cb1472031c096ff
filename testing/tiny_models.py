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


# arch -> (transformers config class, its overrides of COMMON). Families past the first three get
# 1-D parameters (norm weights, biases) drawn at random too (`_randomise_vectors`): transformers
# initialises them to constants that would hide a missing bias or a wrong norm offset.
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
)
_LAYER_PAIR = ["sliding_attention", "full_attention"]
_MOE = dict(num_local_experts=4, num_experts_per_tok=2, initializer_range=0.1)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 32}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": True, "sliding_window": 8,
                              "layer_types": _LAYER_PAIR}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
                                "query_pre_attn_scalar": 24, "attn_logit_softcapping": 1.0,
                                "final_logit_softcapping": 2.0, "initializer_range": 0.2}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
                                    "query_pre_attn_scalar": 24, "layer_types": _LAYER_PAIR, "initializer_range": 0.2,
                                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 10000.0},
                                                        "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 100.0}}}),
    "phi3": ("Phi3Config", {}),
    "mixtral": ("MixtralConfig", {**_MOE, "sliding_window": 8}),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None, "rotary_pct": 0.5, "initializer_range": 0.2}),
    "stablelm": ("StableLmConfig", {"use_qkv_bias": True, "qk_layernorm": True}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": 8}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "attention_multiplier": 0.5,
                                  "residual_multiplier": 0.6, "logits_scaling": 0.7, "attention_bias": True,
                                  "initializer_range": 0.1}),
    "olmo2": ("Olmo2Config", {}),
    "phi": ("PhiConfig", {"qk_layernorm": True}),
    "cohere": ("CohereConfig", {"use_qk_norm": True, "logit_scale": 0.5, "tie_word_embeddings": True}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024,
                            "scale_attn_by_inverse_layer_idx": True, "tie_word_embeddings": True,
                            "initializer_range": 0.2}),
    "gpt_bigcode": ("GPTBigCodeConfig", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024,
                                         "multi_query": True, "tie_word_embeddings": True}),
    "bloom": ("BloomConfig", {"n_layer": 2, "n_head": 4, "tie_word_embeddings": True, "initializer_range": 0.2}),
    "falcon": ("FalconConfig", {"initializer_range": 0.2}),  # Falcon-7B: multi-query, parallel attention
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
                                     "mlp_only_layers": [1], "initializer_range": 0.1}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True,
                                     "initializer_range": 0.1}),
    # no native module: served through the transformers fallback
    "olmo": ("OlmoConfig", {"clip_qkv": 2.0}),
    "helium": ("HeliumConfig", {"head_dim": 16}),
    "glm": ("GlmConfig", {"head_dim": 16, "partial_rotary_factor": 0.5}),
    "exaone4": ("Exaone4Config", {"sliding_window": 8, "layer_types": _LAYER_PAIR}),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0], "layer_types": ["full_attention"] * 2}),
}
_ORIGINAL = ("llama", "mistral", "qwen2")


def _config(arch: str, vocab: int, **overrides: object):
    import transformers

    if arch not in FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r} (known: {', '.join(FAMILIES)})")
    cls_name, own = FAMILIES[arch]
    return getattr(transformers, cls_name)(**{"vocab_size": vocab, **COMMON, **own, **overrides})


def _randomise_vectors(model, seed: int) -> None:
    """Every 1-D parameter (norm weights and biases) += N(0, 0.2^2), seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def make_tiny_model(out: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Write a tiny random `arch` model (a key of FAMILIES) with its tokenizer to `out`."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    config = _config(arch, 1000, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch not in _ORIGINAL:
        _randomise_vectors(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_t5_tokenizer(out: str | os.PathLike, vocab_size: int = 500) -> None:
    """A unigram (sentencepiece-style) tokenizer trained on 6 stdlib files, saved as transformers'
    T5 tokenizer: ids 0, 1, 2 = <pad>, </s>, <unk> as in T5; </s> appended to every encoding.
    (Unigram training is far slower than BPE's: a few files keep it to seconds.)"""
    from tokenizers import SentencePieceUnigramTokenizer, processors
    from transformers import T5Tokenizer

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:6]
    tok = SentencePieceUnigramTokenizer()
    tok.train(files, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
              show_progress=False)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5Tokenizer(tokenizer_object=tok._tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                extra_ids=0).save_pretrained(str(out))


def make_tiny_t5(out: str | os.PathLike, seed: int = 0, **overrides: object) -> Path:
    """A tiny random Flan-T5-shaped T5ForConditionalGeneration (gated-gelu, untied head) with its
    tokenizer; 1-D parameters (the layer norms) randomised as for the causal families. With
    initializer_factor 1 the random model only ever predicts <pad>; 5 gives varied tokens."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_t5_tokenizer(out)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(out)))
    config = transformers.T5Config(**{
        "vocab_size": vocab, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "initializer_factor": 5.0, **overrides})
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    _randomise_vectors(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    return out

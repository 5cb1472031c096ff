"""`--quantize int8` also stores the LM head in int8, and a tied embedding reads the same codes:
the float vocabulary matrix is gone, and the model equals its dequantized float copy."""
from __future__ import annotations

import torch

from tests.quantization.helpers import copy_dequantized, greedy, load_quantized, prefill_logits
from textgen.core.layers.embedding import LMHead, VocabEmbedding

PROMPT = [5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11, 600, 13, 14]


def test_int8_lm_head_and_tied_embedding(tiny_model_factory):
    path = tiny_model_factory("llama", tie_word_embeddings=True)
    plain, quantized = load_quantized(path), load_quantized(path, "int8")
    head = next(m for m in quantized.model.modules() if isinstance(m, LMHead))
    embedding = next(m for m in quantized.model.modules() if isinstance(m, VocabEmbedding))
    assert head.int8_codes.dtype == torch.int8 and "weight" not in dict(head.named_parameters())
    assert embedding.int8_codes.data_ptr() == head.int8_codes.data_ptr()  # stored once
    vocab_sized = [t for t in (*quantized.model.parameters(), *quantized.model.buffers())
                   if t.numel() == head.int8_codes.numel()]
    assert vocab_sized and all(t.dtype == torch.int8 for t in vocab_sized)  # no float vocabulary matrix left
    assert quantized.weight_bytes < 0.35 * plain.weight_bytes  # float32 -> int8 codes (+ row scales, norms)
    expected = prefill_logits(plain.model, PROMPT)
    got = prefill_logits(quantized.model, PROMPT)
    assert 0 < (got - expected).abs().max() < 0.03 * expected.abs().max()
    dequantized = load_quantized(path).model
    copy_dequantized(quantized.model, dequantized)
    assert (got - prefill_logits(dequantized, PROMPT)).abs().max() < 1e-4
    assert greedy(quantized.model, PROMPT, 6) == greedy(dequantized, PROMPT, 6)
    assert "LM head int8" in quantized.quantization


def test_int4_stores_the_vocabulary_in_int8(tiny_model_factory):
    """`--quantize int4` keeps the LM head and the tied embedding in int8 (int4 linear layers):
    the model equals its dequantized float copy."""
    path = tiny_model_factory("llama", tie_word_embeddings=True)
    quantized = load_quantized(path, "int4")
    head = next(m for m in quantized.model.modules() if isinstance(m, LMHead))
    embedding = next(m for m in quantized.model.modules() if isinstance(m, VocabEmbedding))
    assert head.int8_codes.dtype == torch.int8 and embedding.int8_codes.data_ptr() == head.int8_codes.data_ptr()
    dequantized = load_quantized(path).model
    copy_dequantized(quantized.model, dequantized)
    got = prefill_logits(quantized.model, PROMPT)
    assert (got - prefill_logits(dequantized, PROMPT)).abs().max() < 1e-4
    assert greedy(quantized.model, PROMPT, 6) == greedy(dequantized, PROMPT, 6)
    assert "LM head int8" in quantized.quantization

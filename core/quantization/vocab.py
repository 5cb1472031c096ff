"""int8 LM head, and the embedding it is tied to, for methods whose `quantizes_vocab` says so.

Once the linear layers are int8, the vocabulary matrix is most of what a small model's weights
still weigh (the ~100M benchmark Llama: a tied 8k x 768 embedding). Per vocabulary row:
symmetric int8 codes and one scale, the int8 linear layers' format, handed to the method's
kernels (`pack_int8`, `apply`: on CPU the packed int8 GEMM up to 512 rows). A tied embedding
reads the same codes (row lookup, then times its scale), so the matrix is stored once, in int8.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from textgen.core.layers.embedding import LMHead, VocabEmbedding
from textgen.core.quantization.kernels import quantize_int8_channels

if TYPE_CHECKING:
    from textgen.core.quantization.base import WeightKernels


def quantize_vocab_int8(model: nn.Module, kernels: WeightKernels) -> None:
    """Every `LMHead` of `model` (and a `VocabEmbedding` sharing its weight) to int8 rows."""
    for head in [m for m in model.modules() if isinstance(m, LMHead)]:
        weight = head.weight
        tied = [m for m in model.modules() if isinstance(m, VocabEmbedding) and m.weight is weight]
        codes, scales = quantize_int8_channels(weight.data)
        head.compute_dtype = weight.dtype
        kernels.pack_int8(head, codes, scales)
        head.kernels = kernels
        for embedding in tied:
            del embedding._parameters["weight"]
            embedding.register_buffer("int8_codes", head.int8_codes, persistent=False)
            embedding.register_buffer("int8_scales", head.int8_scales, persistent=False)
            embedding.compute_dtype = weight.dtype

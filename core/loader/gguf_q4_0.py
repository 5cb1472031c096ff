"""Q4_0 GGUF projections kept 4-bit: handed to textgen's `gptq` method as GPTQ tensors.

A Q4_0 block is 32 weights of one row: an fp16 scale d, then 16 bytes whose low nibbles are
weights 0..15 and high nibbles weights 16..31, each w = (q - 8) * d. That is exactly GPTQ's
symmetric 4-bit form with group size 32 (zero 8, stored by v1 checkpoints as 7) and fp16 scales,
so the gptq method packs it for the int4 kernel with no rounding beyond the scale's cast to the
activation dtype (none in float32). Used only when every projection of the file is Q4_0 (one
method per model) and the backend offers `gptq`; the embedding and the output head are
dequantized as usual.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
# llama.cpp names of the layers a quantization method runs (textgen's linear projections)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_BLOCK_BYTES = 18  # fp16 d + 16 bytes of nibbles
_V1_ZEROS = np.int32(0x77777777)  # eight nibbles of zero - 1 = 7


def is_projection(gguf_name: str) -> bool:
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJECTIONS and parts[3] == "weight"


def all_projections_q4_0(tensor_types: dict[str, str]) -> bool:
    """`tensor_types`: llama.cpp name -> ggml type name."""
    kinds = {kind for name, kind in tensor_types.items() if is_projection(name)}
    return kinds == {"Q4_0"}


def gptq_tensors(prefix: str, blocks: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
    """Q4_0 blocks uint8 [N, K / 32 * 18] (rows already in Hugging Face order) -> GPTQ v1
    `qweight` int32 [K / 8, N], `qzeros` int32 [K / 32, N / 8], `scales` fp16 [K / 32, N], `g_idx`."""
    import torch

    rows = blocks.shape[0]
    split = blocks.reshape(rows, -1, _BLOCK_BYTES)
    scales = np.ascontiguousarray(split[:, :, :2]).view(np.float16)[..., 0]  # [N, G]
    nibbles = split[:, :, 2:]
    codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=2).reshape(rows, -1)  # [N, K]
    columns = codes.shape[1]
    words = codes.T.astype(np.uint32).reshape(columns // 8, 8, rows)
    qweight = np.bitwise_or.reduce(words << (4 * np.arange(8, dtype=np.uint32)).reshape(1, 8, 1), axis=1)
    yield f"{prefix}.qweight", torch.from_numpy(qweight.view(np.int32))
    yield f"{prefix}.qzeros", torch.full((columns // 32, rows // 8), int(_V1_ZEROS), dtype=torch.int32)
    yield f"{prefix}.scales", torch.from_numpy(np.ascontiguousarray(scales.T))
    yield f"{prefix}.g_idx", torch.arange(columns, dtype=torch.int32) // 32

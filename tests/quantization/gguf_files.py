"""GGUF files written by the tests the way llama.cpp's `convert_hf_to_gguf.py` writes them, from a
tiny Hugging Face checkpoint: llama.cpp's tensor names (`blk.0.attn_q.weight`), Q and K rows
permuted for llama's rotary layout (`LlamaModel.permute`), metadata keys `general.architecture`,
`<arch>.block_count`, ..., and a byte-level BPE tokenizer as `tokenizer.ggml.*`.

Float types and Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 are quantized from the checkpoint's weights with
`gguf.quants.quantize`. The K-quants have no Python quantizer: their blocks are random bytes with
the fp16 super-block scales set to small values, structurally valid so that every reader
(textgen, transformers) dequantizes the same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file

from textgen.testing.tiny_models import CHAT_TEMPLATE

# HF name (after "model.layers.N.") -> llama.cpp's
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# byte offsets of the fp16 scales (d, dmin) inside one block of each K-quant
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
WEIGHT_MAGNITUDE = 0.1  # largest |w| of a random K-quant tensor

TypeChooser = Callable[[str, tuple[int, ...]], str]


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")  # model.layers.N.<rest>
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{suffix}"


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.permute): rotary halves -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def one_type(name: str) -> TypeChooser:
    """Every matrix in `name`; 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
    return lambda tensor, shape: name if len(shape) == 2 else "F32"


def q4_k_m(tensor: str, shape: tuple[int, ...]) -> str:
    """A Q4_K_M-like mix: Q6_K for attn_v, ffn_down and the output head, Q4_K for the rest."""
    if len(shape) == 1:
        return "F32"
    return "Q6_K" if any(part in tensor for part in ("attn_v", "ffn_down", "output.")) else "Q4_K"


def by_tensor(types: dict[str, str], default: str) -> TypeChooser:
    """A mix: the first key of `types` found in the llama.cpp name picks its type; 1-D stays F32."""
    def choose(tensor: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1:
            return "F32"
        return next((kind for part, kind in types.items() if part in tensor), default)

    return choose


def write_gguf(model_dir: str | Path, out: str | Path, types: TypeChooser, seed: int = 0,
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write `model_dir` (config.json, model.safetensors, tokenizer.json) as the GGUF file `out`,
    plus the F32 tensors `extra`. llama.cpp writes Mistral as `llama` and says which in
    `general.name`, as here."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    arch = "llama" if config["model_type"] == "mistral" else config["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny-{config['model_type']}")
    _add_model_metadata(writer, config)
    _add_tokenizer(writer, model_dir)
    rng = np.random.default_rng(seed)
    for hf_name, array in load_file(str(model_dir / "model.safetensors")).items():
        target = gguf_name(hf_name)
        array = array.astype(np.float32)
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"]
            array = llama_permute(array, heads, heads if "attn_q" in target else config["num_key_value_heads"])
        kind = getattr(gguf.GGMLQuantizationType, types(target, array.shape))
        writer.add_tensor(target, _encode(array, kind, rng), raw_dtype=kind)
    for target, array in (extra or {}).items():
        writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_model_metadata(writer, config: dict) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(0)


def _add_tokenizer(writer, model_dir: Path) -> None:
    """tokenizer.json's byte-level BPE as llama.cpp's `gpt2` tokenizer model."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["id"] for added in tok["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: CONTROL, 1: NORMAL
    writer.add_token_merges(merges)
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _encode(array: np.ndarray, kind, rng: np.random.Generator) -> np.ndarray:
    from gguf import quants

    if kind.name in K_QUANT_SCALES:
        return random_k_quant(array.shape, kind, rng)
    return quants.quantize(array, kind)


def random_k_quant(shape: tuple[int, ...], kind, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `kind` for a float tensor of `shape`, scaled so that max |w| is
    WEIGHT_MAGNITUDE (dequantization is linear in the fp16 scales)."""
    from gguf import GGML_QUANT_SIZES, quants

    block_elems, block_bytes = GGML_QUANT_SIZES[kind]
    if shape[-1] % block_elems:
        raise ValueError(f"{kind.name} needs rows of a multiple of {block_elems} values, not {shape[-1]}")
    blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block_elems, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.0, size=(blocks.shape[0], len(K_QUANT_SCALES[kind.name])))
    _set_scales(blocks, kind.name, scales)
    largest = np.abs(quants.dequantize(blocks, kind)).max()
    _set_scales(blocks, kind.name, scales * WEIGHT_MAGNITUDE / largest)
    return blocks.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def _set_scales(blocks: np.ndarray, kind: str, values: np.ndarray) -> None:
    halves = values.astype(np.float16).view(np.uint8).reshape(blocks.shape[0], -1, 2)
    for index, offset in enumerate(K_QUANT_SCALES[kind]):
        blocks[:, offset: offset + 2] = halves[:, index]

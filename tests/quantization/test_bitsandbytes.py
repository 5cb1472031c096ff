"""bitsandbytes through the real library: checkpoints saved by transformers + bitsandbytes
(`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` then `save_pretrained`) and
TGI's on-the-fly `--quantize bitsandbytes[-nf4|-fp4]`, against transformers' bnb model.

Same arithmetic, same numbers: textgen calls the library's quantize and matmul functions with the
tensors transformers' Linear8bitLt / Linear4bit hold (fused q/k/v and gate/up are joined part by
part), so logits agree to float32 rounding of a different GEMM order (measured 0.0; bound 1e-4 on
logits of magnitude ~0.7) and greedy tokens are equal. Against the unquantized model: LLM.int8
(per-row absmax, 1/254 of a row's range) within 0.02, 4-bit NF4/FP4 (16 levels per 64-weight
block) within 0.2; measured 0.007 / 0.07 / 0.10."""
from __future__ import annotations

import pytest
import torch

from tests.quantization.helpers import greedy, hf_greedy, hf_logits, load_quantized, prefill_logits

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

PROMPTS = ([5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11, 600], [1, 900, 42])
STEPS = 8
SAME_ARITHMETIC = 1e-4
CONFIGS = {
    "int8": dict(load_in_8bit=True),
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
}
# TGI's flags: what transformers config computes the same, and the bound against float weights
FLAGS = {"bitsandbytes": (CONFIGS["int8"], 0.02), "bitsandbytes-nf4": (CONFIGS["nf4-double-quant"], 0.2),
         "bitsandbytes-fp4": ({**CONFIGS["fp4"], "bnb_4bit_use_double_quant": True}, 0.2)}


def hf_bnb(path: str, config: dict) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**config),
                                                device_map="cpu", dtype=torch.float32).eval()


def assert_same_model(textgen_model: torch.nn.Module, hf: torch.nn.Module) -> None:
    for prompt in PROMPTS:
        got, expected = prefill_logits(textgen_model, prompt), hf_logits(hf, prompt)
        assert (got - expected).abs().max() < SAME_ARITHMETIC, (got - expected).abs().max()
        assert greedy(textgen_model, prompt, STEPS) == hf_greedy(hf, prompt, STEPS)


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """name -> folder of the tiny Llama quantized by transformers + bitsandbytes and saved."""
    out = {}
    for name, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(f"bnb-{name}")
        hf_bnb(tiny_llama, config).save_pretrained(folder)
        out[name] = str(folder)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_checkpoint_matches_transformers(saved, tiny_llama, name):
    loaded = load_quantized(saved[name])
    assert loaded.quantization.startswith("bitsandbytes " + ("LLM.int8" if name == "int8" else "4-bit"))
    assert "from the checkpoint" in loaded.quantization and loaded.method == "bitsandbytes"
    assert loaded.weight_bytes < load_quantized(tiny_llama).weight_bytes
    hf = AutoModelForCausalLM.from_pretrained(saved[name], device_map="cpu", dtype=torch.float32).eval()
    assert_same_model(loaded.model, hf)


@pytest.mark.parametrize("flag", list(FLAGS))
def test_on_the_fly_matches_transformers_and_stays_close(tiny_llama, flag):
    config, bound = FLAGS[flag]
    loaded = load_quantized(tiny_llama, flag)
    assert "quantized while loading" in loaded.quantization and loaded.method == flag
    assert_same_model(loaded.model, hf_bnb(tiny_llama, config))
    plain = load_quantized(tiny_llama).model
    error = max((prefill_logits(loaded.model, p) - prefill_logits(plain, p)).abs().max() for p in PROMPTS)
    assert 0 < error < bound, error


def test_a_serving_flag_cannot_requantize_a_bnb_checkpoint(saved):
    from textgen.core.quantization import QuantizationError

    with pytest.raises(QuantizationError, match="already quantized with 'bitsandbytes'; --quantize int8"):
        load_quantized(saved["int8"], "int8")

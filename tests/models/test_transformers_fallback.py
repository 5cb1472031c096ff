"""The transformers fallback: architectures without a native module run transformers' own modeling
code with textgen's paged attention as its attention function. Each must match transformers
(eager, float32) through chunked prefill after a cached prefix and paged decode, share steps with
other requests, and generate the same greedy tokens as `generate` through the engine."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.models.parity import check_mixed_batch, check_prefill_and_decode, hf_logits, prompt_of
from textgen.core.config import EngineConfig
from textgen.core.models import resolve_model_class
from textgen.core.models.registry import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# none of these has a native module; each brings something of its own to the fallback
FALLBACK_CASES = {
    "olmo-clip-qkv-parameterless-layernorm": "olmo",
    "helium": "helium",
    "glm-partial-interleaved-rotary": "glm",
    "exaone4-local-global-window-qk-norm": "exaone4",
    "smollm3-no-rope-layers": "smollm3",
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_fallback_matches_transformers_through_chunks_prefix_and_decode(tiny_model_factory, case: str) -> None:
    arch = FALLBACK_CASES[case]
    path = tiny_model_factory(arch)
    config = _hf_config(path)
    assert not set(config.architectures) & set(ARCHITECTURES)
    assert resolve_model_class(config).__name__ == "TransformersCausalLM"
    check_prefill_and_decode(path, 4, [13, 9, 11], seed=len(case))


def test_fallback_requests_sharing_steps_equal_each_alone(tiny_model_factory) -> None:
    check_mixed_batch(tiny_model_factory("exaone4"))


def test_probed_specs_carry_each_layers_window_and_scale(tiny_model_factory) -> None:
    """Exaone 4 passes its window only on "sliding_attention" layers: the probe reads it per layer;
    and the window is real (transformers' logits change without it)."""
    from textgen.testing.paged_model import load_bound_model

    model = load_bound_model(EngineConfig(model_id=tiny_model_factory("exaone4"), dtype="float32", block_size=4))
    specs = model.attention_specs()
    assert [(s.num_heads, s.num_kv_heads, s.head_size, s.sliding_window) for s in specs] == [
        (4, 2, 16, 8), (4, 2, 16, None)]
    assert all(s.scale == 16 ** -0.5 for s in specs)
    prompt = prompt_of(33, 1)
    windowed = hf_logits(tiny_model_factory("exaone4"), prompt)[-1]
    unwindowed = hf_logits(tiny_model_factory("exaone4", sliding_window=1024), prompt)[-1]
    assert not torch.allclose(windowed, unwindowed, atol=1e-3)


def test_llama_forced_through_the_fallback_equals_native(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """`TEXTGEN_MODEL_IMPL=transformers` runs a native family's checkpoint through the fallback
    (what benchmarks/fallback.py compares); both paths give the same logits."""
    from textgen.testing.paged_model import PagedModel, load_bound_model

    prompt = prompt_of(30, 5)
    config = EngineConfig(model_id=tiny_llama, dtype="float32", block_size=4)
    native = PagedModel(load_bound_model(config)).generate(prompt, [17, 13], steps=3)
    monkeypatch.setenv("TEXTGEN_MODEL_IMPL", "transformers")
    model = load_bound_model(config)
    assert type(model).__name__ == "TransformersCausalLM"
    forced = PagedModel(model).generate(prompt, [17, 13], steps=3)
    assert forced[0].tokens == native[0].tokens
    torch.testing.assert_close(forced[1], native[1], atol=1e-4, rtol=0)


def test_engine_serves_a_fallback_model_greedy_equal_to_generate(tiny_model_factory) -> None:
    """Several prompts batched by the scheduler, with 8-token prefill chunks: greedy tokens equal
    transformers' `generate`; the startup line names the path."""
    from transformers import AutoModelForCausalLM

    from textgen.core import LLM

    path = tiny_model_factory("glm")
    llm = LLM(path, backend="cpu", dtype="float32", max_batch_prefill_tokens=8, block_size=4)
    assert any("model path: transformers fallback" in line for line in llm.engine.startup_lines)
    prompts = ["def add(a, b):", "import os", "class Foo(object):\n    def __init__(self):", "x = 1"]
    outs = llm.generate(prompts, max_new_tokens=10, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert out.token_ids == ref[0, len(ids):].tolist(), prompt


def test_native_family_startup_says_native(tiny_llama) -> None:
    from textgen.core.loader import load_model
    from textgen.testing.paged_model import cpu_backend

    assert load_model(EngineConfig(model_id=tiny_llama, dtype="float32"), cpu_backend()).describe_weights() \
        .startswith("model path: native;")


def test_class_without_custom_attention_is_refused_with_reason_and_list(tmp_path: Path) -> None:
    from transformers import MptConfig

    MptConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, architectures=["MptForCausalLM"]) \
        .save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"^model architecture not supported: MptForCausalLM \(no native module, "
                                         r"and transformers' MptForCausalLM does not accept custom attention "
                                         r"functions\)\. Supported: the native architectures "
                                         + re.escape(", ".join(sorted(ARCHITECTURES)))):
        _load(tmp_path)


def test_hybrid_layers_without_attention_are_refused_by_the_probe(tmp_path: Path) -> None:
    """LFM2's convolution layers keep state the paged cache does not hold: the probe counts the
    attention calls and refuses."""
    from transformers import Lfm2Config

    Lfm2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, layer_types=["conv", "full_attention"],
               architectures=["Lfm2ForCausalLM"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"^model architecture not supported: Lfm2ForCausalLM \(transformers "
                                         r"fallback: 1 attention calls for 2 layers \(layers without attention"):
        _load(tmp_path)


def test_attention_sinks_are_refused_by_the_probe(tmp_path: Path) -> None:
    """gpt-oss hands its attention sinks (`s_aux`) to the attention function: the paged kernel
    has none, so the probe refuses instead of silently dropping them."""
    from transformers import GptOssConfig

    GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
                 architectures=["GptOssForCausalLM"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"\(transformers fallback: layer 0: attention inputs the paged kernel "
                                         r"does not implement: s_aux; "):
        _load(tmp_path)


def _hf_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _load(path: Path):
    from textgen.core.loader import load_model
    from textgen.testing.paged_model import cpu_backend

    return load_model(EngineConfig(model_id=str(path), dtype="float32", load_format="dummy"), cpu_backend())

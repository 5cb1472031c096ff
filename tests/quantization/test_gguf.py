"""GGUF checkpoints (`--model-id file.gguf`): files written by the tests in llama.cpp's layout
(tests/quantization/gguf_files.py) from tiny random models, served by textgen and compared with
transformers loading the same file (`from_pretrained(dir, gguf_file=name)`).

Tolerances: both sides dequantize the same bytes to float32 and run float32, so logits agree to
float32 rounding of different kernels (2e-4 on logits of magnitude ~1); a wrong name, a missed Q/K
un-permutation moves them by > 5e-3 on these tiny models. The F32 file must reproduce the
safetensors original, which checks the name map and the permutation without transformers' GGUF code.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.quantization.gguf_files import by_tensor, one_type, q4_k_m, write_gguf
from tests.quantization.helpers import greedy, load_quantized, prefill_logits
from textgen.core.config import EngineConfig
from textgen.core.engine.sizing import ConfigError
from textgen.core.loader import ModelFilesError
from textgen.core.loader.gguf import GGUFCheckpoint, GGUFError, find_gguf_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 2e-4
PROMPTS = [[1, 5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11], [1, 600, 13], [1, 42, 42, 42, 7, 900, 2, 64]]
K_QUANT_SIZES = dict(hidden_size=256, intermediate_size=256)  # K-quant rows hold 256-value super-blocks
# transformers' qwen3 GGUF config has no head_dim key (Qwen3Config's default, 128, is every Qwen3's)
ARCH_SIZES = {"qwen3": dict(head_dim=128)}


@pytest.fixture(scope="module")
def gguf_file(tiny_model_factory, tmp_path_factory):
    """(arch, types name) -> a .gguf alone in its folder, like a GGUF repo; built once each."""
    choosers = {"F32": one_type("F32"), "Q8_0": one_type("Q8_0"), "Q4_0": one_type("Q4_0"), "Q4_K_M": q4_k_m,
                "F16_BF16": by_tensor({"attn": "F16"}, "BF16"),
                "Q4_1_Q5": by_tensor({"attn_q": "Q4_1", "attn_k": "Q5_0", "ffn": "Q5_1"}, "Q4_1"),
                "Q2_K_Q3_K_Q5_K": by_tensor({"attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "Q5_K", "ffn_gate": "Q2_K",
                                             "ffn_up": "Q3_K", "ffn_down": "Q5_K", "output.": "Q3_K"}, "Q5_K")}
    cache: dict[tuple[str, str], Path] = {}

    def build(arch: str, types: str) -> Path:
        if (arch, types) not in cache:
            k_quant = "_K" in types
            source = tiny_model_factory(arch, **ARCH_SIZES.get(arch, {}), **(K_QUANT_SIZES if k_quant else {}))
            folder = tmp_path_factory.mktemp(f"gguf-{arch}-{types}")
            cache[arch, types] = write_gguf(source, folder / f"tiny-{arch}-{types}.gguf", choosers[types])
        return cache[arch, types]

    return build


def hf_gguf_model(file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax continuation without generate()'s EOS handling (the tiny models emit EOS at random)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def test_f32_gguf_reproduces_the_safetensors_original(gguf_file, tiny_llama):
    loaded = load_quantized(str(gguf_file("llama", "F32")))
    original = load_quantized(tiny_llama).model
    for tokens in PROMPTS:
        assert torch.allclose(prefill_logits(loaded.model, tokens), prefill_logits(original, tokens), atol=1e-5)


@pytest.mark.parametrize(("arch", "types"), [
    ("llama", "F16_BF16"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1_Q5"), ("llama", "Q4_K_M"),
    ("llama", "Q2_K_Q3_K_Q5_K"), ("qwen2", "Q8_0"), ("qwen3", "Q4_0"),
])
def test_logits_and_greedy_tokens_match_transformers(gguf_file, arch, types):
    file = gguf_file(arch, types)
    loaded = load_quantized(str(file))
    stored = GGUFCheckpoint.open(file).tensor_types
    assert loaded.quantization.startswith(f"gguf {file} ({arch}; ")
    kept = "Q4_0 projections kept 4-bit as gptq 4-bit group 32 (kernels: " in loaded.quantization
    assert kept == (types == "Q4_0") and loaded.quantization.endswith(" dequantized to torch.float32 at load")
    assert all(f"{name} x{count}" in loaded.quantization for name, count in stored.items())
    reference = hf_gguf_model(file)
    for tokens in PROMPTS:
        got, expected = prefill_logits(loaded.model, tokens), hf_logits(reference, tokens)
        assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    for prompt in PROMPTS:
        assert greedy(loaded.model, prompt, 6) == hf_greedy(reference, prompt, 6)


def test_q4_0_projections_stay_4_bit_and_exact(gguf_file):
    """Kept Q4_0 (gptq int4 kernel) against the same file dequantized (a backend without gptq)."""
    from textgen.core.engine.model_runner import bind_attention
    from textgen.core.loader import load_model
    from textgen.testing.paged_model import CPU_KERNEL, cpu_backend

    file = gguf_file("llama", "Q4_0")
    kept = load_quantized(str(file))
    config = EngineConfig(model_id=str(file), dtype="float32", block_size=16)
    dequantized = load_model(config, cpu_backend(), quantizers=[])
    bind_attention(dequantized.model, [CPU_KERNEL], config)
    assert dequantized.quantization == f"gguf {file} (llama; Q4_0 x16, F32 x5) dequantized to torch.float32 at load"
    assert kept.quantization.startswith(f"gguf {file} (llama; Q4_0 x16, F32 x5) Q4_0 projections kept 4-bit as gptq")
    for tokens in PROMPTS:
        expected = prefill_logits(dequantized.model, tokens)
        assert torch.allclose(prefill_logits(kept.model, tokens), expected, atol=1e-5)
    assert greedy(kept.model, PROMPTS[0], 6) == greedy(dequantized.model, PROMPTS[0], 6)
    assert kept.weight_bytes < dequantized.weight_bytes


def test_the_file_really_is_quantized(gguf_file, tiny_llama):
    """Q4_0 of the same weights moves the logits: the fixture does not silently store floats."""
    quantized = load_quantized(str(gguf_file("llama", "Q4_0"))).model
    original = load_quantized(tiny_llama).model
    assert (prefill_logits(quantized, PROMPTS[0]) - prefill_logits(original, PROMPTS[0])).abs().max() > 50 * ATOL


def test_tokenizer_comes_from_the_metadata(gguf_file, tiny_llama):
    from transformers import AutoTokenizer

    from textgen.core.engine.setup import load_tokenizer

    file = gguf_file("llama", "Q8_0")
    ours = load_tokenizer(EngineConfig(model_id=str(file)), file)
    theirs = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    original = AutoTokenizer.from_pretrained(tiny_llama)
    for text in ["def fib(n):\n    return n", "Hello  world !", "import os, sys\n\n\tx = 1", "</s> caf\u00e9 <s>"]:
        assert ours(text).input_ids == theirs(text).input_ids == original(text).input_ids
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.eos_token_id) == ("<s>", "</s>", "<pad>", 2)
    assert ours.chat_template == theirs.chat_template and ours.chat_template


def test_model_id_forms(gguf_file, tmp_path):
    file = gguf_file("llama", "Q8_0")
    assert find_gguf_file(str(file)) == file
    assert find_gguf_file(str(file.parent)) == file
    (tmp_path / "a.gguf").write_bytes(file.read_bytes())
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelFilesError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\): pass one of them"):
        find_gguf_file(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_gguf_file(str(tmp_path)) is None  # a safetensors checkpoint with GGUF exports beside it
    with pytest.raises(ModelFilesError, match="does not exist"):
        find_gguf_file(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelFilesError, match=r"GGUF file 'x.gguf' of nobody/nothing .* not in the local"):
        find_gguf_file("nobody/nothing/x.gguf")  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ModelFilesError, match="is not a readable GGUF file"):
        GGUFCheckpoint.open(tmp_path / "b.gguf")


def test_llama3_rope_freqs_are_ignored_as_transformers_does_and_strange_tensors_refused(tiny_llama, tmp_path):
    (tmp_path / "rope").mkdir()
    file = write_gguf(tiny_llama, tmp_path / "rope" / "r.gguf", one_type("F16"),
                      extra={"rope_freqs.weight": np.full(8, 2.0, dtype=np.float32)})
    expected = hf_logits(hf_gguf_model(file), PROMPTS[0])
    assert torch.allclose(prefill_logits(load_quantized(str(file)).model, PROMPTS[0]), expected, atol=ATOL)
    (tmp_path / "odd").mkdir()
    file = write_gguf(tiny_llama, tmp_path / "odd" / "o.gguf", one_type("F16"),
                      extra={"blk.0.attn_sinks.weight": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ModelFilesError, match="'blk.0.attn_sinks.weight' has no counterpart in LlamaForCausalLM"):
        load_quantized(str(file))


def _odd_gguf(path: Path, arch: str, kind: str) -> Path:
    """A minimal file with one 2-D tensor of `kind` (random blocks)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    blocks = np.random.default_rng(0).integers(0, 256, size=(4, 64 // block_elems * block_bytes), dtype=np.uint8)
    writer.add_tensor("blk.0.attn_q.weight", blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_and_tensor_type_are_refused(tmp_path):
    with pytest.raises(GGUFError) as refused:
        GGUFCheckpoint.open(_odd_gguf(tmp_path / "bloom.gguf", "bloom", "Q8_1"))
    assert isinstance(refused.value, ConfigError)
    assert str(refused.value) == (
        f"cannot serve the GGUF file {tmp_path / 'bloom.gguf'}: GGUF architecture 'bloom' is not supported "
        "(supported: llama, qwen2, qwen3); serve the original Hugging Face checkpoint instead; tensor type Q8_1 is not "
        "supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)")
    file = _odd_gguf(tmp_path / "iq.gguf", "llama", "IQ4_NL")
    done = subprocess.run([sys.executable, "-m", "textgen.api.cli", "serve", "--model-id", str(file), "--backend",
                           "cpu"], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"textgen serve: error: cannot serve the GGUF file {file}: tensor type IQ4_NL is not "
                           "supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, "
                           "Q5_K, Q6_K)\n")


def test_served_over_http(gguf_file):
    """A real HTTP server (uvicorn + engine) started with `--model-id file.gguf`'s config."""
    import httpx

    from tests.api.conftest import make_engine, start_server
    from textgen.api.launcher import budget_lines

    file = gguf_file("llama", "Q4_K_M")
    engine = make_engine(str(file))
    running = start_server(engine)
    try:
        parameters = {"max_new_tokens": 8, "details": True, "decoder_input_details": True}
        r = httpx.post(running.base_url + "/generate", json={"inputs": "def fib(n):", "parameters": parameters},
                       timeout=60)
    finally:
        running.stop()
        engine.shutdown()
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    prompt = [token["id"] for token in details["prefill"]]
    assert prompt[0] == 1 and len(prompt) > 2  # BOS from the GGUF tokenizer, then the text
    steps = details["generated_tokens"]
    assert [token["id"] for token in details["tokens"]] == hf_greedy(hf_gguf_model(file), prompt, 8)[:steps]
    startup = budget_lines(engine)[0]  # the line `textgen serve` prints
    assert f"quantization: gguf {file} (llama; Q6_K x7, Q4_K x9, F32 x5) dequantized to torch.float32 at load" \
        in startup

"""load_format="dummy": a model from config.json alone (no safetensors), initialised as
transformers initialises a fresh model, deterministic per seed; and the engine runs on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from textgen.core.config import EngineConfig
from textgen.core.loader import ModelFilesError, load_model
from textgen.testing.tiny_models import FAMILIES

QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=3000, hidden_size=128,
            intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
            initializer_range=0.05)


def _cpu_backend():
    from textgen.core.plugins import PluginManager

    return PluginManager().create_backend(EngineConfig(model_id="x"), forced="cpu")


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("config-only")
    (folder / "config.json").write_text(json.dumps(QWEN))
    return str(folder)


@pytest.fixture(autouse=True)
def plain_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read weight values; the CPU's prepacked oneDNN layout is opaque."""
    monkeypatch.setenv("TEXTGEN_CPU_ONEDNN_PACK", "0")


def _load(path: str, seed: int = 0, dtype: str = "float32"):
    return load_model(EngineConfig(model_id=path, load_format="dummy", seed=seed, dtype=dtype), _cpu_backend())


def test_builds_from_config_json_alone_with_hf_style_init(config_only: str) -> None:
    assert sorted(p.name for p in Path(config_only).iterdir()) == ["config.json"]
    model = _load(config_only).model
    params = dict(model.named_parameters())
    norms = [n for n in params if n.endswith("norm.weight")]
    biases = [n for n in params if n.endswith(".bias")]
    assert len(norms) == 5 and all(params[n].eq(1).all() for n in norms)
    assert biases == [f"model.layers.{i}.self_attn.qkv_proj.bias" for i in range(2)]  # qwen2: q/k/v bias
    assert all(params[n].eq(0).all() for n in biases)
    matrices = torch.cat([p.flatten() for n, p in params.items() if p.dim() == 2])
    assert matrices.std().item() == pytest.approx(0.05, rel=0.02)  # the config's initializer_range
    assert abs(matrices.mean().item()) < 1e-3
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: filled once


def test_same_seed_same_weights_other_seed_other_weights(config_only: str) -> None:
    a, b, c = (dict(_load(config_only, seed=s).model.named_parameters()) for s in (7, 7, 8))
    name = "model.layers.1.mlp.down_proj.weight"
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[name], c[name])


def test_bfloat16_dummy_keeps_the_float32_draws(config_only: str) -> None:
    f32 = dict(_load(config_only, dtype="float32").model.named_parameters())
    bf16 = dict(_load(config_only, dtype="bfloat16").model.named_parameters())
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert bf16[name].dtype == torch.bfloat16
    assert torch.equal(bf16[name], f32[name].to(torch.bfloat16))


def test_default_format_still_requires_the_checkpoint(config_only: str) -> None:
    with pytest.raises(ModelFilesError, match="no model weights"):
        load_model(EngineConfig(model_id=config_only), _cpu_backend())


def test_engine_generates_on_a_configuration(config_only: str) -> None:
    """The path `textgen bench` takes: config -> folder with a covering tokenizer -> EngineCore."""
    from textgen.api.bench_models import resolve_bench_model
    from textgen.core import LLM

    model = resolve_bench_model(str(Path(config_only) / "config.json"))
    assert model.load_format == "dummy" and (model.path / "tokenizer.json").is_file()
    llm = LLM(str(model.path), backend="cpu", dtype="float32", load_format="dummy")
    outs = llm.generate_ids([[5, 6, 7, 8], [2999, 10]], max_new_tokens=6, ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [6, 6]
    assert all(0 <= t < 3000 for o in outs for t in o.token_ids)
    assert outs[0].text == "".join(f" t{t}" for t in outs[0].token_ids)


@pytest.mark.parametrize("arch", sorted(set(FAMILIES) - {"llama", "mistral", "qwen2"}))
def test_every_native_family_builds_from_config_alone_and_runs(arch: str, tmp_path: Path) -> None:
    """What benchmarks and memory sizing do with any family: config.json only, dummy weights,
    one paged prefill step with finite logits."""
    from textgen.testing.paged_model import PagedModel, Seq, load_bound_model
    from textgen.testing.tiny_models import _config

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _config(arch, 500)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(str(tmp_path))
    model = load_bound_model(EngineConfig(model_id=str(tmp_path), dtype="float32", load_format="dummy",
                                          block_size=4))
    logits = PagedModel(model, num_blocks=16).step([(Seq(list(range(5, 18))), 13)])[0]
    assert logits.shape == (13, 500) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gemma", "gemma3"])
def test_gemma_norms_start_at_their_identity_zero_as_transformers_builds_them(arch: str, tmp_path: Path) -> None:
    """Gemma's norm is x * (1 + weight): a fresh transformers model holds zeros there; ones would
    double every activation of a dummy model."""
    from transformers import AutoModelForCausalLM

    from textgen.testing.tiny_models import _config

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _config(arch, 500)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(str(tmp_path))
    ours = {n: p for n, p in _load(str(tmp_path)).model.named_parameters() if "norm" in n}
    theirs = {n: p for n, p in AutoModelForCausalLM.from_config(config).named_parameters() if "norm" in n}
    assert len(ours) == len(theirs) > 4
    assert all(p.eq(0).all() for p in theirs.values())
    assert all(p.eq(0).all() for p in ours.values()), [n for n, p in ours.items() if not p.eq(0).all()]

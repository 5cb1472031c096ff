"""Model loading: file resolution, safetensors-only, sharded checkpoints, dtype choice, config
formats of transformers 4 and 5, architecture registry and the completeness check."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from textgen.backends.cpu.attention import CPUPagedAttention
from textgen.core.backend import Backend, BackendCandidate, MemoryInfo
from textgen.core.config import EngineConfig
from textgen.core.loader import (
    ModelFilesError, checkpoint_dtype, iterate_safetensors, load_model, resolve_dtype, resolve_model_path,
)
from textgen.core.layers.rotary import inv_freq_and_scaling, rope_parameters
from textgen.core.models import ARCHITECTURES, resolve_model_class
from textgen.testing.paged_model import cpu_backend

# every native architecture, as the refusal lists them (sorted); README's table names the same
NATIVE_ARCHITECTURES = sorted([
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM", "StableLmForCausalLM", "MixtralForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Starcoder2ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM",
    "PhiForCausalLM", "CohereForCausalLM", "GPT2LMHeadModel", "GPTBigCodeForCausalLM",
    "BloomForCausalLM", "FalconForCausalLM", "Gemma3ForCausalLM",
])


def _load(path: str | Path, **kwargs: object):
    return load_model(EngineConfig(model_id=str(path), dtype="float32", **kwargs), cpu_backend())


def _copy_without_weights(src: str, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(src).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor's values (a weight the CPU prepacked for oneDNN reads back through to_dense)."""
    return {k: (v.to_dense() if v.layout == torch._mkldnn else v.clone()) for k, v in model.state_dict().items()}


def test_sharded_checkpoint_loads_identically(tiny_llama: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = _copy_without_weights(tiny_llama, tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).save_pretrained(
        str(sharded), max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    single, multi = _state(_load(tiny_llama).model), _state(_load(sharded).model)
    assert single.keys() == multi.keys()
    for name in single:
        assert torch.equal(single[name], multi[name]), name
    assert {n for n, _ in iterate_safetensors(sharded)} == set(load_file(f"{tiny_llama}/model.safetensors"))


def test_pickle_only_folder_is_refused(tiny_llama: str, tmp_path: Path) -> None:
    folder = _copy_without_weights(tiny_llama, tmp_path / "bin")
    torch.save(load_file(f"{tiny_llama}/model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelFilesError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*safetensors only"):
        _load(folder)


def test_offline_unknown_hub_id_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelFilesError, match="'textgen-tests/no-such-model'.*not in the local Hugging Face cache"
                                              ".*HF_HUB_OFFLINE=1"):
        resolve_model_path("textgen-tests/no-such-model")
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing-folder"))
    assert resolve_model_path(str(tmp_path)) == tmp_path


def _hub_cache_with(model_dir: str, cache: Path, repo_id: str, refs: dict[str, str]) -> None:
    """The Hugging Face cache layout huggingface_hub reads offline: models--org--name/refs/<ref>
    holds a commit hash, snapshots/<hash>/ the files (here copies; in a real cache, links to blobs)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
        shutil.copytree(model_dir, root / "snapshots" / commit, dirs_exist_ok=True)


def test_hub_id_and_revision_load_from_the_offline_cache(monkeypatch: pytest.MonkeyPatch, tiny_llama: str,
                                                           tmp_path: Path) -> None:
    from huggingface_hub import constants

    main, tagged = "a" * 40, "b" * 40
    _hub_cache_with(tiny_llama, tmp_path, "textgen-tests/tiny-llama", {"main": main, "v1": tagged})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshots = tmp_path / "models--textgen-tests--tiny-llama" / "snapshots"
    assert resolve_model_path("textgen-tests/tiny-llama") == snapshots / main
    assert resolve_model_path("textgen-tests/tiny-llama", revision="v1") == snapshots / tagged
    with pytest.raises(ModelFilesError, match=r"revision v2\).*not in the local Hugging Face cache"):
        resolve_model_path("textgen-tests/tiny-llama", revision="v2")
    from_hub, local = _state(_load("textgen-tests/tiny-llama").model), _state(_load(tiny_llama).model)
    assert from_hub.keys() == local.keys() and all(torch.equal(from_hub[k], local[k]) for k in local)


def test_transformers5_config_format_is_read(tiny_llama: str, tmp_path: Path) -> None:
    """config.json with "dtype" and "rope_parameters" (rope_theta inside, no top-level keys)."""
    from tests.models.test_llama_parity import hf_logits

    folder = tmp_path / "v5"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("torch_dtype", "rope_theta", "rope_scaling"):
        config.pop(key, None)
    config["dtype"] = "bfloat16"
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = _load(folder)
    assert checkpoint_dtype(loaded.hf_config) == torch.bfloat16
    assert loaded.dtype == torch.float32  # explicit flag wins
    inv_freq, _ = inv_freq_and_scaling(rope_parameters(loaded.hf_config), 16, 1024)
    torch.testing.assert_close(inv_freq, 1.0 / (5000.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0)
    tokens = list(range(5, 30))
    with torch.inference_mode():
        ours = _run_prefill(loaded.model, tokens)
    torch.testing.assert_close(ours, hf_logits(str(folder), tokens), atol=1e-4, rtol=0)


def _run_prefill(model, tokens: list[int]) -> torch.Tensor:
    from textgen.core.engine.model_runner import bind_attention
    from textgen.testing.paged_model import CPU_KERNEL, PagedModel

    bind_attention(model, [CPU_KERNEL], EngineConfig(model_id="m", block_size=16))
    return PagedModel(model).generate(tokens, [len(tokens)], 0)[1]


def test_transformers4_rope_fields_are_read() -> None:
    v4 = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=128,
                         rope_scaling={"type": "linear", "factor": 4.0})
    assert rope_parameters(v4) == {"type": "linear", "factor": 4.0, "rope_type": "linear", "rope_theta": 500000.0}
    plain = SimpleNamespace(max_position_embeddings=128)
    assert rope_parameters(plain) == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported natively"):
        inv_freq_and_scaling({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 16, 128)


class _HalfBackend(Backend):
    """Device facts of an accelerator whose --dtype auto is bfloat16."""

    name = "half"
    device = torch.device("cpu")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(0, 0)


def test_resolve_dtype_rules() -> None:
    half = _HalfBackend(None, BackendCandidate("half", True, 1, "", ""))
    cpu = cpu_backend()
    stored = {name: SimpleNamespace(dtype=name) for name in ("float16", "bfloat16", "float32")}
    assert resolve_dtype("auto", stored["float16"], half) == torch.float16  # no fp16 -> bf16 conversion
    assert resolve_dtype("auto", stored["float32"], half) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype=torch.bfloat16), half) == torch.bfloat16
    assert resolve_dtype("auto", stored["bfloat16"], cpu) == cpu.default_dtype()
    assert resolve_dtype("bf16", stored["float32"], cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", stored["float32"], cpu)


def test_architecture_registry() -> None:
    llama = SimpleNamespace(architectures=["Qwen2ForCausalLM"])
    assert resolve_model_class(llama).__name__ == "LlamaForCausalLM"
    assert sorted(ARCHITECTURES) == NATIVE_ARCHITECTURES
    extra = {"Qwen2ForCausalLM": "textgen.backends.cpu.attention:CPUPagedAttention"}  # any class path
    assert resolve_model_class(llama, extra) is CPUPagedAttention
    with pytest.raises(ValueError, match=r"not supported: FancyForCausalLM \(no native module, and transformers "
                                         r"has no causal-LM class for it\)\. Supported: the native architectures "
                                         + re.escape(", ".join(NATIVE_ARCHITECTURES)) + "; any other"):
        resolve_model_class(SimpleNamespace(architectures=["FancyForCausalLM"]))


def test_unsupported_family_is_refused_at_startup_with_the_supported_list(tmp_path: Path) -> None:
    """A real config.json of a family neither path runs (no native module; transformers' class
    takes no custom attention function): load_model (the engine's startup) refuses it by name,
    with the reason, and lists every supported architecture."""
    from transformers import GPTNeoConfig

    GPTNeoConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                 architectures=["GPTNeoForCausalLM"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"^model architecture not supported: GPTNeoForCausalLM \(no native module, "
                                         r"and transformers' GPTNeoForCausalLM does not accept custom attention "
                                         r"functions\)\. Supported: the native architectures "
                                         + re.escape(", ".join(NATIVE_ARCHITECTURES)) + "; any other"):
        _load(tmp_path, load_format="dummy")


def test_missing_and_unexpected_tensors_are_named(tiny_llama: str, tmp_path: Path) -> None:
    weights = load_file(f"{tiny_llama}/model.safetensors")
    missing = _copy_without_weights(tiny_llama, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"},
              str(missing / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not provide these parameters of LlamaForCausalLM: "
                                         r"model\.layers\.1\.self_attn\.qkv_proj\.weight$"):
        _load(missing)
    extra = _copy_without_weights(tiny_llama, tmp_path / "extra")
    save_file({**weights, "model.layers.0.mystery.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(ValueError, match="match no parameter of LlamaForCausalLM: model.layers.0.mystery.weight"):
        _load(extra)


def test_dummy_weights_and_default_dtype_restored(tiny_llama: str) -> None:
    before = torch.get_default_dtype()
    loaded = load_model(EngineConfig(model_id=tiny_llama, dtype="bfloat16", load_format="dummy"), cpu_backend())
    assert torch.get_default_dtype() == before
    params = dict(loaded.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert params["model.norm.weight"].eq(1).all()  # norms start at one, as in transformers
    assert 0 < params["model.embed_tokens.weight"].float().std() < 0.05
    assert [s.dtype for s in loaded.model.attention_specs()] == [torch.bfloat16] * 2


@pytest.mark.parametrize("rank,size,q_rows,kv_rows", [(0, 1, (0, 8), (0, 4)), (1, 2, (4, 8), (2, 4)),
                                                      (3, 4, (6, 8), (2, 4))],
                         ids=["tp1", "tp2-rank1", "tp4-rank3-kv-replicated"])
def test_fused_weight_loaders_place_each_shard(rank: int, size: int, q_rows: tuple, kv_rows: tuple) -> None:
    """head_size 2, 4 q heads, 2 kv heads: each rank keeps its slice of q and of k/v (one kv head
    per rank once ranks outnumber kv heads); gate/up are split per rank and fused in order."""
    from textgen.core.layers.linear import MergedColumnLinear, QKVLinear

    qkv = QKVLinear(3, 2, 4, 2, True, torch.float32, tp_rank=rank, tp_size=size)
    q, k, v = (torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + off for n, off in ((8, 0), (4, 100), (4, 200)))
    for shard, tensor in (("q", q), ("k", k), ("v", v)):
        qkv.weight.weight_loader(qkv.weight, tensor, shard)
        qkv.bias.weight_loader(qkv.bias, tensor[:, 0], shard)
    expected = torch.cat([q[slice(*q_rows)], k[slice(*kv_rows)], v[slice(*kv_rows)]])
    assert torch.equal(qkv.weight, expected) and torch.equal(qkv.bias, expected[:, 0])

    gate_up = MergedColumnLinear(3, [4, 4], False, torch.float32, tp_rank=rank % 2, tp_size=min(size, 2))
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    part = 4 // min(size, 2)
    lo = (rank % 2) * part if size > 1 else 0
    assert torch.equal(gate_up.weight, torch.cat([gate[lo : lo + part], up[lo : lo + part]]))
    with pytest.raises(ValueError, match=r"shape \(5, 3\) does not have 4 entries on axis 0"):
        gate_up.weight.weight_loader(gate_up.weight, torch.zeros(5, 3), 0)

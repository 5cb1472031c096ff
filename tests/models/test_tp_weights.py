"""Sharded weight loading: each rank of a 2-way tensor-parallel model reads exactly its slice of
every checkpoint tensor from the memory-mapped file (never a whole sharded weight, nothing
twice), and its parameters equal the matching slices of the unsharded checkpoint.

Loading needs no process group (collectives run only in forward), so both ranks are built here,
one after the other, in one process."""
from __future__ import annotations

import pytest
import torch

from textgen.core.loader.lazy_slice import iterate_safetensor_slices
from textgen.core.models.base import ModelBuildContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def _load_rank(path: str, rank: int, world: int) -> tuple[torch.nn.Module, list, set[str]]:
    from transformers import AutoConfig

    from textgen.core.models.registry import resolve_model_class

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("cpu"):
        model = resolve_model_class(cfg, {})(cfg, ModelBuildContext(torch.float32, torch.device("cpu"), None, rank, world))
    reads: list = []
    loaded = model.load_weights(iterate_safetensor_slices(path, reads))
    return model, reads, loaded


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = -(-t.shape[0] // world)
    part = t[rank * n: (rank + 1) * n]
    return torch.cat([part, part.new_zeros(n - part.shape[0], *t.shape[1:])]) if part.shape[0] < n else part


def _cols(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[1] // world
    return t[:, rank * n: (rank + 1) * n]


def _expected(name: str, ckpt: dict[str, torch.Tensor], rank: int, world: int, kv_heads: int) -> torch.Tensor:
    """The unsharded checkpoint's slice for parameter `name` of `rank` (Llama-family layout)."""
    kv_rank = rank // max(1, world // kv_heads)  # more ranks than kv heads: ranks share (replicate) one
    kv_world = min(world, kv_heads)
    if ".qkv_proj." in name:
        part = lambda p, r, w: _rows(ckpt[name.replace("qkv_proj", p)], r, w)  # noqa: E731
        return torch.cat([part("q_proj", rank, world), part("k_proj", kv_rank, kv_world),
                          part("v_proj", kv_rank, kv_world)])
    if ".gate_up_proj." in name:
        return torch.cat([_rows(ckpt[name.replace("gate_up_proj", p)], rank, world) for p in ("gate_proj", "up_proj")])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return _cols(ckpt[name], rank, world)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _rows(ckpt.get(name, ckpt["model.embed_tokens.weight"]), rank, world)
    return ckpt[name]  # replicated: norms, row-parallel biases


def _check_reads(reads_by_rank: list[list], ckpt: dict[str, torch.Tensor]) -> None:
    """Per rank: no window read twice. Across ranks: a tensor is either replicated (every rank read
    all of it) or split (disjoint windows that cover it exactly once, none of them the whole)."""
    for reads in reads_by_rank:
        assert len(reads) == len(set(reads)), "a rank read the same window twice"
    for name, tensor in ckpt.items():
        windows = [w for reads in reads_by_rank for n, w in reads if n == name]
        full = tuple((0, s) for s in tensor.shape)
        if all(w == full for w in windows) and len(windows) == len(reads_by_rank):
            continue  # replicated
        assert full not in windows, f"{name}: a rank materialised the whole of a sharded weight"
        covered = torch.zeros(tensor.shape, dtype=torch.int32)
        for w in windows:
            covered[tuple(slice(lo, hi) for lo, hi in w)] += 1
        assert torch.all(covered == 1), f"{name}: the ranks did not split the tensor exactly once"


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),  # 2 kv heads over 2 ranks: one each
    ("llama", {"num_key_value_heads": 1, "vocab_size": 1001}),  # kv head replicated; vocab padded per rank
    ("qwen2", {}),  # tied embeddings, q/k/v biases
])
def test_each_rank_reads_and_holds_exactly_its_slice(tiny_model_factory, arch: str, overrides: dict) -> None:
    path = tiny_model_factory(arch, **overrides)
    ckpt = _checkpoint(path)
    kv_heads = overrides.get("num_key_value_heads", 2)
    reads_by_rank = []
    for rank in (0, 1):
        model, reads, loaded = _load_rank(path, rank, 2)
        params = dict(model.named_parameters())
        assert loaded == set(params), f"not loaded: {set(params) - loaded}"
        for name, param in params.items():
            assert torch.equal(param.data, _expected(name, ckpt, rank, 2, kv_heads)), name
        reads_by_rank.append(reads)
    _check_reads(reads_by_rank, ckpt)
    if overrides.get("num_key_value_heads") == 1:  # both ranks hold the single kv head
        k = "model.layers.0.self_attn.k_proj.weight"
        assert [w for reads in reads_by_rank for n, w in reads if n == k] == [((0, 16), (0, 64))] * 2


def _expected_moe(name: str, ckpt: dict[str, torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """A stacked expert parameter's slice: every expert's gate and up rows, down columns."""
    prefix = name.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    experts = sorted({int(n[len(prefix) + 1:].split(".")[0]) for n in ckpt if n.startswith(prefix + ".")})
    one = lambda e, p: ckpt[f"{prefix}.{e}.{p}.weight"]  # noqa: E731
    if name.endswith("gate_up_proj"):
        return torch.stack([torch.cat([_rows(one(e, "gate_proj"), rank, world), _rows(one(e, "up_proj"), rank, world)])
                            for e in experts])
    return torch.stack([_cols(one(e, "down_proj"), rank, world) for e in experts])


def _stack_experts(path: str, out) -> str:  # noqa: ANN001 - a pytest tmp path
    """The same model with transformers 5's stacked expert tensors instead of one per expert."""
    import re
    import shutil

    from safetensors.torch import save_file

    ckpt, stacked, parts = _checkpoint(path), {}, {}
    for name, tensor in ckpt.items():
        match = re.match(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if match is None:
            stacked[name] = tensor
        else:
            parts.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    for prefix, experts in parts.items():
        order = sorted(experts)
        stacked[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order])
        stacked[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{path}/{file}", out / file)
    save_file(stacked, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_each_rank_reads_and_holds_its_expert_slices(tiny_model_factory, tmp_path, stacked: bool) -> None:
    """Qwen2-MoE: each expert's intermediate axis split (gate/up rows, down columns) whether the
    checkpoint stores one tensor per expert or the experts stacked; router and shared-expert gate
    replicated, the shared expert sharded as a dense MLP."""
    path = tiny_model_factory("qwen2_moe")
    ckpt = _checkpoint(path)
    if stacked:
        path = _stack_experts(path, tmp_path)
    reads_by_rank = []
    for rank in (0, 1):
        model, reads, loaded = _load_rank(path, rank, 2)
        params = dict(model.named_parameters())
        assert loaded == set(params), f"not loaded: {set(params) - loaded}"
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 16, 64)
        for name, param in params.items():
            expected = (_expected_moe(name, ckpt, rank, 2) if ".experts." in name
                        else _expected(name, ckpt, rank, 2, 2))
            assert torch.equal(param.data, expected), name
        reads_by_rank.append(reads)
    _check_reads(reads_by_rank, _checkpoint(path))

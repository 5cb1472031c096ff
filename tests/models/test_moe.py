"""The fused MoE layer: routing and the grouped expert matmul against a per-token reference with
experts forced to differ, both checkpoint layouts of Mixtral loading the same parameters, and the
tiny parity models really routing tokens to different experts."""
from __future__ import annotations

import torch

from tests.models.parity import hf_model, prompt_of
from textgen.core.config import EngineConfig
from textgen.core.layers.moe import FusedMoE, route
from textgen.core.loader import load_model
from textgen.testing.paged_model import cpu_backend

E, H, I, K = 6, 16, 24, 2


def _experts(seed: int) -> FusedMoE:
    """Expert e's weights are random and scaled by (e + 1): any mix-up of experts shows."""
    gen = torch.Generator().manual_seed(seed)
    moe = FusedMoE(E, H, I, "silu", torch.float32)
    scale = torch.arange(1, E + 1, dtype=torch.float32)[:, None, None]
    moe.gate_up_proj.data.copy_(torch.randn(E, 2 * I, H, generator=gen) * scale)
    moe.down_proj.data.copy_(torch.randn(E, H, I, generator=gen) * scale)
    return moe


def _reference(moe: FusedMoE, x: torch.Tensor, logits: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Token by token, as the math reads (test-only loop)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = logits[t].float().softmax(-1)
        weights, ids = probs.topk(K)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids.tolist()):
            gate, up = (moe.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w * (moe.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_experts_equal_the_per_token_reference() -> None:
    moe = _experts(0)
    gen = torch.Generator().manual_seed(1)
    x, logits = torch.randn(37, H, generator=gen), torch.randn(37, E, generator=gen) * 3
    for renormalize in (True, False):
        weights, ids = route(logits, K, renormalize)
        assert len(set(ids.flatten().tolist())) == E  # every expert gets tokens
        torch.testing.assert_close(moe(x, weights, ids), _reference(moe, x, logits, renormalize),
                                   atol=1e-4, rtol=1e-4)
    # routing matters: another choice of experts gives another result
    weights, ids = route(logits, K, True)
    assert not torch.allclose(moe(x, weights, ids), moe(x, weights, ids.roll(1, dims=0)), atol=1e-2)


def test_single_token_and_unused_experts() -> None:
    moe = _experts(2)
    x = torch.randn(1, H)
    logits = torch.full((1, E), -5.0)
    logits[0, 4], logits[0, 1] = 2.0, 1.0
    weights, ids = route(logits, K, True)
    assert ids.tolist() == [[4, 1]]
    torch.testing.assert_close(moe(x, weights, ids), _reference(moe, x, logits, True), atol=1e-4, rtol=1e-5)


def test_stacked_and_per_expert_checkpoints_load_the_same(tiny_model_factory, monkeypatch) -> None:
    """Published Mixtral checkpoints store experts.E.w1/w3/w2 (what save_pretrained writes, the
    files the parity test loads); transformers 5 holds them stacked. Both fill the same tensors
    (kept plain: the test refills and compares them; the CPU's prepacked layout is opaque)."""
    monkeypatch.setenv("TEXTGEN_CPU_ONEDNN_PACK", "0")
    path = tiny_model_factory("mixtral")
    from_files = load_model(EngineConfig(model_id=path, dtype="float32"), cpu_backend()).model
    stacked = {k: v for k, v in hf_model(path).state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in stacked
    fresh = load_model(EngineConfig(model_id=path, dtype="float32", load_format="dummy"), cpu_backend()).model
    filled = fresh.load_weights(stacked.items())
    assert filled == {name for name, _ in fresh.named_parameters()}
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(param, dict(from_files.named_parameters())[name], atol=0, rtol=0)


def test_tiny_moe_models_route_tokens_to_different_experts(tiny_model_factory) -> None:
    """The parity cases would prove little if every token went to the same experts."""
    for arch, seed in (("mixtral", 0), ("qwen2_moe", 0), ("qwen3_moe", 1)):  # the parity cases' models
        model = hf_model(tiny_model_factory(arch, **({"seed": seed} if seed else {})))
        chosen: list[torch.Tensor] = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(o[2]))
                 for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        with torch.inference_mode():
            model(torch.tensor([prompt_of(33, 0)]))
        for h in hooks:
            h.remove()
        assert chosen
        for ids in chosen:
            assert set(ids.reshape(-1).tolist()) == set(range(model.config.num_experts)), arch
            assert len({tuple(sorted(row)) for row in ids.tolist()}) > 2, arch

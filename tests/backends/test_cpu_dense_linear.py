"""The CPU backend's dense linear kernel (oneDNN on weights prepacked at load) against F.linear,
and where the loader uses it: unquantized layers only, never a weight the embedding shares."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textgen.backends.cpu.backend import CPUBackend
from textgen.backends.cpu.dense_linear import OneDNNPackedLinear, packing_problem
from textgen.core.backend import BackendCandidate
from textgen.core.config import EngineConfig

DTYPES = [d for d in (torch.float32, torch.bfloat16) if packing_problem(d) is None]
pytestmark = pytest.mark.skipif(not DTYPES, reason=f"no prepacking here: {packing_problem(torch.float32)}")


def _packed_layer(weight: torch.Tensor) -> nn.Module:
    layer = nn.Module()
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    OneDNNPackedLinear().prepare(layer, shared=False)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 17, 64])
def test_prepacked_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    """bfloat16: the same oneDNN inner product without the per-call reorder, bit-identical;
    float32: the packed blocking sums in another order. Two K-term float32 sums of unit-normal
    products (sum of |terms| ~ 0.64 K) differ by ~sqrt(K) * 2^-24 * that, ~3e-3 at K = 2,048 in
    the worst row of 26k, so atol 4e-3; the same sums in float64 agree with both."""
    gen = torch.Generator().manual_seed(rows)
    for n, k in [(1280, 768), (768, 2048), (100, 77), (8, 3)]:
        weight = torch.randn(n, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        x = torch.randn(2, rows, k, generator=gen).to(dtype)[:, :, :]  # leading axes, as models pass them
        layer = _packed_layer(weight)
        assert layer.weight.layout == torch._mkldnn and tuple(layer.weight.shape) == (n, k)
        assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight.to_dense(), weight)
        for b in (None, bias):
            got, want = OneDNNPackedLinear().apply(layer, x, b), F.linear(x, weight, b)
            assert got.shape == want.shape and got.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=4e-3, rtol=1e-5)


def test_strided_and_empty_inputs() -> None:
    dtype = DTYPES[0]
    weight = torch.randn(64, 32).to(dtype)
    layer = _packed_layer(weight)
    x = torch.randn(5, 64).to(dtype)[:, ::2]  # last axis strided
    torch.testing.assert_close(OneDNNPackedLinear().apply(layer, x, None), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    assert OneDNNPackedLinear().apply(layer, torch.zeros(0, 32, dtype=dtype), None).shape == (0, 64)


def test_shared_weights_and_other_dtypes_stay_plain() -> None:
    for weight, shared in ((torch.randn(8, 8), True), (torch.randn(8, 8).half(), False)):
        layer = nn.Module()
        layer.weight = nn.Parameter(weight, requires_grad=False)
        OneDNNPackedLinear().prepare(layer, shared=shared)
        assert isinstance(layer.weight, nn.Parameter) and layer.weight.layout == torch.strided
        torch.testing.assert_close(OneDNNPackedLinear().apply(layer, torch.ones(1, 8, dtype=weight.dtype), None),
                                   F.linear(torch.ones(1, 8, dtype=weight.dtype), weight))


def test_the_backend_offers_it_except_in_graph_mode_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    candidate = BackendCandidate("cpu", True, 0, "test", "textgen.backends.cpu.backend:CPUBackend")
    assert isinstance(CPUBackend(EngineConfig(model_id="x"), candidate).dense_linear(DTYPES[0]), OneDNNPackedLinear)
    graphs = EngineConfig(model_id="x", graph_batch_sizes=(1, 2))
    assert CPUBackend(graphs, candidate).dense_linear(DTYPES[0]) is None
    assert CPUBackend(None, candidate).dense_linear(torch.float16) is None
    monkeypatch.setenv("TEXTGEN_CPU_ONEDNN_PACK", "0")
    assert packing_problem(torch.float32) == "disabled by TEXTGEN_CPU_ONEDNN_PACK=0"
    assert CPUBackend(None, candidate).dense_linear(torch.float32) is None


def test_loader_packs_unquantized_layers_only(tiny_model_factory) -> None:
    from tests.quantization.helpers import load_quantized
    from textgen.core.layers.embedding import LMHead
    from textgen.core.layers.linear import LinearBase

    untied = tiny_model_factory("llama", tie_word_embeddings=False)
    linears = [m for m in load_quantized(untied, prepack=True).model.modules() if isinstance(m, (LinearBase, LMHead))]
    assert linears and all(getattr(m, "onednn_packed", False) for m in linears)
    tied = tiny_model_factory("llama", tie_word_embeddings=True)
    head = next(m for m in load_quantized(tied, prepack=True).model.modules() if isinstance(m, LMHead))
    assert head.tied and not getattr(head, "onednn_packed", False)  # the embedding looks rows up in it
    int8 = [m for m in load_quantized(untied, "int8", prepack=True).model.modules() if isinstance(m, LinearBase)]
    assert int8 and not any(getattr(m, "onednn_packed", False) or m.dense_kernel for m in int8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_decoding_matches_transformers(tiny_llama: str, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    from textgen.core import LLM

    prompts = [[5, 17, 42, 9, 77, 3, 12], [8, 100, 250, 31]]
    llm = LLM(tiny_llama, backend="cpu", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype)).eval()
    for prompt in prompts:
        got = llm.generate_ids([prompt], max_new_tokens=12, ignore_eos=True)[0].token_ids
        with torch.inference_mode():
            want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        assert list(got) == want[0, len(prompt):].tolist()

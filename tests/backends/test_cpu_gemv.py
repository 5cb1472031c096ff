"""The CPU backend's small-M linear kernel (backends/cpu/csrc/gemv.cpp) against a float64
reference, and its place in the model: unquantized layers of a CPU model use it, and greedy
generation is unchanged by it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textgen.backends.cpu import gemv

pytestmark = pytest.mark.skipif(gemv.build_problem() is not None, reason=f"gemv kernel: {gemv.build_problem()}")

# Both paths accumulate in float32 and round the output once. bf16: the output's rounding is 2^-9
# relative and float32 sums over K <= 2,048 unit-normal products err by ~1e-4 absolute, so 2^-8
# relative + 2e-3 absolute bounds it; float32: the sums' error only.
TOLERANCES = {torch.bfloat16: (2e-3, 2**-8), torch.float32: (2e-4, 1e-5)}
SHAPES = [(1280, 768), (768, 2048), (100, 77), (17, 33), (3, 1000), (64, 32)]


@pytest.mark.parametrize("dtype", gemv.native_dtypes())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_a_float64_reference(dtype: torch.dtype, rows: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    for n, k in SHAPES:
        weight = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(rows, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
        got = torch.ops.textgen_cpu_gemv.small_m_linear(x, weight, bias)
        ref = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
        atol, rtol = TOLERANCES[dtype]
        assert got.dtype == dtype and got.shape == (rows, n)
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", gemv.native_dtypes())
def test_dense_linear_keeps_f_linear_contract(dtype: torch.dtype) -> None:
    """Leading axes, strided rows, and F.linear above the row limit (same object, exact)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    atol, rtol = TOLERANCES[dtype]
    small = torch.randn(1, 2, 128, generator=gen).to(dtype)[..., ::2]  # rows strided, last axis too
    torch.testing.assert_close(gemv.dense_linear(small, weight, bias).double(),
                               F.linear(small.double(), weight.double(), bias.double()), atol=atol, rtol=rtol)
    big = torch.randn(gemv.MAX_GEMV_ROWS + 1, 64, generator=gen).to(dtype)
    assert torch.equal(gemv.dense_linear(big, weight, bias), F.linear(big, weight, bias))


def test_bad_shapes_are_refused_with_the_reason() -> None:
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        torch.ops.textgen_cpu_gemv.small_m_linear(torch.zeros(9, 4), torch.zeros(3, 4), None)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and weight \\[N, K\\]"):
        torch.ops.textgen_cpu_gemv.small_m_linear(torch.zeros(1, 4), torch.zeros(3, 5), None)


def test_unquantized_layers_carry_it_and_quantized_ones_do_not(tiny_llama) -> None:
    from tests.quantization.helpers import load_quantized
    from textgen.core.layers.embedding import LMHead
    from textgen.core.layers.linear import LinearBase

    plain = [m for m in load_quantized(tiny_llama).model.modules() if isinstance(m, (LinearBase, LMHead))]
    assert plain and all(m.dense_gemm is gemv.dense_linear for m in plain)
    int8 = [m for m in load_quantized(tiny_llama, "int8").model.modules() if isinstance(m, LinearBase)]
    assert int8 and all(m.dense_gemm is None for m in int8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_decoding_through_it_matches_transformers(tiny_llama, dtype: str) -> None:
    """Each decode step is one row through the kernel; the greedy tokens are transformers'."""
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

"""Gaudi kernels: vllm-hpu-extension's flat_pa behind its availability check (the reasons on this
machine and for a missing extension or an unknown release), negotiation falling back to the static
kernel, and our flat block-list metadata and calls pinned against the extension's documented
semantics. PyPI's vllm-hpu-extension (0.1, 2024) imports habana_frameworks and vllm at import
time and predates flat_pa, and the current one installs from GitHub only, so neither runs here:
the stand-ins below (tests only) implement flat_pa and insert_or_update_cache as the extension
documents and computes them: per block, the query of the block's group (block_mapping @ query)
against the block's slots plus block_bias; a softmax over all blocks of one group (block_groups,
the batch size naming padding blocks); the outputs summed back per group (block_mapping^T)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from textgen.backends.gaudi import attention as ga
from textgen.backends.gaudi.attention import HPUFlatPagedAttention, flat_blocks, flat_pa_reasons
from textgen.backends.gaudi.plugin import textgen_attention_backends
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import negotiate
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.core.layers.static_paged_attention import StaticPagedAttention
from textgen.testing.steps import StepRow, fill_step, kernel_metadata


def _spec(**overrides: object) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=16, dtype=torch.float32, block_size=4, scale=0.25)
    fields.update(overrides)
    return AttentionSpec(**fields)


def flat_pa(query, key_cache, value_cache, block_list, block_mapping, block_bias, block_groups, scale,
            matmul_qk_op, matmul_av_op, batch2block_matmul_op, block2batch_matmul_op, keys_fetch_func,
            values_fetch_func):
    """Stand-in with the extension's documented semantics (and its current signature)."""
    batch, q_heads, head_size = query.shape
    keys, values = keys_fetch_func(key_cache, block_list), values_fetch_func(value_cache, block_list)  # [N, bs, Hkv, D]
    group = q_heads // keys.shape[2]
    keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    q = batch2block_matmul_op(block_mapping, (scale * query).reshape(batch, -1)).view(-1, q_heads, head_size)
    scores = torch.einsum("nhd,nshd->nhs", q, keys) + block_bias[:, None, :]
    top = torch.full((batch + 1, q_heads), float("-inf")).index_reduce_(0, block_groups, scores.amax(-1), "amax")
    weights = (scores - top[block_groups][..., None]).exp()
    total = torch.zeros(batch + 1, q_heads).index_add_(0, block_groups, weights.sum(-1))
    out = torch.einsum("nhs,nshd->nhd", weights / total[block_groups][..., None], values)
    return block2batch_matmul_op(block_mapping.t(), out.reshape(out.shape[0], -1)).view(batch, q_heads, head_size)


def insert_or_update_cache(input, cache, block_indices, block_offsets):
    cache.index_put_((block_indices, block_offsets), input)


@pytest.fixture
def extension(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"flat_pa": 0, "insert": 0}

    def counted_flat_pa(**kwargs):
        calls["flat_pa"] += 1
        return flat_pa(**kwargs)

    def counted_insert(*args):
        calls["insert"] += 1
        insert_or_update_cache(*args)

    counted_flat_pa.__signature__ = __import__("inspect").signature(flat_pa)
    ops = SimpleNamespace(flat_pa=counted_flat_pa)
    cache_ops = SimpleNamespace(insert_or_update_cache=counted_insert)
    package = SimpleNamespace(ops=ops, cache_ops=cache_ops)
    monkeypatch.setitem(sys.modules, "vllm_hpu_extension", package)
    monkeypatch.setitem(sys.modules, "vllm_hpu_extension.ops", ops)
    monkeypatch.setitem(sys.modules, "vllm_hpu_extension.cache_ops", cache_ops)
    return calls


def test_check_on_this_machine_names_what_is_missing() -> None:
    if ga.find_spec("habana_frameworks") is not None:
        pytest.skip("habana_frameworks is installed here")
    assert HPUFlatPagedAttention.check(_spec())[-1] == (
        "habana_frameworks is not installed (Intel Gaudi's PyTorch bridge, from Intel Gaudi's installer)")


def test_a_missing_extension_and_an_unknown_release_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ga, "find_spec", lambda name: None if name == "vllm_hpu_extension" else object())
    assert ga.extension_reasons() == [
        "vllm_hpu_extension is not installed (pip install git+https://github.com/HabanaAI/vllm-hpu-extension)"]
    assert flat_pa_reasons(flat_pa) == []
    assert flat_pa_reasons(lambda query, key_cache, block_list, sinks, window=None: None) == [
        "this vllm_hpu_extension's flat_pa needs arguments textgen does not pass: sinks"]


def test_negotiation_falls_back_to_the_static_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = textgen_attention_backends(backend=None)
    monkeypatch.setattr(ga, "extension_reasons", lambda: [])
    assert negotiate(kernels, [_spec()], 4, None).kernel_cls is HPUFlatPagedAttention
    monkeypatch.setattr(ga, "extension_reasons", lambda: ["vllm_hpu_extension is not installed"])
    choice = negotiate(kernels, [_spec()], 4, None)
    assert choice.kernel_cls is StaticPagedAttention
    assert choice.rejected[0].describe() == "hpu_flat_pa: vllm_hpu_extension is not installed"


def test_flat_blocks_of_a_padded_decode_step() -> None:
    step = fill_step([StepRow(5, 1, [3, 1]), StepRow(0, 1, [2])], 4, max_blocks=3, pad_to=3, pad_slot=7 * 4)
    block_list, groups, usage, scales = flat_blocks(step.block_tables, step.seq_lens, 4)
    assert block_list.tolist() == [3, 1, 0, 2, 0, 0, 7, 7, 7]  # full width; the pad row on the scratch block
    assert groups.tolist() == [0, 0, 3, 1, 3, 3, 2, 3, 3]  # 3 (the batch size): padding blocks
    assert usage.tolist() == [4, 2, 1, 1, 1, 1, 1, 1, 1]
    assert scales.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_decode_step_through_flat_pa_equals_the_portable_kernel(extension) -> None:
    spec = _spec()
    real = [StepRow(9, 1, [3, 1, 4]), StepRow(2, 1, [0]), StepRow(4, 1, [2, 5])]
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 8, 4, 2, 16, generator=generator)  # block 7: scratch
    q, k, v = (torch.randn(4, h, 16, generator=generator) for h in (8, 2, 2))
    reference = cache.clone()
    want = TorchPagedAttention(spec).forward(q[:3], k[:3], v[:3], reference,
                                             kernel_metadata(TorchPagedAttention, [spec], fill_step(real, 4)))
    padded = fill_step(real, 4, max_blocks=4, pad_to=4, pad_slot=7 * 4)
    meta = kernel_metadata(HPUFlatPagedAttention, [spec], padded)
    got = HPUFlatPagedAttention(spec).forward(q, k, v, cache, meta)
    assert extension == {"flat_pa": 1, "insert": 2}
    torch.testing.assert_close(got[:3], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, :7], reference[:, :7])  # the same slots written, the pad row on the scratch


def test_prefill_and_mixed_steps_take_the_static_path(extension) -> None:
    spec = _spec()
    rows = [StepRow(5, 3, [0, 1]), StepRow(2, 1, [2])]
    generator = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 4, 4, 2, 16, generator=generator)
    q, k, v = (torch.randn(4, h, 16, generator=generator) for h in (8, 2, 2))
    step = fill_step(rows, 4)
    meta = kernel_metadata(HPUFlatPagedAttention, [spec], step)
    assert meta.block_list is None
    got = HPUFlatPagedAttention(spec).forward(q, k, v, cache.clone(), meta)
    want = TorchPagedAttention(spec).forward(q, k, v, cache.clone(), kernel_metadata(TorchPagedAttention, [spec], step))
    assert extension == {"flat_pa": 0, "insert": 0}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

"""TorchPagedAttention against a naive per-request reference on random tensors (float32)."""
from __future__ import annotations

import math

import pytest
import torch

from textgen.backends.cpu.attention import CPUPagedAttention
from textgen.core.attention import AttentionSpec
from textgen.core.forward_context import AttentionMetadata
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.testing.steps import StepRow, fill_step, kernel_metadata

HEADS, KV_HEADS, HEAD_SIZE, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 64


def _spec(window: int | None = None, soft_cap: float | None = None, kv_heads: int = KV_HEADS) -> AttentionSpec:
    return AttentionSpec(HEADS, kv_heads, HEAD_SIZE, torch.float32, HEAD_SIZE ** -0.5, window, soft_cap,
                         block_size=BLOCK)


class _Requests:
    """Random full contexts per request plus a shuffled block allocation; `cached[i]` tokens of
    request i are already in the cache, `query[i]` are computed in this step."""

    def __init__(self, cached: list[int], query: list[int], kv_heads: int = KV_HEADS, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.cached, self.query = cached, query
        self.seq = [c + q for c, q in zip(cached, query)]
        self.k = [torch.randn(n, kv_heads, HEAD_SIZE, generator=gen) for n in self.seq]
        self.v = [torch.randn(n, kv_heads, HEAD_SIZE, generator=gen) for n in self.seq]
        self.q = [torch.randn(n, HEADS, HEAD_SIZE, generator=gen) for n in query]
        free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.blocks = [[free.pop() for _ in range(math.ceil(n / BLOCK))] for n in self.seq]
        self.cache = torch.zeros(TorchPagedAttention.kv_cache_shape(NUM_BLOCKS, BLOCK, kv_heads, HEAD_SIZE,
                                                                      torch.float32))
        for i, c in enumerate(cached):  # the prefix a previous step wrote
            slots = self._slots(i, 0, c)
            self.cache[0].view(-1, kv_heads, HEAD_SIZE)[slots] = self.k[i][:c]
            self.cache[1].view(-1, kv_heads, HEAD_SIZE)[slots] = self.v[i][:c]

    def _slots(self, i: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(self.blocks[i])[pos // BLOCK] * BLOCK + pos % BLOCK

    def step(self, specs: list[AttentionSpec] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's q/k/v and the metadata the kernel's builder makes for layers of `specs`."""
        rows = [StepRow(c, q, b) for c, q, b in zip(self.cached, self.query, self.blocks)]
        meta = kernel_metadata(TorchPagedAttention, specs or [_spec()], fill_step(rows, BLOCK))
        new_k = torch.cat([k[c:] for k, c in zip(self.k, self.cached)])
        new_v = torch.cat([v[c:] for v, c in zip(self.v, self.cached)])
        return torch.cat(self.q), new_k, new_v, meta

    def reference(self, spec: AttentionSpec) -> torch.Tensor:
        """Per request, per query token: softmax over the allowed context positions."""
        rows = []
        groups = HEADS // spec.num_kv_heads
        for i in range(len(self.seq)):
            k = self.k[i].repeat_interleave(groups, dim=1)
            v = self.v[i].repeat_interleave(groups, dim=1)
            for j in range(self.query[i]):
                p = self.cached[i] + j
                lo = 0 if spec.sliding_window is None else max(0, p - spec.sliding_window + 1)
                scores = torch.einsum("hd,shd->hs", self.q[i][j], k[lo : p + 1]) * spec.scale
                if spec.logits_soft_cap is not None:
                    scores = torch.tanh(scores / spec.logits_soft_cap) * spec.logits_soft_cap
                rows.append(torch.einsum("hs,shd->hd", scores.softmax(-1), v[lo : p + 1]).reshape(-1))
        return torch.stack(rows)


MIXED = dict(cached=[9, 0, 12, 5], query=[7, 11, 1, 1])  # chunk after a prefix, prefill, 2 decodes


@pytest.mark.parametrize("spec", [_spec(), _spec(window=5), _spec(kv_heads=1), _spec(soft_cap=3.0),
                                  _spec(window=3, soft_cap=2.0, kv_heads=4)],
                         ids=["gqa", "sliding5", "mqa", "softcap", "mha-window-softcap"])
def test_mixed_batch_matches_reference(spec: AttentionSpec) -> None:
    reqs = _Requests(**MIXED, kv_heads=spec.num_kv_heads)
    q, k, v, meta = reqs.step([spec])
    out = CPUPagedAttention(spec).forward(q, k, v, reqs.cache, meta)
    assert out.shape == (sum(MIXED["query"]), HEADS * HEAD_SIZE)
    torch.testing.assert_close(out, reqs.reference(spec), atol=1e-5, rtol=1e-5)


def test_new_kv_is_written_at_slot_mapping() -> None:
    reqs = _Requests(**MIXED)
    q, k, v, meta = reqs.step()
    TorchPagedAttention(_spec()).forward(q, k, v, reqs.cache, meta)
    flat = reqs.cache.view(2, -1, KV_HEADS, HEAD_SIZE)
    torch.testing.assert_close(flat[0][meta.slot_mapping], k, atol=0, rtol=0)
    torch.testing.assert_close(flat[1][meta.slot_mapping], v, atol=0, rtol=0)
    for i, (c, n) in enumerate(zip(reqs.cached, reqs.seq)):  # the whole context is now cached
        torch.testing.assert_close(flat[0][reqs._slots(i, 0, n)], reqs.k[i], atol=0, rtol=0)


@pytest.mark.parametrize("case", [dict(cached=[0], query=[13]), dict(cached=[0, 0], query=[6, 10]),
                                  dict(cached=[3, 30, 17], query=[1, 1, 1]), dict(cached=[8], query=[5])],
                         ids=["single-prefill", "two-prefills", "all-decode", "single-chunk"])
@pytest.mark.parametrize("window", [None, 4])
def test_homogeneous_batches(case: dict, window: int | None) -> None:
    reqs = _Requests(**case, seed=1)
    spec = _spec(window=window)
    q, k, v, meta = reqs.step([spec])
    out = TorchPagedAttention(spec).forward(q, k, v, reqs.cache, meta)
    torch.testing.assert_close(out, reqs.reference(spec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [MIXED, dict(cached=[3, 30, 17], query=[1, 1, 1])], ids=["mixed", "all-decode"])
def test_layers_share_one_step_plan_per_sliding_window(case: dict) -> None:
    """The builder plans each window of the model once per step; layers use their window's plan,
    never another's (a model may alternate full and sliding-window layers over one step)."""
    reqs = _Requests(**case, seed=3)
    specs = [_spec(window=w) for w in (None, 4, 2, None, 4)]
    q, k, v, meta = reqs.step(specs)
    assert set(meta.plans) == {None, 4, 2}
    for spec in specs:
        out = TorchPagedAttention(spec).forward(q, k, v, reqs.cache, meta)
        torch.testing.assert_close(out, reqs.reference(spec), atol=1e-5, rtol=1e-5)


def test_length_buckets_cut_where_padding_would_waste_too_much(monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen.core.layers import paged_attention as pa

    lengths = [900, 40, 60, 880, 50, 600, 45, 590, 870]
    # longest first; cut before 600 (6 rows x 300 positions saved) and before 60 (4 x 540)
    assert pa._length_buckets(list(range(9)), lengths) == [[0, 3, 8], [5, 7], [2, 4, 6, 1]]
    assert pa._length_buckets([1, 2, 4, 6], lengths) == [[1, 2, 4, 6]]  # little waste: one group, step order
    assert pa._length_buckets([0, 1], lengths) == [[0, 1]]  # 860 positions saved: not worth a group
    monkeypatch.setattr(pa, "MAX_GROUPS_PER_KIND", 2)
    assert pa._length_buckets(list(range(9)), lengths) == [[0, 3, 8], [5, 7, 2, 4, 6, 1]]


@pytest.mark.parametrize("window", [None, 3])
def test_bucketed_groups_match_reference(monkeypatch: pytest.MonkeyPatch, window: int | None) -> None:
    """Decode rows and prefill rows of very different lengths, cut into several buckets each."""
    from textgen.core.layers import paged_attention as pa

    monkeypatch.setattr(pa, "MIN_PAD_WASTE", 0)
    reqs = _Requests(cached=[40, 2, 3, 30, 0, 25, 1], query=[1, 1, 1, 1, 9, 2, 12], seed=4)
    spec = _spec(window=window)
    q, k, v, meta = reqs.step([spec])
    assert len(pa._split_rows(meta)) > 2
    out = TorchPagedAttention(spec).forward(q, k, v, reqs.cache, meta)
    torch.testing.assert_close(out, reqs.reference(spec), atol=1e-5, rtol=1e-5)


def test_token_result_is_independent_of_batch_company() -> None:
    """A request's output rows are identical whether it runs alone or in the mixed batch."""
    mixed = _Requests(**MIXED, seed=2)
    q, k, v, meta = mixed.step([_spec(window=6)])
    together = TorchPagedAttention(_spec(window=6)).forward(q, k, v, mixed.cache, meta)
    start = 0
    for i in range(len(MIXED["query"])):
        alone = _Requests(cached=[mixed.cached[i]], query=[mixed.query[i]], seed=2)
        alone.k, alone.v, alone.q = [mixed.k[i]], [mixed.v[i]], [mixed.q[i]]
        alone.blocks = [mixed.blocks[i]]
        alone.cache = mixed.cache.clone()
        q1, k1, v1, meta1 = alone.step([_spec(window=6)])
        out = TorchPagedAttention(_spec(window=6)).forward(q1, k1, v1, alone.cache, meta1)
        n = mixed.query[i]
        torch.testing.assert_close(together[start : start + n], out, atol=1e-6, rtol=1e-6)
        start += n


def test_check_reports_reasons() -> None:
    bad = AttentionSpec(6, 4, HEAD_SIZE, torch.float32, 1.0, block_size=BLOCK)
    assert TorchPagedAttention.check(bad) == ["num_heads 6 is not a multiple of num_kv_heads 4"]
    assert TorchPagedAttention.check(_spec()) == []
    assert CPUPagedAttention.name == "cpu_paged" and TorchPagedAttention.name == "torch_paged"
